/**
 * One owner for the state directory, and domains.json that never loses an
 * entry: a second daemon on the same state directory refuses to start (and a
 * kill -9 of the first does not block the next one); a failed write of
 * domains.json changes nothing in memory; entries this version cannot read,
 * a corrupt file, and a crash during start-up never cost an entry.
 */
import { execFileSync } from "node:child_process";
import { closeSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync, writeFileSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t from "tap";
import { addDomain, cli, connected, runDaemonToExit, startDaemon } from "../helpers/daemon.js";
import { startVm, type Teardown, tempDir } from "../helpers/qemu.js";

async function names(socket: string): Promise<string[]> {
  const r = await cli(socket, ["--json", "domain-list"]);
  return (JSON.parse(r.stdout) as { name: string }[]).map((d) => d.name);
}

/** Every file under `dir` with its content, to see that nothing changed. */
function snapshot(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const e of readdirSync(dir, { recursive: true, withFileTypes: true }))
    if (e.isFile()) out[join(e.parentPath, e.name)] = readFileSync(join(e.parentPath, e.name), "utf8");
  return out;
}

function persistedNames(stateDir: string): string[] {
  return (JSON.parse(readFileSync(join(stateDir, "domains.json"), "utf8")) as { name?: string }[]).map((e) => e.name ?? "?");
}

t.test(
  "a second daemon on the same state directory refuses to start, naming the holder; after kill -9 of the holder the next one starts",
  async (t) => {
    const vm = await startVm(t);
    const a = await startDaemon(t);
    await addDomain(a, "vm1", vm.qmpPath);
    t.equal((await cli(a.socket, ["checkpoint-create-as", "vm1", "c1"])).code, 0);
    const before = snapshot(a.stateDir);

    // its own socket, the first one's state directory
    const other = tempDir(t, "qbackupd-daemon-");
    const b = await runDaemonToExit(other, { stateDir: a.stateDir });
    t.notOk(b.stillRunning, "the second daemon does not keep running");
    t.ok(b.code !== null && b.code !== 0, `it exits non-zero (${b.code})`);
    t.equal(b.output.trim().split("\n").length, 1, `one line: ${b.output}`);
    t.match(
      b.output,
      new RegExp(`${a.stateDir.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}.*\\bPID ${a.proc.pid}\\b`),
      "names the directory and the holder's PID",
    );
    t.same(snapshot(a.stateDir), before, "nothing in the state directory changed (no second root checkpoint, .current as it was)");
    t.same(await names(a.socket), ["vm1"], "the first daemon serves on");

    const exited = new Promise((r) => a.proc.once("exit", r));
    a.proc.kill("SIGKILL");
    await exited;
    const c = await startDaemon(t, { dir: other, stateDir: a.stateDir });
    await connected(c, "vm1");
    const list = await cli(c.socket, ["checkpoint-list", "vm1"]);
    t.match(list.stdout, /c1/, "the next daemon has the first one's checkpoints");
  },
);

/** A tmpfs of `size` for a state directory, unmounted at teardown. */
function smallDisk(t: Teardown, size: string): string {
  const dir = mkdtempSync(join(tmpdir(), "qbackupd-fulldisk-"));
  execFileSync("mount", ["-t", "tmpfs", "-o", `size=${size},mode=0700`, "tmpfs", dir]);
  t.teardown(() => {
    // lazy: the daemon may still hold its lock file open at this point
    execFileSync("umount", ["-l", dir]);
    rmSync(dir, { recursive: true, force: true });
  });
  return dir;
}

/** Write until the file system says ENOSPC. */
function fill(path: string): void {
  const fd = openSync(path, "w");
  const buf = Buffer.alloc(64 * 1024, 1);
  try {
    for (;;) writeSync(fd, buf);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== "ENOSPC") throw e;
  } finally {
    closeSync(fd);
  }
}

t.test("domain-add and domain-remove on a full disk: an error, and the registry as it was", async (t) => {
  const [vm1, vm2] = await Promise.all([startVm(t), startVm(t)]);
  const state = smallDisk(t, "2m");
  const d = await startDaemon(t, { stateDir: state });
  await addDomain(d, "vm1", vm1.qmpPath);
  fill(join(state, "fill"));

  const add = await cli(d.socket, ["domain-add", "vm2", "--qmp", vm2.qmpPath]);
  t.not(add.code, 0, "domain-add fails");
  t.match(add.stderr, /ENOSPC|no space/i, add.stderr);
  t.same(await names(d.socket), ["vm1"], "domain-list does not show vm2");

  const rm = await cli(d.socket, ["domain-remove", "vm1"]);
  t.not(rm.code, 0, "domain-remove fails");
  t.match(rm.stderr, /ENOSPC|no space/i, rm.stderr);
  t.same(await names(d.socket), ["vm1"], "domain-list still shows vm1");
  await connected(d, "vm1");
  t.same(persistedNames(state), ["vm1"], "domains.json as it was");

  rmSync(join(state, "fill"));
  await addDomain(d, "vm2", vm2.qmpPath);
  t.equal((await cli(d.socket, ["domain-remove", "vm1"])).code, 0, "with room again, domain-remove works");
  t.same(await names(d.socket), ["vm2"]);
  t.same(persistedNames(state), ["vm2"]);
});

t.test("an entry this version cannot read is kept in domains.json and reported", async (t) => {
  const vm = await startVm(t);
  const dir = tempDir(t, "qbackupd-daemon-");
  const state = join(dir, "state");
  mkdirSync(state, { mode: 0o700 });
  const future = { name: "future", qmp: "/nonexistent/future.sock", replicaOf: "elsewhere" };
  writeFileSync(join(state, "domains.json"), JSON.stringify([future, { name: "old", qmp: vm.qmpPath }]));
  const d = await startDaemon(t, { dir });
  await connected(d, "old");
  t.same(await names(d.socket), ["old"], "the readable entry is loaded");
  t.match(d.log(), /future[\s\S]*unknown key 'replicaOf'|unknown key 'replicaOf'[\s\S]*future/, "the unreadable one is reported");

  t.equal((await cli(d.socket, ["domain-add", "new", "--qmp", "/nonexistent/new.sock", "--no-wait"])).code, 0);
  const after = JSON.parse(readFileSync(join(state, "domains.json"), "utf8")) as { name: string }[];
  t.same(
    after.find((e) => e.name === "future"),
    future,
    "a later domain-add keeps the unreadable entry, as it was",
  );
  t.same(after.map((e) => e.name).sort(), ["future", "new", "old"]);

  const clash = await cli(d.socket, ["domain-add", "future", "--qmp", "/nonexistent/f2.sock", "--no-wait"]);
  t.not(clash.code, 0, "a domain-add of the unreadable entry's name is refused (it would stand beside it)");
  t.match(clash.stderr, /future/);
  t.equal((await cli(d.socket, ["domain-remove", "new"])).code, 0);
  t.same(persistedNames(state).sort(), ["future", "old"], "and a domain-remove keeps it too");
});

t.test("a corrupt domains.json is kept aside as a copy before anything rewrites it", async (t) => {
  const dir = tempDir(t, "qbackupd-daemon-");
  const state = join(dir, "state");
  mkdirSync(state, { mode: 0o700 });
  const corrupt = '[{"name": "vm1", "qmp": "/run/vm1.sock"}, {"name": "vm2", "qm';
  writeFileSync(join(state, "domains.json"), corrupt);
  const d = await startDaemon(t, { dir });
  const copies = () => readdirSync(state).filter((f) => f.startsWith("domains.json.corrupt"));
  t.equal(copies().length, 1, `a copy at start: ${readdirSync(state).join(" ")}`);
  t.equal(readFileSync(join(state, copies()[0] ?? "none"), "utf8"), corrupt, "the copy holds the file as it was");
  t.match(d.log(), /domains\.json\.corrupt/, "the log names the copy");

  t.equal((await cli(d.socket, ["domain-add", "vm3", "--qmp", "/nonexistent/vm3.sock", "--no-wait"])).code, 0);
  t.same(persistedNames(state), ["vm3"], "domains.json is written anew");
  t.equal(readFileSync(join(state, copies()[0] ?? "none"), "utf8"), corrupt, "the copy stays");
});

t.test("a daemon killed during start-up leaves domains.json whole", async (t) => {
  const dir = tempDir(t, "qbackupd-daemon-");
  const state = join(dir, "state");
  mkdirSync(state, { mode: 0o700 });
  const entries = [1, 2, 3, 4, 5].map((i) => ({ name: `d${i}`, qmp: `/nonexistent/d${i}.sock` }));
  const text = `${JSON.stringify(entries, null, 2)}\n`;
  writeFileSync(join(state, "domains.json"), text);
  const r = await runDaemonToExit(dir, { env: { QBACKUPD_CRASH_AT: "start:domain-registered" } });
  t.equal(r.signal, "SIGKILL", `killed at the crash point: ${r.output}`);
  t.equal(readFileSync(join(state, "domains.json"), "utf8"), text, "domains.json as it was, all 5 entries");
  const d = await startDaemon(t, { dir });
  t.same(await names(d.socket), ["d1", "d2", "d3", "d4", "d5"], "the next start has them all");
});

t.test("a daemon whose API socket another one serves refuses before it opens or connects any domain", async (t) => {
  const vm = await startVm(t);
  const a = await startDaemon(t);
  await addDomain(a, "vm1", vm.qmpPath);
  // the same socket, its own state directory, which lists a domain
  const other = tempDir(t, "qbackupd-daemon-");
  const state = join(other, "state");
  mkdirSync(state, { mode: 0o700 });
  writeFileSync(join(state, "domains.json"), JSON.stringify([{ name: "vm2", qmp: vm.qmpPath }]));
  const b = await runDaemonToExit(a.dir, { stateDir: state });
  t.equal(b.code, 1, b.output);
  t.match(b.output, /another process is serving/);
  t.same(readdirSync(state).sort(), ["domains.json", "lock"], "no checkpoint store was opened for vm2");
  t.same(await names(a.socket), ["vm1"]);
  await connected(a, "vm1");
});
