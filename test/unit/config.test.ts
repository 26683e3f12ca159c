/** Configuration parsing, the example config, and the systemd unit. */
import { execFile } from "node:child_process";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { promisify } from "node:util";
import t from "tap";
import { parseConfig, parseOwner } from "../../src/conf/config.js";

const ROOT = join(import.meta.dirname, "..", "..");

t.test("defaults and flags", async (t) => {
  const c = parseConfig(undefined, {})._unsafeUnwrap();
  t.match(c, {
    socket: "/run/qbackupd/qbackupd.sock",
    socketMode: 0o660,
    stateDir: "/var/lib/qbackupd",
    allowDirs: ["/var/lib/qbackupd/backups"],
  });
  const f = parseConfig('{"stateDir": "/s", "allowDirs": ["/a"]}', { stateDir: "/flag", allowDir: ["/b", "/c"] })._unsafeUnwrap();
  t.match(f, { stateDir: "/flag", allowDirs: ["/b", "/c"], backupDir: "/flag/backups" });
});

t.test("the log level: the file's, or the flag's (which wins); names only", async (t) => {
  t.equal(parseConfig(undefined, {})._unsafeUnwrap().logLevel, undefined, "unset: main.ts uses info");
  t.equal(parseConfig('{"logLevel": "warn"}', {})._unsafeUnwrap().logLevel, "warn");
  t.equal(parseConfig('{"logLevel": "warn"}', { logLevel: "debug" })._unsafeUnwrap().logLevel, "debug");
  for (const bad of ['{"logLevel": "loud"}', '{"logLevel": 30}', '{"logLevel": "INFO"}'])
    t.match(parseConfig(bad, {})._unsafeUnwrapErr(), { code: "config-invalid", message: /logLevel must be one of trace, debug/ }, bad);
  t.match(parseConfig("{}", { logLevel: "verbose" })._unsafeUnwrapErr(), { code: "config-invalid", message: /logLevel/ });
});

t.test("the example configuration parses", async (t) => {
  const c = parseConfig(readFileSync(join(ROOT, "packaging", "config.example.json"), "utf8"), {})._unsafeUnwrap();
  t.equal(c.domains.length, 2);
  t.equal(c.socketGroup, "qbackup");
});

t.test("a domain's qemuUser", async (t) => {
  const c = parseConfig('{"domains": [{"name": "a", "qmp": "/q", "qemuUser": "107:108"}]}', {})._unsafeUnwrap();
  t.equal(c.domains[0]!.qemuUser, "107:108");
  t.same(parseOwner("107:108"), { uid: 107, gid: 108 });
});

t.test("bad configuration: clear errors", async (t) => {
  const cases: [string, RegExp][] = [
    ["{", /not valid JSON/],
    ["[]", /JSON object/],
    ['{"colour": 1}', /unknown key 'colour'/],
    ['{"stateDir": "relative"}', /stateDir must be an absolute path/],
    ['{"socketMode": "999"}', /socketMode/],
    ['{"domains": [{"name": "a/b", "qmp": "/q"}]}', /must not contain '\/'/],
    ['{"domains": [{"name": "a"}]}', /qmp .* is required/],
    ['{"domains": [{"name": "a", "qmp": "/q"}, {"name": "a", "qmp": "/r"}]}', /listed twice/],
    ['{"maxBodyBytes": 5}', /maxBodyBytes/],
    ['{"domains": [{"name": "a", "qmp": "/q", "qemuUser": "qemu"}]}', /qemuUser must be "uid:gid"/],
    ['{"domains": [{"name": "a", "qmp": "/q", "qemuUser": "1:2:3"}]}', /qemuUser must be "uid:gid"/],
  ];
  for (const [text, re] of cases) {
    const e = parseConfig(text, {})._unsafeUnwrapErr();
    t.match(e, { message: re }, text);
    t.ok(e.code === "config-invalid" || e.code === "invalid-name", `${text}: ${e.code}`);
  }
});

t.test("systemd unit verifies", async (t) => {
  const run = promisify(execFile);
  let have = true;
  try {
    await run("systemd-analyze", ["--version"]);
  } catch {
    have = false;
  }
  if (!have) {
    // no systemd here: check the unit's essentials by reading it
    const unit = readFileSync(join(ROOT, "packaging", "qbackupd.service"), "utf8");
    t.match(unit, /^ExecStart=\/usr\/bin\/node --max-semi-space-size=1 \/opt\/qbackupd\/dist\/daemon\/main-entry\.js/m);
    t.match(unit, /^NoNewPrivileges=yes$/m);
    t.match(unit, /^ProtectSystem=strict$/m);
    return;
  }
  const r = await run("systemd-analyze", ["verify", join(ROOT, "packaging", "qbackupd.service")]).catch((e: { stderr: string }) => ({
    stderr: e.stderr,
  }));
  // verify complains about ExecStart paths that do not exist on a build machine; nothing else may be wrong
  const problems = r.stderr.split("\n").filter((l) => l.trim() !== "" && !/is not executable|No such file|Command .* is not/.test(l));
  t.same(problems, []);
});
