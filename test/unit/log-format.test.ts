/** The log lines journald and people read: level names, sd-daemon priority prefixes, the level switch. */
import { closeSync, fstatSync, mkdtempSync, openSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pino } from "pino";
import t from "tap";
import { envLogLevel, isJournalStream, isLogLevel, journaldDestination, loggerOptions } from "../../src/log.js";

function capture(level: Parameters<typeof loggerOptions>[0]) {
  const lines: string[] = [];
  const log = pino(loggerOptions(level), journaldDestination({ write: (s: string) => lines.push(s) }));
  return { log, lines };
}

t.test("every level carries its syslog priority prefix and its name", async (t) => {
  const { log, lines } = capture("trace");
  log.trace("t");
  log.debug("d");
  log.info("i");
  log.warn("w");
  log.error("e");
  log.fatal("f");
  log.child({ domain: "vm1" }).warn("child");
  t.equal(lines.length, 7, "one line each (dedupe: no line written twice)");
  const parsed = lines.map((l) => {
    const m = /^<(\d)>(\{.*\})\n$/.exec(l);
    t.ok(m, `prefix then one JSON line: ${JSON.stringify(l)}`);
    const o = JSON.parse(m![2]!) as { level: string; msg: string; name: string };
    return [Number(m![1]), o.level, o.msg, o.name];
  });
  t.same(parsed, [
    [7, "trace", "t", "qbackupd"],
    [7, "debug", "d", "qbackupd"],
    [6, "info", "i", "qbackupd"],
    [4, "warn", "w", "qbackupd"],
    [3, "error", "e", "qbackupd"],
    [2, "fatal", "f", "qbackupd"],
    [4, "warn", "child", "qbackupd"],
  ]);
});

t.test("the logger's level filters, and changes at run time (SIGHUP)", async (t) => {
  const { log, lines } = capture("info");
  log.debug("hidden");
  log.info("shown");
  log.level = "error";
  log.warn("hidden too");
  log.error("shown too");
  log.level = "debug";
  log.debug("now shown");
  t.same(
    lines.map((l) => (JSON.parse(l.slice(3)) as { msg: string }).msg),
    ["shown", "shown too", "now shown"],
  );
});

t.test("level names: valid ones only, from the environment", async (t) => {
  for (const l of ["trace", "debug", "info", "warn", "error", "fatal", "silent"]) t.ok(isLogLevel(l), l);
  for (const l of ["", "INFO", "warning", "30", 30, undefined]) t.notOk(isLogLevel(l), String(l));
  t.equal(envLogLevel({ QBACKUPD_LOG_LEVEL: "debug" }), "debug");
  t.equal(envLogLevel({ QBACKUPD_LOG_LEVEL: "" }), undefined);
  t.equal(envLogLevel({ QBACKUPD_LOG_LEVEL: "loud" }), undefined);
  t.equal(envLogLevel({}), undefined);
});

t.test("JOURNAL_STREAM counts only when it names this very stream (systemd.exec(5))", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "qbackupd-log-"));
  const fd = openSync(join(dir, "out"), "w");
  t.teardown(() => {
    closeSync(fd);
    rmSync(dir, { recursive: true, force: true });
  });
  const st = fstatSync(fd);
  t.ok(isJournalStream({ JOURNAL_STREAM: `${st.dev}:${st.ino}` }, fd), "its device:inode");
  t.notOk(isJournalStream({ JOURNAL_STREAM: `${st.dev}:${st.ino + 1}` }, fd), "another stream's (inherited by a child)");
  t.notOk(isJournalStream({ JOURNAL_STREAM: "8:12345" }, fd));
  t.notOk(isJournalStream({ JOURNAL_STREAM: "yes" }, fd));
  t.notOk(isJournalStream({}, fd), "unset");
  t.notOk(isJournalStream({ JOURNAL_STREAM: `${st.dev}:${st.ino}` }, 987654), "a closed fd");
});
