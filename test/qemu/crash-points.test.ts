/**
 * The daemon killed (SIGKILL) at every point between a job-record write and
 * the step it precedes (QBACKUPD_CRASH_AT, src/util/crash-point.ts), then
 * started again: a backup caught while starting fails and everything it did
 * is undone (files, nodes, jobs, exports, bitmaps, the checkpoint it was
 * creating); one caught while finishing completes as if nothing happened.
 */
import { existsSync, readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { cli, connected, startDaemon, until } from "../helpers/daemon.js";
import { bitmapNames, leftovers } from "../helpers/domain.js";
import { rangeHolds, startVm, tempDir } from "../helpers/qemu.js";

const MiB = 1024 * 1024;

const STARTING = ["begin:files", "begin:nodes", "begin:transaction", "begin:checkpoint"] as const;
const FINISHING = ["concluded:dismiss", "ready:sync", "ready:record"] as const;
// after a step, before the record says so: recovery must learn from QEMU and the
// checkpoint store (issue 11: B6, the checkpoint committed but not recorded; B5,
// the NBD server started but not recorded)
const STEP_DONE = ["begin:transaction:done", "begin:checkpoint:done"] as const;
const CASES: { point: string; mode: "push" | "pull"; raw?: true }[] = [
  ...[...STARTING, ...STEP_DONE].map((point) => ({ point, mode: "push" as const })),
  ...[...STARTING, "begin:exports", "begin:checkpoint:done", "begin:exports:done"].map((point) => ({ point, mode: "pull" as const })),
  ...FINISHING.map((point) => ({ point, mode: "push" as const })),
  // vdb raw: the checkpoint's bitmap there is volatile and has a live marker beside it, undone or kept with it
  ...["begin:transaction:done", "begin:checkpoint", "begin:checkpoint:done", "ready:record"].map((point) => ({
    point,
    mode: "push" as const,
    raw: true as const,
  })),
  ...["begin:checkpoint:done"].map((point) => ({ point, mode: "pull" as const, raw: true as const })),
];

for (const { point, mode, raw } of CASES) {
  t.test(`${mode}${raw ? " (vdb raw)" : ""}: daemon killed at ${point}`, async (t) => {
    const vm = await startVm(t, { disks: [{ size: "16M" }, { size: "16M", ...(raw ? { format: "raw" as const } : {}) }] });
    // a raw disk's checkpoint bitmaps each have a live marker (qbk-live-…) beside them
    const bitmaps = async () => (await bitmapNames(vm.monitor)).map((n) => (n?.startsWith("qbk-live-") ? "marker" : n));
    const markers = (n: number) => (raw ? Array<string>(n).fill("marker") : []);
    await vm.write(0, 0x5a, 0, 4 * MiB);
    await vm.write(1, 0x5b, 8 * MiB, 2 * MiB);
    const dir = tempDir(t, "qbackupd-daemon-");
    const d1 = await startDaemon(t, { dir, env: { QBACKUPD_CRASH_AT: point } });
    const died = new Promise<NodeJS.Signals | null>((r) => d1.proc.once("exit", (_c, s) => r(s)));
    t.equal((await cli(d1.socket, ["domain-add", "vm", "--qmp", vm.qmpPath])).code, 0);
    await connected(d1, "vm");
    t.equal((await cli(d1.socket, ["checkpoint-create-as", "vm", "base"])).code, 0);
    const cpXml = join(vm.dir, "cp.xml");
    writeFileSync(cpXml, "<domaincheckpoint><name>c1</name></domaincheckpoint>");
    const sock = join(dir, "state", "backups", "nbd.sock");
    const bx = join(vm.dir, "backup.xml");
    writeFileSync(
      bx,
      mode === "pull" ? `<domainbackup mode='pull'><server transport='unix' socket='${sock}'/></domainbackup>` : "<domainbackup/>",
    );
    await cli(d1.socket, ["backup-begin", "vm", bx, cpXml]);
    const signal = await Promise.race([died, new Promise((r) => setTimeout(() => r("still alive"), 20_000))]);
    t.equal(signal, "SIGKILL", `the daemon died at ${point}`);

    const d2 = await startDaemon(t, { dir });
    await connected(d2, "vm");
    const recFile = join(dir, "state", "jobs", "vm.json");
    if ((FINISHING as readonly string[]).includes(point)) {
      const w = await cli(d2.socket, ["--json", "wait", "vm", "--timeout", "30"]);
      t.equal(w.code, 0, `wait: ${w.stdout}${w.stderr}`);
      const done = JSON.parse(w.stdout) as { state: string; disks: { file: string }[] };
      t.equal(done.state, "ready");
      t.ok(await rangeHolds(done.disks[0]!.file, "qcow2", 0x5a, 0, 4 * MiB), "vda's target holds its data");
      t.ok(await rangeHolds(done.disks[1]!.file, "qcow2", 0x5b, 8 * MiB, 2 * MiB), "vdb's target holds its data");
      t.equal((await cli(d2.socket, ["checkpoint-list", "vm", "--name"])).stdout, "base\nc1\n", "the new checkpoint stays");
      t.same(await bitmaps(), ["base", "base", "c1", "c1", ...markers(2)]);
    } else {
      await until("the interrupted backup failed", async () => !existsSync(recFile), 15_000);
      const r = await cli(d2.socket, ["--json", "domjobinfo", "vm", "--completed"]);
      t.match(JSON.parse(r.stdout), { state: "failed", error: /stopped while the backup was starting/ });
      t.equal((await cli(d2.socket, ["checkpoint-list", "vm", "--name"])).stdout, "base\n", "no checkpoint claims it");
      t.same(await bitmaps(), ["base", "base", ...markers(1)], "c1's bitmaps are gone from QEMU (and its marker)");
      const backups = join(dir, "state", "backups", "vm");
      t.same(existsSync(backups) ? readdirSync(backups) : [], [], "no target or scratch file left");
      t.notOk(existsSync(sock), "no NBD server");
    }
    t.same(await leftovers(vm.monitor), [], "no node, job, export or temporary bitmap left in QEMU");
    t.notOk(existsSync(recFile), "no job record left");
    // and the domain backs up normally again (a pull on the same socket: no NBD server of the old job is left)
    const again = await cli(d2.socket, ["--json", "backup-begin", "vm", ...(mode === "pull" ? [bx] : [])]);
    t.equal(again.code, 0, again.stderr);
    t.equal(JSON.parse((await cli(d2.socket, ["--json", "wait", "vm", "--timeout", "30"])).stdout).state, "ready");
    if (mode === "pull") {
      t.ok(await rangeHolds(`nbd+unix:///vda?socket=${sock}`, "raw", 0x5a, 0, 4 * MiB), "the new pull serves vda");
      t.equal((await cli(d2.socket, ["domjobabort", "vm"])).code, 0, "the new pull ends");
    }
  });
}

// killed once begin's answer is ready, before it is sent: what begin would have
// answered ("started"/"ready") must already be on disk, so the job is adopted
for (const mode of ["push", "pull"] as const) {
  t.test(`${mode}: daemon killed as begin answers: the backup is adopted, not failed`, async (t) => {
    const vm = await startVm(t, { disks: [{ size: "16M" }, { size: "16M" }] });
    await vm.write(0, 0x5a, 0, 4 * MiB);
    await vm.write(1, 0x5b, 8 * MiB, 2 * MiB);
    const dir = tempDir(t, "qbackupd-daemon-");
    const d1 = await startDaemon(t, { dir, env: { QBACKUPD_CRASH_AT: "begin:answered" } });
    const died = new Promise<NodeJS.Signals | null>((r) => d1.proc.once("exit", (_c, s) => r(s)));
    t.equal((await cli(d1.socket, ["domain-add", "vm", "--qmp", vm.qmpPath])).code, 0);
    const sock = join(dir, "state", "backups", "nbd.sock");
    const bx = join(vm.dir, "backup.xml");
    const cpXml = join(vm.dir, "cp.xml");
    writeFileSync(cpXml, "<domaincheckpoint><name>c1</name></domaincheckpoint>");
    writeFileSync(
      bx,
      mode === "pull" ? `<domainbackup mode='pull'><server transport='unix' socket='${sock}'/></domainbackup>` : "<domainbackup/>",
    );
    await cli(d1.socket, ["backup-begin", "vm", bx, cpXml]);
    const signal = await Promise.race([died, new Promise((r) => setTimeout(() => r("still alive"), 20_000))]);
    t.equal(signal, "SIGKILL", "the daemon died as begin answered");
    const d2 = await startDaemon(t, { dir });
    await connected(d2, "vm");
    const w = await cli(d2.socket, ["--json", "wait", "vm", "--timeout", "30"]);
    t.equal(w.code, 0, `wait: ${w.stdout}${w.stderr}`);
    const done = JSON.parse(w.stdout) as { state: string; disks: { file?: string; exportName?: string }[] };
    t.equal(done.state, "ready", "adopted and ready");
    if (mode === "push") {
      t.ok(await rangeHolds(done.disks[0]!.file!, "qcow2", 0x5a, 0, 4 * MiB), "vda's target holds its data");
      t.ok(await rangeHolds(done.disks[1]!.file!, "qcow2", 0x5b, 8 * MiB, 2 * MiB), "vdb's target holds its data");
    } else {
      t.ok(await rangeHolds(`nbd+unix:///vda?socket=${sock}`, "raw", 0x5a, 0, 4 * MiB), "vda served over NBD");
      t.equal((await cli(d2.socket, ["domjobabort", "vm"])).code, 0, "the pull ends");
      t.notOk(existsSync(sock), "its NBD server is gone");
    }
    t.equal((await cli(d2.socket, ["checkpoint-list", "vm", "--name"])).stdout, "c1\n", "the checkpoint stays");
    t.same(await leftovers(vm.monitor), [], "nothing left in QEMU");
  });
}
