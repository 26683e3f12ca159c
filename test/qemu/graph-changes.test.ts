/**
 * Disk chains that change under the daemon: someone else (a script, another
 * tool) takes an external snapshot, commits it back or streams the base into
 * the overlay between checkpoints. Through the CLI against real QEMU, each
 * incremental is exact (restored byte-exact against the disk as the guest
 * saw it) or refused with the reason; new checkpoints go on the active
 * layer; deleting a checkpoint whose bitmap stayed on a backing layer
 * removes its metadata and leaves the bitmap (QEMU holds that layer
 * read-only and refuses to change it; it records nothing there).
 *
 * When an incremental since a checkpoint is exact after a graph change:
 * - snapshot (overlay on top): no. The checkpoint's bitmap stays on the old
 *   top, now a backing layer, where guest writes no longer go; the overlay's
 *   clusters would have to be added to it, and QEMU offers no command that
 *   turns allocation into bitmap bits. Refused, with the reason.
 * - commit of that overlay back into the base: yes. The commit writes every
 *   cluster the overlay held into the base, through the base, so the base's
 *   bitmaps mark them; with the writes before the snapshot and after the
 *   commit, the bitmap holds every change since the checkpoint (a superset,
 *   which loses nothing). A checkpoint made on the overlay meanwhile is gone
 *   with it (QEMU's commit does not carry bitmaps down): refused.
 * - stream of the base into the overlay: checkpoints on the overlay stay
 *   exact (a stream changes nothing the guest sees); those on the streamed
 *   base are gone with it: refused.
 */
import { join } from "node:path";
import t, { type Test } from "tap";
import { allocatedRanges, handBackups, rebaseOnto } from "../helpers/backup.js";
import { addDomain, cliOn, fileWriter, startDaemon } from "../helpers/daemon.js";
import { leftovers, waitJob } from "../helpers/domain.js";
import { createImage, imagesIdentical, type QemuProcess, startVm } from "../helpers/qemu.js";

const KiB = 1024;
const MiB = 1024 * KiB;

interface CheckpointJson {
  name: string;
  valid: boolean | null;
  problems: string[];
}

async function setup(t: Test) {
  const vm = await startVm(t, { disks: [{ size: "16M" }] });
  const d = await startDaemon(t);
  await addDomain(d, "vm1", vm.qmpPath);
  const { q, ok, lastFile } = cliOn(t, d.socket);
  const file = fileWriter(vm.dir);
  /** A push since `since` (undefined: full) creating checkpoint `cp` (undefined: none); the target's path. */
  const push = async (since: string | undefined, cp: string | undefined) => {
    const bx = since === undefined ? "" : file(`inc-${since}.xml`, `<domainbackup><incremental>${since}</incremental></domainbackup>`);
    const cx = cp === undefined ? [] : [file(`${cp}.xml`, `<domaincheckpoint><name>${cp}</name></domaincheckpoint>`)];
    await ok("backup-begin", "vm1", bx, ...cx);
    await ok("wait", "vm1", "--timeout", "60");
    return lastFile();
  };
  const checkpoints = async () => JSON.parse((await ok("--json", "checkpoint-list", "vm1")).stdout) as CheckpointJson[];
  return { vm, d, q, ok, file, push, checkpoints };
}

/** The guest's view of the disk (the device's top node) as a standalone image. */
async function guestView(vm: QemuProcess, top: string, name: string): Promise<string> {
  const f = join(vm.dir, `${name}.qcow2`);
  await handBackups(vm.monitor, "16M", [{ node: top, target: f, sync: "full" }]);
  return f;
}

/** Bitmap names per node, for the nodes named. */
async function bitmapsOn(vm: QemuProcess, nodes: readonly string[]): Promise<Record<string, string[]>> {
  const all = (await vm.monitor.execute("query-named-block-nodes", { flat: true }))._unsafeUnwrap();
  const out: Record<string, string[]> = {};
  for (const n of nodes)
    out[n] = (all.find((x) => x["node-name"] === n)?.["dirty-bitmaps"] ?? []).flatMap((b) => (b.name === undefined ? [] : [b.name])).sort();
  return out;
}

/** An external snapshot as another tool takes it: a new overlay `node` on top of `base`. */
async function snapshot(vm: QemuProcess, base: string, node: string): Promise<void> {
  const f = join(vm.dir, `${node}.qcow2`);
  await createImage(f, "16M");
  (
    await vm.monitor.execute("blockdev-add", { driver: "qcow2", "node-name": node, file: { driver: "file", filename: f }, backing: null })
  )._unsafeUnwrap();
  (await vm.monitor.executeRaw("blockdev-snapshot", { node: base, overlay: node }))._unsafeUnwrap();
}

t.test(
  "external snapshot: the checkpoint below is refused with the reason; new ones go on the overlay; delete leaves the read-only layer alone",
  async (t) => {
    const { vm, q, ok, file, push, checkpoints } = await setup(t);
    await vm.write(0, 0x11, 0, MiB);
    await push(undefined, "c1");
    await vm.write(0, 0x12, 2 * MiB, 64 * KiB);
    await snapshot(vm, "drive-vda", "ov1");
    await vm.write(0, 0x13, 3 * MiB, 64 * KiB);

    const c1 = (await checkpoints()).find((c) => c.name === "c1")!;
    t.equal(c1.valid, false, "c1 is shown invalid");
    t.match(c1.problems.join("\n"), /bitmap 'c1' on disk 'vda' is on a backing layer \(node 'drive-vda'\): an overlay was put on top/);
    const refused = await q("backup-begin", "vm1", file("inc-c1.xml", "<domainbackup><incremental>c1</incremental></domainbackup>"));
    t.not(refused.code, 0, "an incremental since c1 is refused");
    t.match(refused.stderr, /checkpoint 'c1' cannot be used: bitmap 'c1' on disk 'vda' is on a backing layer/);
    t.same(await leftovers(vm.monitor), [], "the refusal touched nothing");

    // a new chain: a full with c2 lands its bitmap on the overlay, the active layer
    const full2 = await push(undefined, "c2");
    t.same(await bitmapsOn(vm, ["ov1", "drive-vda"]), { ov1: ["c2"], "drive-vda": ["c1"] }, "c2 on the active layer");
    await vm.write(0, 0x14, 5 * MiB, 128 * KiB);
    const now = await guestView(vm, "ov1", "now");
    const inc2 = await push("c2", undefined);
    t.same(await allocatedRanges(inc2), [[5 * MiB, 128 * KiB]], "since c2: exactly the written clusters");
    await rebaseOnto(inc2, full2);
    const cmp = await imagesIdentical(inc2, now);
    t.ok(cmp.identical, `full(c2) + incremental = the guest's disk: ${cmp.output}`);

    // deleting c1: QEMU holds the backing layer read-only and refuses to touch its bitmaps ("is readonly"); the
    // metadata goes, the bitmap stays there recording nothing (it used to fail the whole delete)
    await ok("checkpoint-delete", "vm1", "c1");
    t.equal((await ok("checkpoint-list", "vm1", "--name")).stdout, "c2\n");
    t.same(await bitmapsOn(vm, ["ov1", "drive-vda"]), { ov1: ["c2"], "drive-vda": ["c1"] }, "c1's bitmap left on the read-only layer");
    t.same(await leftovers(vm.monitor), []);
  },
);

t.test("commit of the overlay back into the base: the checkpoint below holds every change again, exact", async (t) => {
  const { vm, q, ok, file, push, checkpoints } = await setup(t);
  await vm.write(0, 0x21, 0, MiB);
  const full1 = await push(undefined, "c1");
  await vm.write(0, 0x22, 2 * MiB, 64 * KiB);
  await snapshot(vm, "drive-vda", "ov1");
  await vm.write(0, 0x23, 3 * MiB, 64 * KiB);
  // a checkpoint made while the overlay is on top lives on the overlay
  await ok("checkpoint-create-as", "vm1", "c2");
  await vm.write(0, 0x24, 4 * MiB, 64 * KiB);
  // active commit, as another tool runs it; then the overlay is deleted (libvirt does the same)
  (await vm.monitor.executeRaw("block-commit", { "job-id": "cm", device: "ov1", "base-node": "drive-vda" }))._unsafeUnwrap();
  await waitJob(vm.monitor, "cm", "ready");
  (await vm.monitor.executeRaw("job-complete", { id: "cm" }))._unsafeUnwrap();
  await waitJob(vm.monitor, "cm", "gone");
  (await vm.monitor.execute("blockdev-del", { "node-name": "ov1" }))._unsafeUnwrap();
  await vm.write(0, 0x25, 6 * MiB, 64 * KiB);

  const list = await checkpoints();
  t.equal(list.find((c) => c.name === "c1")?.valid, true, "c1 is valid again: its bitmap recorded the committed clusters");
  const c2 = list.find((c) => c.name === "c2")!;
  t.equal(c2.valid, false, "c2 went with the overlay");
  t.match(c2.problems.join("\n"), /bitmap 'c2' on disk 'vda' is missing/);
  const refused = await q("backup-begin", "vm1", file("inc-c2.xml", "<domainbackup><incremental>c2</incremental></domainbackup>"));
  t.not(refused.code, 0, "an incremental since c2 is refused");
  t.match(refused.stderr, /checkpoint 'c2' cannot be used: bitmap 'c2' on disk 'vda' is missing/);

  const now = await guestView(vm, "drive-vda", "now");
  const inc1 = await push("c1", undefined);
  const got = await allocatedRanges(inc1);
  for (const off of [2, 3, 4, 6])
    t.ok(
      got.some(([o, l]) => o <= off * MiB && off * MiB + 64 * KiB <= o + l),
      `the write at ${off} MiB (before, during and after the overlay) is in it`,
    );
  await rebaseOnto(inc1, full1);
  const cmp = await imagesIdentical(inc1, now);
  t.ok(cmp.identical, `full(c1) + incremental since c1 = the guest's disk: ${cmp.output}`);
  t.same(await leftovers(vm.monitor), []);
});

t.test("stream of the base into the overlay: checkpoints on the overlay stay exact; those on the base are refused", async (t) => {
  const { vm, q, ok, file, push, checkpoints } = await setup(t);
  await vm.write(0, 0x31, 0, MiB);
  await push(undefined, "c1");
  await snapshot(vm, "drive-vda", "ov1");
  await vm.write(0, 0x32, 2 * MiB, 64 * KiB);
  const full2 = await push(undefined, "c2");
  await vm.write(0, 0x33, 3 * MiB, 64 * KiB);
  (await vm.monitor.executeRaw("block-stream", { "job-id": "st", device: "ov1" }))._unsafeUnwrap();
  await waitJob(vm.monitor, "st", "gone");
  // the base backs nothing now; deleted, as libvirt does
  (await vm.monitor.execute("blockdev-del", { "node-name": "drive-vda" }))._unsafeUnwrap();
  await vm.write(0, 0x34, 5 * MiB, 64 * KiB);

  const list = await checkpoints();
  t.equal(list.find((c) => c.name === "c2")?.valid, true, "c2, on the overlay, stays valid");
  const c1 = list.find((c) => c.name === "c1")!;
  t.equal(c1.valid, false);
  t.match(c1.problems.join("\n"), /bitmap 'c1' on disk 'vda' is missing/);
  const refused = await q("backup-begin", "vm1", file("inc-c1.xml", "<domainbackup><incremental>c1</incremental></domainbackup>"));
  t.not(refused.code, 0, "an incremental since c1 is refused");

  const now = await guestView(vm, "ov1", "now");
  const inc2 = await push("c2", undefined);
  const got = await allocatedRanges(inc2);
  for (const off of [3, 5])
    t.ok(
      got.some(([o, l]) => o <= off * MiB && off * MiB + 64 * KiB <= o + l),
      `the write at ${off} MiB is in it`,
    );
  await rebaseOnto(inc2, full2);
  const cmp = await imagesIdentical(inc2, now);
  t.ok(cmp.identical, `full(c2) + incremental since c2 = the guest's disk: ${cmp.output}`);
  await ok("checkpoint-delete", "vm1", "c1");
  t.same(await leftovers(vm.monitor), []);
});
