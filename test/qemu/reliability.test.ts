/**
 * Faults, through the daemon process: kill -9 of the daemon mid-push and
 * mid-pull, a job that finishes while the daemon is down, leftovers of a
 * crash mid-begin, QEMU killed mid-backup, a hung QMP peer beside a healthy
 * domain.
 */
import { existsSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { ApiClient } from "../../src/cli/client.js";
import { addDomain, cli, connected, type RunningDaemon, startDaemon, until } from "../helpers/daemon.js";
import { leftovers } from "../helpers/domain.js";
import { startFakeQmp } from "../helpers/fake-qmp.js";
import { rangeHolds, startVm, tempDir } from "../helpers/qemu.js";

const KiB = 1024;
const MiB = 1024 * KiB;

async function info(d: RunningDaemon, domain: string, completed = false) {
  const r = await cli(d.socket, ["--json", "domjobinfo", domain, ...(completed ? ["--completed"] : [])]);
  return {
    code: r.code,
    job: r.code === 0 ? (JSON.parse(r.stdout) as { state: string; active: boolean; error?: string; disks: { file: string }[] }) : undefined,
  };
}

/** A VM whose vda holds 1 MiB pieces with gaps, so a rate-limited push takes many chunks. */
async function dataVm(t: Parameters<typeof startVm>[0]) {
  const vm = await startVm(t, { disks: [{ size: "16M" }, { size: "16M" }] });
  for (let off = 0; off < 16 * MiB; off += 2 * MiB) await vm.write(0, 0x61, off, MiB);
  return vm;
}

t.test("kill -9 of the daemon mid-push: the job is adopted and completes; wait reports it", async (t) => {
  const vm = await dataVm(t);
  const dir = tempDir(t, "qbackupd-daemon-");
  const d1 = await startDaemon(t, { dir });
  t.equal((await cli(d1.socket, ["domain-add", "vm", "--qmp", vm.qmpPath])).code, 0);
  await connected(d1, "vm");
  // slow from the start (vda's 8 MiB at 64 KiB/s: two minutes), so the push is certainly running when the daemon dies
  t.equal((await cli(d1.socket, ["backup-begin", "vm", "--bandwidth", "65536"])).code, 0);
  await d1.stop("SIGKILL");
  const d2 = await startDaemon(t, { dir });
  await connected(d2, "vm");
  const running = await info(d2, "vm");
  t.equal(running.job?.state, "inprogress", "the running push was adopted");
  const api = new ApiClient(d2.socket);
  await api.request("PUT", "/v1/domains/vm/backup/bandwidth", { bandwidth: 0 });
  const w = await cli(d2.socket, ["wait", "vm", "--timeout", "60"]);
  t.equal(w.code, 0, `wait: ${w.stdout}${w.stderr}`);
  const done = await info(d2, "vm", true);
  t.equal(done.job?.state, "ready");
  for (let off = 0; off < 16 * MiB; off += 2 * MiB)
    t.ok(await rangeHolds(done.job!.disks[0]!.file, "qcow2", 0x61, off, MiB), `target holds the data at ${off / MiB} MiB`);
  t.same(await leftovers(vm.monitor), []);
  t.notOk(existsSync(join(dir, "state", "jobs", "vm.json")), "job record removed");
  t.match(d2.log(), /adopting the backup job after a restart/);
});

t.test("a push that finished while the daemon was down: outcome recorded, cleanup done", async (t) => {
  const vm = await dataVm(t);
  const dir = tempDir(t, "qbackupd-daemon-");
  const d1 = await startDaemon(t, { dir });
  await addDomain(d1, "vm", vm.qmpPath);
  // slow from the start (set in the begin itself, no race with the job): vda's 8 MiB at 64 KiB/s
  // take two minutes, so its job is certainly still running when the daemon dies
  t.equal((await cli(d1.socket, ["backup-begin", "vm", "--bandwidth", "65536"])).code, 0);
  await d1.stop("SIGKILL");
  // finish the jobs behind the daemon's back; vdb's (an empty disk: one rate-limit slice) may
  // have concluded already, vda's must still be running and take the new speed
  const jobs = (await vm.monitor.execute("query-jobs"))._unsafeUnwrap();
  const vdaJob = jobs.find((j) => j.id.endsWith("-j0"));
  t.equal(vdaJob?.status, "running", "vda's job outlived the daemon");
  for (const j of jobs) {
    const r = await vm.monitor.execute("block-job-set-speed", { device: j.id, speed: 0 });
    if (j === vdaJob) t.ok(r.isOk(), "vda's job sped up behind the daemon's back");
    else if (r.isErr()) t.match(r.error, { desc: /state 'concluded'|state 'pending'|state 'waiting'/ }, `${j.id} had finished already`);
  }
  await until("jobs concluded", async () =>
    (await vm.monitor.execute("query-jobs"))._unsafeUnwrap().every((j) => j.status === "concluded"),
  );
  const d2 = await startDaemon(t, { dir });
  await connected(d2, "vm");
  const w = await cli(d2.socket, ["wait", "vm", "--timeout", "30"]);
  t.equal(w.code, 0, "wait after the restart reports success");
  t.equal((await info(d2, "vm", true)).job?.state, "ready");
  t.same(await leftovers(vm.monitor), [], "jobs dismissed, target nodes removed");
});

t.test("kill -9 mid-pull: exports still listed after the restart, domjobabort tears everything down", async (t) => {
  const vm = await dataVm(t);
  const dir = tempDir(t, "qbackupd-daemon-");
  const d1 = await startDaemon(t, { dir });
  await addDomain(d1, "vm", vm.qmpPath);
  const sock = join(dir, "state", "backups", "nbd.sock");
  const px = join(vm.dir, "pull.xml");
  writeFileSync(px, `<domainbackup mode='pull'><server transport='unix' socket='${sock}'/></domainbackup>`);
  t.equal((await cli(d1.socket, ["backup-begin", "vm", px])).code, 0);
  await d1.stop("SIGKILL");
  const d2 = await startDaemon(t, { dir });
  await connected(d2, "vm");
  const dump = await cli(d2.socket, ["backup-dumpxml", "vm"]);
  t.equal(dump.code, 0);
  t.match(dump.stdout, /exportname='vda'/);
  t.ok(await rangeHolds(`nbd+unix:///vda?socket=${sock}`, "raw", 0x61, 0, MiB), "the export still serves");
  const scratch = readdirSync(join(dir, "state", "backups", "vm"));
  t.equal(scratch.length, 2, "two scratch files while the pull runs");
  t.equal((await cli(d2.socket, ["domjobabort", "vm"])).code, 0);
  t.same(await leftovers(vm.monitor), []);
  t.same(readdirSync(join(dir, "state", "backups", "vm")), [], "scratch files removed");
  t.notOk(existsSync(sock), "NBD server stopped");
});

t.test("leftovers of a crash mid-begin are found and removed at the next start", async (t) => {
  const vm = await dataVm(t);
  const dir = tempDir(t, "qbackupd-daemon-");
  const d1 = await startDaemon(t, { dir });
  await addDomain(d1, "vm", vm.qmpPath);
  t.equal((await cli(d1.socket, ["checkpoint-create-as", "vm", "base"])).code, 0, "checkpoint 'base' created");
  const sock = join(dir, "state", "backups", "nbd.sock");
  const px = join(vm.dir, "pull.xml");
  writeFileSync(px, `<domainbackup mode='pull'><incremental>base</incremental><server transport='unix' socket='${sock}'/></domainbackup>`);
  t.equal((await cli(d1.socket, ["backup-begin", "vm", px])).code, 0);
  await d1.stop("SIGKILL");
  // as if the crash came before the job was recorded as started
  const recFile = join(dir, "state", "jobs", "vm.json");
  const rec = JSON.parse(readFileSync(recFile, "utf8")) as { state: string };
  rec.state = "begin";
  writeFileSync(recFile, JSON.stringify(rec));
  // and an unrecorded node from an even older crash
  const stray = join(vm.dir, "stray.qcow2");
  await import("../helpers/qemu.js").then((h) => h.createImage(stray, "16M"));
  (
    await vm.monitor.execute("blockdev-add", { "node-name": "qbk-t9", driver: "qcow2", file: { driver: "file", filename: stray } })
  )._unsafeUnwrap();
  t.ok((await leftovers(vm.monitor)).length > 3, "nodes, jobs, exports and temporary bitmaps are there");
  const d2 = await startDaemon(t, { dir });
  await connected(d2, "vm");
  await until("record gone", async () => !existsSync(recFile));
  // the older debris goes right after the job's own undo (recovery.ts): wait for it, do not race it
  await until("leftovers removed", async () => (await leftovers(vm.monitor)).length === 0, 10_000).catch(() => {});
  t.same(await leftovers(vm.monitor), [], "jobs, exports, nodes and temporary bitmaps removed");
  t.same(readdirSync(join(dir, "state", "backups", "vm")), [], "scratch files removed");
  const ji = await info(d2, "vm", true);
  t.match(ji.job, { state: "failed", error: /stopped while the backup was starting/ });
  t.match(d2.log(), /removed leftovers of an interrupted backup|backup failed/);
  t.equal((await cli(d2.socket, ["checkpoint-list", "vm", "--name"])).stdout, "base\n", "the old checkpoint is untouched");
});

t.test("QEMU killed mid-backup: failed with the reason, nothing left, others unaffected, reconnect when it is back", async (t) => {
  const vm = await dataVm(t);
  const other = await startVm(t, { disks: [{ size: "16M" }] });
  const d = await startDaemon(t);
  await cli(d.socket, ["domain-add", "vm", "--qmp", vm.qmpPath]);
  await cli(d.socket, ["domain-add", "other", "--qmp", other.qmpPath]);
  await connected(d, "vm");
  await connected(d, "other");
  t.equal((await cli(d.socket, ["checkpoint-create-as", "vm", "c0"])).code, 0);
  const cp = join(vm.dir, "cp.xml");
  writeFileSync(cp, "<domaincheckpoint><name>c1</name></domaincheckpoint>");
  t.equal((await cli(d.socket, ["backup-begin", "vm", "", cp, "--bandwidth", "65536"])).code, 0);
  const files = (await info(d, "vm")).job!.disks.map((x) => x.file);
  t.ok(files.every((f) => existsSync(f)));
  const images = vm.disks.map((x) => x.path);
  await vm.kill("SIGKILL");
  const w = await cli(d.socket, ["wait", "vm", "--timeout", "30"]);
  t.equal(w.code, 1, "wait: failed");
  const ji = await info(d, "vm", true);
  t.match(ji.job, { state: "failed", error: /QEMU went away/ });
  t.ok(
    files.every((f) => !existsSync(f)),
    "partial targets removed",
  );
  t.equal((await cli(d.socket, ["checkpoint-list", "vm", "--name"])).stdout, "c0\n", "no checkpoint claims the failed backup");
  // the other domain is served meanwhile
  t.equal((await cli(d.socket, ["backup-begin", "other"])).code, 0);
  t.equal((await cli(d.socket, ["wait", "other"])).code, 0);
  // the VM comes back: reconnect; c0's bitmap died with the crash, so an incremental from it is refused
  const vm2 = await startVm(t, { images, dir: vm.dir });
  void vm2;
  await connected(d, "vm");
  const list = JSON.parse((await cli(d.socket, ["--json", "checkpoint-list", "vm"])).stdout) as { name: string; valid: boolean }[];
  t.same(
    list.map((c) => [c.name, c.valid]),
    [["c0", false]],
  );
  const bx = join(vm.dir, "inc.xml");
  writeFileSync(bx, "<domainbackup><incremental>c0</incremental></domainbackup>");
  const refused = await cli(d.socket, ["backup-begin", "vm", bx]);
  t.equal(refused.code, 4);
  t.match(refused.stderr, /checkpoint 'c0' cannot be used: bitmap 'c0' on disk 'vda' is missing/);
  // a full backup with a new checkpoint starts a valid chain
  writeFileSync(cp, "<domaincheckpoint><name>c2</name></domaincheckpoint>");
  t.equal((await cli(d.socket, ["backup-begin", "vm", "", cp])).code, 0);
  t.equal((await cli(d.socket, ["wait", "vm"])).code, 0);
  writeFileSync(bx, "<domainbackup><incremental>c2</incremental></domainbackup>");
  t.equal((await cli(d.socket, ["backup-begin", "vm", bx])).code, 0);
  t.equal((await cli(d.socket, ["wait", "vm"])).code, 0);
});

t.test("a QMP peer that hangs does not affect other domains", async (t) => {
  const hung = await startFakeQmp(t, () => {}); // greets, negotiates, never answers again
  const vm = await startVm(t, { disks: [{ size: "16M" }] });
  const d = await startDaemon(t);
  await cli(d.socket, ["domain-add", "hung", "--qmp", hung.path]);
  await cli(d.socket, ["domain-add", "vm", "--qmp", vm.qmpPath]);
  await connected(d, "vm");
  const s = Date.now();
  const list = await cli(d.socket, ["--json", "domain-list"]);
  // waiting on the hung peer would take the daemon's QMP command timeout (60 s); the bound leaves room for a loaded machine
  t.ok(Date.now() - s < 10_000, `the API answers without waiting for the hung peer (${Date.now() - s} ms)`);
  t.match(JSON.parse(list.stdout), [
    { name: "hung", state: "connecting" },
    { name: "vm", state: "connected" },
  ]);
  t.equal((await cli(d.socket, ["backup-begin", "vm"])).code, 0);
  t.equal((await cli(d.socket, ["wait", "vm"])).code, 0);
  t.equal((await cli(d.socket, ["backup-begin", "hung"])).code, 5, "the hung domain is not connected: exit 5");
});
