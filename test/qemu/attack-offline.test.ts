/**
 * Attacks on offline backups (issue 13): what the storage daemon opens, and
 * what a crash or a stuck process leaves. Through the CLI against real QEMU.
 */
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { addDomain, cliOn, fileWriter, startDaemon, until } from "../helpers/daemon.js";
import { imageFree, killedMidPush, shutDown, storageDaemons } from "../helpers/offline.js";
import { createImage, startVm } from "../helpers/qemu.js";

const KiB = 1024;
const MiB = 1024 * KiB;

t.test("an external snapshot seen while the VM ran: offline backups are refused, never of the stale base", async (t) => {
  const vm = await startVm(t, { disks: [{ size: "16M" }] });
  const d = await startDaemon(t);
  const { q, ok } = cliOn(t, d.socket);
  const file = fileWriter(vm.dir);
  await addDomain(d, "vm1", vm.qmpPath);
  await vm.write(0, 0x11, 0, MiB);
  await ok("backup-begin", "vm1", "", file("c1.xml", "<domaincheckpoint><name>c1</name></domaincheckpoint>"));
  await ok("wait", "vm1", "--timeout", "60");
  // another tool takes an external snapshot; the guest then writes into the overlay
  const ov = join(vm.dir, "ov1.qcow2");
  await createImage(ov, "16M");
  (
    await vm.monitor.execute("blockdev-add", { driver: "qcow2", "node-name": "ov1", file: { driver: "file", filename: ov }, backing: null })
  )._unsafeUnwrap();
  (await vm.monitor.executeRaw("blockdev-snapshot", { node: vm.disks[0]!.node, overlay: "ov1" }))._unsafeUnwrap();
  await vm.write(0, 0x12, 3 * MiB, 128 * KiB);
  // the daemon looks at the disks every few seconds: it sees the overlay before the VM stops. QEMU names it
  // json:{…} (its header names no backing file; QEMU was given the chain): opened alone it is other data
  const memory = () => JSON.parse(readFileSync(join(d.stateDir, "images", "vm1.json"), "utf8")) as { unopenable: string[] };
  await until("the overlay seen", async () => memory().unopenable.includes("vda"), 15_000);
  await shutDown(vm);
  await until("offline", async () => (await ok("domain-list")).stdout.includes("offline"));
  const inc = await q("backup-begin", "vm1", file("inc-c1.xml", "<domainbackup><incremental>c1</incremental></domainbackup>"));
  t.not(inc.code, 0, "the incremental is refused");
  t.match(inc.stderr, /cannot be backed up offline: QEMU last had disk\(s\) 'vda' opened in a way the image file alone does not give/);
  const fullOff = await q("backup-begin", "vm1");
  t.not(fullOff.code, 0, `a full too: ${fullOff.stderr.trim()}`);
  t.equal((await q("checkpoint-create-as", "vm1", "c9")).code === 0, false, "and a checkpoint");
  t.equal(storageDaemons(), 0, "no storage daemon left by the refusals");
  t.ok(await imageFree(ov), "the overlay is free");
});

t.test(
  "a daemon and its storage daemon both killed mid offline push: the job is failed, its target removed, the next backup runs",
  async (t) => {
    const { image, target, again } = await killedMidPush(t, "SIGKILL");
    await until("the job known failed", async () => {
      const r = await again.q("--json", "domjobinfo", "vm1", "--completed");
      return r.code === 0 && (JSON.parse(r.stdout) as { state: string }).state === "failed";
    });
    t.notOk(existsSync(target), "the partial target is removed");
    t.ok(await imageFree(image), "the image is free");
    await again.ok("backup-begin", "vm1");
    const w = await again.ok("--json", "wait", "vm1", "--timeout", "60");
    t.match(JSON.parse(w.stdout), { state: "ready" }, "the next offline backup completes");
    await until("storage daemon ended", async () => storageDaemons() === 0);
  },
);

t.test("a leftover storage daemon that does not answer (stopped) at start: it is ended, not orphaned with its image lock", async (t) => {
  const { image, sd } = await killedMidPush(t, "SIGSTOP");
  // the new daemon has given up on it (its connect timed out): it runs again, slow but alive
  await new Promise((r) => setTimeout(r, 8000));
  try {
    process.kill(sd, "SIGCONT");
  } catch {
    // already gone
  }
  await until("no storage daemon left", async () => storageDaemons() === 0 && (await imageFree(image)), 15_000);
});
