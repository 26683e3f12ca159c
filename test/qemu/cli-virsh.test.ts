/**
 * The CLI as a libvirt user expects it (issue 12, Deliver 2): virsh's
 * behaviour verb by verb against the built daemon and a real VM, plus the
 * papercuts (--version, JSON errors, units, wait --job, set-bandwidth, events
 * --timeout) and qbackupd's own flags (--version, --check-config,
 * --backup-dir and the warning about generated targets).
 */
import { execFile } from "node:child_process";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { cli, startDaemon } from "../helpers/daemon.js";
import { startVm, tempDir } from "../helpers/qemu.js";

const ROOT = join(import.meta.dirname, "..", "..");
const VERSION = (JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8")) as { version: string }).version;
const ENV = { ...process.env, NODE_OPTIONS: "" };
/** Output that is not JSON fails the assertion instead of ending the test. */
const parse = (s: string): unknown => {
  try {
    return JSON.parse(s);
  } catch {
    return s;
  }
};

function run(bin: string, args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(join(ROOT, "bin", bin), args, { env: ENV, timeout: 20_000 }, (err, stdout, stderr) => {
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr });
    });
  });
}

t.test("--version on both binaries", async (t) => {
  const a = await run("qbackup", ["--version"]);
  t.equal(a.code, 0);
  t.equal(a.stdout, `${VERSION}\n`);
  const b = await run("qbackupd", ["--version"]);
  t.equal(b.code, 0);
  t.equal(b.stdout, `${VERSION}\n`);
});

t.test("qbackupd --check-config", async (t) => {
  const dir = tempDir(t, "qbackupd-check-");
  const good = join(dir, "good.json");
  writeFileSync(good, JSON.stringify({ stateDir: join(dir, "state") }));
  const g = await run("qbackupd", ["--check-config", good]);
  t.equal(g.code, 0, g.stderr);
  t.match(g.stdout, /configuration OK/);
  const bad = join(dir, "bad.json");
  writeFileSync(bad, JSON.stringify({ stateDir: "relative" }));
  const b = await run("qbackupd", ["--check-config", bad]);
  t.equal(b.code, 2);
  t.match(b.stderr, /stateDir must be an absolute path/);
  // the check warns about generated targets outside the allowed directories, as start-up does
  const w = join(dir, "warn.json");
  writeFileSync(w, JSON.stringify({ stateDir: join(dir, "state"), allowDirs: [join(dir, "elsewhere")] }));
  const c = await run("qbackupd", ["--check-config", w]);
  t.equal(c.code, 0);
  t.match(c.stderr, /warning: .*backupDir .* outside the allowed directories/);
});

t.test("a domain: jobinfo, checkpoints, units, wait --job, set-bandwidth, events, JSON errors", async (t) => {
  const vm = await startVm(t, { disks: [{ size: "16M" }] });
  const dir = tempDir(t, "qbackupd-cli-");
  const backups = join(dir, "my-backups");
  mkdirSync(backups);
  // --allow-dir alone used to leave generated targets (under <state>/backups) refused: --backup-dir moves them
  const d = await startDaemon(t, { dir, args: ["--allow-dir", backups, "--backup-dir", backups] });
  t.notMatch(d.log(), /outside the allowed directories/, "no warning when backupDir is allowed");
  const q = (...args: string[]) => cli(d.socket, args);
  const ok = async (...args: string[]) => {
    const r = await q(...args);
    t.equal(r.code, 0, `qbackup ${args.join(" ")}: ${r.stderr.trim()}`);
    return r;
  };
  await ok("domain-add", "vm1", "--qmp", vm.qmpPath);

  // domjobinfo without a job: virsh prints "Job type: None" and succeeds
  const none = await ok("domjobinfo", "vm1");
  t.equal(none.stdout, "Job type:         None        \n");
  t.equal((await ok("domjobinfo", "vm1", "--completed")).stdout, "Job type:         None        \n");
  t.same(parse((await ok("--json", "domjobinfo", "vm1")).stdout), { type: "None" });

  // errors as JSON under --json, one shape
  const e1 = await q("--json", "domjobinfo", "nosuchvm");
  t.equal(e1.code, 3);
  t.match(parse(e1.stderr), { code: "unknown-domain", message: /nosuchvm/ }, "the daemon's own code");
  const e2 = await q("--json", "no-such-verb");
  t.equal(e2.code, 2);
  t.match(parse(e2.stderr), { code: "usage", message: String });
  const e3 = await cli(join(dir, "nothing.sock"), ["--json", "domain-list"]);
  t.equal(e3.code, 5);
  t.match(parse(e3.stderr), { code: "unreachable", message: /cannot reach/ });

  // checkpoint-create-as NAME DESCRIPTION (positional, as virsh)
  await ok("checkpoint-create-as", "vm1", "b", "the first");
  t.match((await ok("checkpoint-dumpxml", "vm1", "b")).stdout, /<description>the first<\/description>/);
  await ok("checkpoint-create-as", "vm1", "a");
  // sorted by name (virsh), not by age
  t.equal((await ok("checkpoint-list", "vm1", "--name")).stdout, "a\nb\n");
  t.equal((await ok("checkpoint-list", "vm1", "--name", "--topological")).stdout, "b\na\n");
  // filters combine
  t.equal((await ok("checkpoint-list", "vm1", "--name", "--roots", "--leaves")).stdout, "", "the root has a child");
  t.equal((await ok("checkpoint-list", "vm1", "--name", "--no-leaves")).stdout, "b\n");
  t.equal((await ok("checkpoint-list", "vm1", "--name", "--from", "b", "--leaves")).stdout, "a\n");
  t.equal((await ok("checkpoint-list", "vm1", "--name", "--from", "b", "--no-leaves")).stdout, "");
  t.equal((await ok("checkpoint-list", "vm1", "--name", "--leaves", "--no-leaves")).stdout, "", "both filters: nothing, as virsh's flags");
  // virsh refuses what it cannot combine
  const dsc = await q("checkpoint-list", "vm1", "--descendants");
  t.equal(dsc.code, 2);
  t.match(dsc.stderr, /--descendants requires --from/);
  t.equal((await q("checkpoint-list", "vm1", "--tree", "--leaves")).code, 2);
  t.equal((await q("checkpoint-list", "vm1", "--tree", "--name")).code, 2);
  t.equal((await ok("checkpoint-list", "vm1", "--tree", "--from", "b")).stdout, "b\n└─ a\n");
  // local time, virsh's format
  const table = (await ok("checkpoint-list", "vm1")).stdout;
  t.match(table, /^ Name\s+Creation Time\s+Valid\n-+\n a \*\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}/);
  // checkpoint-info
  t.equal(
    (await ok("checkpoint-info", "vm1", "b")).stdout,
    "Name:           b\nDomain:         vm1\nParent:         -\nChildren:       1\nDescendants:    1\n",
  );

  // sizes with units; backup-begin names each target. 2 MiB of data at 64 KiB/s: running for long enough
  await vm.write(0, 0x11, 0, 2 * 1024 * 1024);
  const begin = await ok("backup-begin", "vm1", "--bandwidth", "64K");
  const jobId = /job (\S+)\)/.exec(begin.stdout)?.[1];
  t.ok(jobId, begin.stdout);
  t.match(begin.stdout, new RegExp(`vda: ${backups}/`), "the target of each disk");
  // on a terminal: the bar with an ETA, and the timeout's message on a line of its own
  const tty = await new Promise<string>((resolve) => {
    const cmd = `${join(ROOT, "bin", "qbackup")} --socket ${d.socket} wait vm1 --timeout 1`;
    execFile("script", ["-qec", cmd, "/dev/null"], { env: ENV, timeout: 20_000 }, (_e, stdout) => resolve(stdout));
  });
  t.match(tty, /\r\[[#-]{30}\] +\d+% .* ETA \d+(m\d\ds|s)/, "a progress bar with an ETA");
  t.match(tty, /\n\r?qbackup: timed out waiting for the backup on 'vm1'/, "the timeout is not printed after the bar");
  const info = (await ok("domjobinfo", "vm1")).stdout;
  t.match(info, /^Job type:\s+Unbounded/);
  t.match(info, /Data processed:\s+\d+\.\d{3} (B|KiB|MiB)\n/);
  t.match(info, /Data remaining:\s+\d+\.\d{3} (B|KiB|MiB)\n/);
  t.match(info, /Data total:\s+\d+\.\d{3} MiB\n/);
  t.equal((await ok("--json", "set-bandwidth", "vm1", "1.5GiB")).stdout.includes(String(1.5 * 1024 ** 3)), true);
  t.equal((await q("set-bandwidth", "vm1", "lots")).code, 2);
  t.equal((await ok("wait", "vm1", "--job", jobId!, "--timeout", "60")).code, 0);

  // a refused begin is not answered by the previous job's outcome
  const refused = await q("backup-begin", "vm1", join(dir, "missing.xml"));
  t.equal(refused.code, 2);
  const w = await q("wait", "vm1", "--job", "not-this-one");
  t.equal(w.code, 3, "wait --job of another job: not found");
  // a begin the daemon refuses (an unknown disk): a plain wait is "not found", with the reason, not the last job's "ready"
  const unknownDisk = join(dir, "unknown-disk.xml");
  writeFileSync(unknownDisk, "<domainbackup><disks><disk name='vdz'/></disks></domainbackup>");
  const refusedByDaemon = await q("backup-begin", "vm1", unknownDisk);
  t.not(refusedByDaemon.code, 0, refusedByDaemon.stderr);
  const plain = await q("wait", "vm1", "--timeout", "10");
  t.equal(plain.code, 3, `plain wait after a refused begin: not found (${plain.stdout}${plain.stderr})`);
  t.match(plain.stderr, /last backup-begin was refused/);
  t.notMatch(plain.stdout, /backup ready/);
  const plainJson = await q("--json", "wait", "vm1", "--timeout", "10");
  t.match(JSON.parse(plainJson.stderr), { code: "no-job" });
  // the next begin that makes a job lifts it
  const again = await ok("backup-begin", "vm1");
  const againId = /job (\S+)\)/.exec(again.stdout)?.[1];
  const settled = await ok("wait", "vm1", "--timeout", "60");
  t.match(settled.stdout, new RegExp(`backup ready \\(job ${againId}\\)`), "plain wait answers with the new job");
  t.equal((await ok("wait", "vm1", "--timeout", "10")).code, 0, "and again once it finished");

  // events: an unknown domain answered at once; --timeout ends the stream
  const ev = await q("events", "nosuchvm");
  t.equal(ev.code, 3);
  const t0 = Date.now();
  t.equal((await ok("events", "vm1", "--timeout", "1")).code, 0);
  t.ok(Date.now() - t0 < 5000, "events --timeout 1 ends");
});
