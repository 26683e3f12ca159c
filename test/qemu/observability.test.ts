/**
 * Logs and metrics through the daemon process, against real QEMU: a
 * completed, a cancelled and a failed backup move the domain's series (and
 * the last success and outcome survive a restart); log lines carry journald
 * priority prefixes under systemd, request lines appear at debug only, and the
 * level comes from the flag, the configuration file and SIGHUP.
 */
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { ApiClient } from "../../src/cli/client.js";
import { addDomain, cli, connected, type RunningDaemon, startDaemon, until } from "../helpers/daemon.js";
import { startVm, tempDir } from "../helpers/qemu.js";

const MiB = 1024 * 1024;

async function metrics(d: RunningDaemon): Promise<Map<string, number>> {
  const r = await new ApiClient(d.socket).request("GET", "/v1/metrics");
  if (!("status" in r) || r.status !== 200) throw new Error(`GET /v1/metrics: ${JSON.stringify(r)}`);
  const m = new Map<string, number>();
  for (const line of String(r.text).split("\n")) {
    if (line === "" || line.startsWith("#")) continue;
    const i = line.lastIndexOf(" ");
    m.set(line.slice(0, i), Number(line.slice(i + 1)));
  }
  return m;
}

const total = (outcome: string, mode = "push") => `qbackupd_backups_total{domain="vm",mode="${mode}",outcome="${outcome}"}`;
const last = (outcome: string) => `qbackupd_backup_last_outcome{domain="vm",outcome="${outcome}"}`;
const SUCCESS = 'qbackupd_backup_last_success_timestamp_seconds{domain="vm"}';

t.test("completed, cancelled and failed backups move the domain's series; the last success survives a restart", async (t) => {
  const vm = await startVm(t, { disks: [{ size: "16M" }] });
  for (let off = 0; off < 16 * MiB; off += 2 * MiB) await vm.write(0, 0x61, off, MiB);
  const dir = tempDir(t, "qbackupd-daemon-");
  const d = await startDaemon(t, { dir });
  await addDomain(d, "vm", vm.qmpPath);
  await connected(d, "vm");

  const m0 = await metrics(d);
  for (const o of ["completed", "failed", "cancelled"]) {
    t.equal(m0.get(total(o)), 0, `${o}: present at zero before any backup`);
    t.equal(m0.get(total(o, "pull")), 0);
    t.equal(m0.get(last(o)), 0);
  }
  t.equal(m0.get(SUCCESS), 0, "never backed up: 0");
  t.equal(m0.get('qbackupd_backup_duration_seconds_count{domain="vm",mode="push"}'), 0);
  const { version } = JSON.parse(readFileSync(join(import.meta.dirname, "..", "..", "package.json"), "utf8")) as { version: string };
  t.ok(m0.has(`qbackupd_build_info{version="${version}",nodejs="${process.version}"}`), "build info");
  t.ok((m0.get("process_resident_memory_bytes") ?? 0) > 0, "process metrics");

  // completed
  const before = Date.now() / 1000;
  t.equal((await cli(d.socket, ["backup-begin", "vm"])).code, 0);
  t.equal((await cli(d.socket, ["wait", "vm", "--timeout", "60"])).code, 0);
  await until("ended counted", async () => (await metrics(d)).get(total("completed")) === 1);
  const m1 = await metrics(d);
  t.ok(m1.get(SUCCESS)! >= Math.floor(before) && m1.get(SUCCESS)! <= Date.now() / 1000 + 1, "last success: now");
  t.equal(m1.get(last("completed")), 1);
  t.ok(m1.get('qbackupd_backup_bytes_total{domain="vm",mode="push"}')! >= 8 * MiB, "the data written counted");
  t.equal(m1.get('qbackupd_backup_duration_seconds_count{domain="vm",mode="push"}'), 1);
  t.equal(m1.get('qbackupd_backup_duration_seconds_bucket{domain="vm",mode="push",le="+Inf"}'), 1);
  const success = m1.get(SUCCESS)!;

  // cancelled (slow enough to be running when aborted)
  t.equal((await cli(d.socket, ["backup-begin", "vm", "--bandwidth", "65536"])).code, 0);
  t.equal((await cli(d.socket, ["domjobabort", "vm"])).code, 0);
  await until("cancel counted", async () => (await metrics(d)).get(total("cancelled")) === 1, 30_000);
  const m2 = await metrics(d);
  t.equal(m2.get(last("cancelled")), 1);
  t.equal(m2.get(last("completed")), 0, "one last outcome at a time");
  t.equal(m2.get(SUCCESS), success, "a cancelled backup is no success");

  // failed: QEMU dies mid-backup
  t.equal((await cli(d.socket, ["backup-begin", "vm", "--bandwidth", "65536"])).code, 0);
  await vm.kill("SIGKILL");
  t.equal((await cli(d.socket, ["wait", "vm", "--timeout", "30"])).code, 1);
  await until("failure counted", async () => (await metrics(d)).get(total("failed")) === 1, 30_000);
  const m3 = await metrics(d);
  t.equal(m3.get(last("failed")), 1);
  t.equal(m3.get(last("cancelled")), 0);
  t.equal(m3.get(SUCCESS), success, "a failure keeps the last success");
  t.equal(m3.get(total("completed")), 1);
  t.equal(m3.get('qbackupd_backup_duration_seconds_count{domain="vm",mode="push"}'), 3);

  // a restart keeps the last success and outcome (counters start again)
  t.equal(await d.stop(), 0);
  const d2 = await startDaemon(t, { dir });
  const m4 = await metrics(d2);
  t.equal(m4.get(SUCCESS), success, "last success kept across the restart");
  t.equal(m4.get(last("failed")), 1, "last outcome kept");
  t.equal(m4.get(total("failed")), 0, "counters reset");
  await d2.stop();
});

const BIN = join(import.meta.dirname, "..", "..", "bin", "qbackupd");
/** bin/qbackupd started with JOURNAL_STREAM set to its stdout's device:inode (decimal, as systemd writes it). */
const ASJOURNAL = ["sh", "-c", 'JOURNAL_STREAM=$(stat -L -c %d:%i /proc/$$/fd/1) exec "$0" "$@"', BIN];

/** The daemon's JSON lines: [priority prefix or undefined, parsed line]. */
function lines(log: string): [number | undefined, { level: string; msg: string }][] {
  return log
    .split("\n")
    .filter((l) => l !== "")
    .map((l) => {
      const m = /^(?:<(\d)>)?(\{.*\})$/.exec(l);
      if (m === null) throw new Error(`not a log line: ${l}`);
      return [m[1] === undefined ? undefined : Number(m[1]), JSON.parse(m[2]!)];
    });
}
const requestLines = (log: string) => lines(log).filter(([, o]) => o.msg === "incoming request" || o.msg === "request completed");

t.test("under systemd every line carries its priority; request lines at debug only", async (t) => {
  const vm = await startVm(t, { disks: [{ size: "16M" }] });
  // as systemd does: JOURNAL_STREAM names stdout's device:inode
  const d = await startDaemon(t, { args: ["--log-level", "debug"], command: ASJOURNAL });
  await addDomain(d, "vm", vm.qmpPath);
  await connected(d, "vm");
  await new ApiClient(d.socket).request("GET", "/v1/health");
  await until("request lines", async () => requestLines(d.log()).length >= 2);
  const all = lines(d.log());
  t.ok(
    all.every(([p]) => p !== undefined),
    "every line has a prefix",
  );
  const prio: Record<string, number> = { trace: 7, debug: 7, info: 6, warn: 4, error: 3, fatal: 2 };
  t.same(
    all.filter(([p, o]) => p !== prio[o.level]),
    [],
    "each prefix is its level's syslog priority",
  );
  t.ok(
    requestLines(d.log()).every(([p, o]) => p === 7 && o.level === "debug"),
    "request lines at debug (<7>)",
  );
  t.ok(
    all.some(([p, o]) => p === 6 && o.msg === "qbackupd listening"),
    "info lines <6>",
  );
  await d.stop();

  // at info: no request lines; and a JOURNAL_STREAM that is not stdout (inherited from a unit) adds no prefix
  const q = await startDaemon(t, { args: ["--log-level", "info"], env: { JOURNAL_STREAM: "8:12345" } });
  for (let i = 0; i < 5; i++) await new ApiClient(q.socket).request("GET", "/v1/health");
  await q.stop();
  t.same(requestLines(q.log()), [], "no request lines at info");
  const ql = lines(q.log());
  t.ok(ql.length > 0 && ql.every(([p, o]) => p === undefined && typeof o.level === "string"), "plain JSON, level by name");
});

t.test("the level from the configuration file, the flag over it, and SIGHUP", async (t) => {
  const dir = tempDir(t, "qbackupd-daemon-");
  const config = join(dir, "config.json");
  writeFileSync(config, `${JSON.stringify({ logLevel: "debug" })}\n`);
  // QBACKUPD_LOG_LEVEL (set by the helper) would win over the file: cleared
  const d = await startDaemon(t, { dir, env: { QBACKUPD_LOG_LEVEL: "" } });
  await until("debug from the file", async () => requestLines(d.log()).length > 0);
  // SIGHUP with warn: request lines stop
  writeFileSync(config, `${JSON.stringify({ logLevel: "warn" })}\n`);
  d.proc.kill("SIGHUP");
  const api = new ApiClient(d.socket);
  await until("reloaded", async () => {
    const n = requestLines(d.log()).length;
    await api.request("GET", "/v1/health");
    await new Promise((r) => setTimeout(r, 100));
    return requestLines(d.log()).length === n;
  });
  const n = requestLines(d.log()).length;
  for (let i = 0; i < 5; i++) await api.request("GET", "/v1/health");
  await new Promise((r) => setTimeout(r, 200));
  t.equal(requestLines(d.log()).length, n, "no request lines after SIGHUP set warn");
  await d.stop();

  // the flag wins over the file
  writeFileSync(config, `${JSON.stringify({ logLevel: "debug" })}\n`);
  const f = await startDaemon(t, { dir, args: ["--log-level", "error"], env: { QBACKUPD_LOG_LEVEL: "" } });
  for (let i = 0; i < 5; i++) await new ApiClient(f.socket).request("GET", "/v1/health");
  await f.stop();
  t.same(requestLines(f.log()), [], "--log-level error over the file's debug");

  // a bad level is refused at start with a clear message
  writeFileSync(config, `${JSON.stringify({ logLevel: "loud" })}\n`);
  await t.rejects(startDaemon(t, { dir, env: { QBACKUPD_LOG_LEVEL: "" } }), /logLevel must be one of/);
  await t.rejects(startDaemon(t, { args: ["--log-level", "shout"] }), /logLevel must be one of .*"shout"/, "a bad flag too");
  // a bad environment value is named and ignored (pino used to throw at import, with a stack trace)
  const e = await startDaemon(t, { env: { QBACKUPD_LOG_LEVEL: "loud" } });
  t.match(e.log(), /QBACKUPD_LOG_LEVEL="loud" is no level name; ignored/);
  await e.stop();
});
