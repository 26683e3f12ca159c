/**
 * A domain with a raw disk beside a qcow2 one (raw files, LVM volumes, RBD
 * images are common in production). A raw image cannot store a bitmap, so a
 * checkpoint covers it with a volatile one (non-persistent: in QEMU's memory
 * only). Through the CLI against real QEMU: incrementals of the raw disk are
 * exact while that QEMU process lives; once QEMU has restarted, the bitmap
 * is gone and an incremental of the raw disk is refused with the reason,
 * never guessed, while the qcow2 disk's chain goes on; a new full starts the
 * raw disk's chain again.
 */
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { allocatedRanges, rebaseOnto, snapshotDisks } from "../helpers/backup.js";
import { addDomain, cli, cliOn, connected, startDaemon } from "../helpers/daemon.js";
import { leftovers } from "../helpers/domain.js";
import { imagesIdentical, type QemuProcess, startVm } from "../helpers/qemu.js";

const KiB = 1024;
const MiB = 1024 * KiB;

interface JobJson {
  disks: { name: string; file: string }[];
}
interface CheckpointJson {
  name: string;
  valid: boolean | null;
  problems: string[];
  disks: { name: string; volatile?: boolean }[];
}

/** Bitmaps on each disk's node as QEMU has them: "node/name persistent|volatile"; a volatile bitmap's live marker as "node/live-marker". */
async function bitmapsOf(vm: QemuProcess): Promise<string[]> {
  const nodes = (await vm.monitor.execute("query-named-block-nodes", { flat: true }))._unsafeUnwrap();
  return nodes
    .filter((n) => vm.disks.some((d) => d.node === n["node-name"]))
    .flatMap((n) =>
      (n["dirty-bitmaps"] ?? []).map((b) =>
        b.name?.startsWith("qbk-live-") && !b.recording && b.count === 0
          ? `${n["node-name"]}/live-marker`
          : `${n["node-name"]}/${b.name} ${b.persistent ? "persistent" : "volatile"}`,
      ),
    )
    .sort();
}

t.test("a raw disk: a volatile bitmap, incrementals exact while QEMU lives, refused with the reason after it restarts", async (t) => {
  const formats = [{ size: "16M" }, { size: "16M", format: "raw" as const }];
  const vm = await startVm(t, { disks: formats });
  const d = await startDaemon(t);
  const { q, ok } = cliOn(t, d.socket);
  const completed = async () => JSON.parse((await ok("--json", "domjobinfo", "vm1", "--completed")).stdout) as JobJson;
  const checkpoints = async () => JSON.parse((await ok("--json", "checkpoint-list", "vm1")).stdout) as CheckpointJson[];
  const file = (name: string, xml: string) => {
    const p = join(vm.dir, name);
    writeFileSync(p, xml);
    return p;
  };
  await addDomain(d, "vm1", vm.qmpPath);

  // a full with checkpoint c1: the raw disk is in it, with a volatile bitmap
  await vm.write(0, 0x11, 0, MiB);
  await vm.write(1, 0x21, 2 * MiB, MiB);
  await ok("backup-begin", "vm1", "", file("c1.xml", "<domaincheckpoint><name>c1</name></domaincheckpoint>"));
  await ok("wait", "vm1", "--timeout", "60");
  const full = (await completed()).disks.map((x) => x.file);
  const dump = (await ok("checkpoint-dumpxml", "vm1", "c1")).stdout;
  t.match(dump, /<disk name='vda' checkpoint='bitmap' bitmap='c1'\/>/, "the qcow2 disk: persistent (libvirt's XML)");
  t.match(dump, /<disk name='vdb' checkpoint='bitmap' bitmap='c1' volatile='yes'\/>/, "the raw disk: volatile, said in the XML");
  t.same(
    await bitmapsOf(vm),
    ["drive-vda/c1 persistent", "drive-vdb/c1 volatile", "drive-vdb/live-marker"],
    "in QEMU, with c1's live marker on vdb",
  );
  const table = (await ok("checkpoint-list", "vm1")).stdout;
  t.match(table, /^ Name\s+Creation Time\s+Valid\s+Volatile\n/, "checkpoint-list has a Volatile column");
  t.match(table, /\n c1 \*\s+\S+ \S+ \S+\s+yes\s+vdb\n/);
  t.same(
    (await checkpoints())[0]?.disks.map((x) => [x.name, x.volatile === true]),
    [
      ["vda", false],
      ["vdb", true],
    ],
  );

  // guest writes, then an incremental since c1 (creating c2): exactly the written clusters, restored byte-exact
  await vm.write(1, 0x22, 5 * MiB, 128 * KiB);
  await vm.write(0, 0x12, 4 * MiB, 64 * KiB);
  const at2 = await snapshotDisks(vm, "at2", "16M");
  const inc = file("inc-c1.xml", "<domainbackup><incremental>c1</incremental></domainbackup>");
  await ok("backup-begin", "vm1", inc, file("c2.xml", "<domaincheckpoint><name>c2</name></domaincheckpoint>"));
  await ok("wait", "vm1", "--timeout", "60");
  const inc1 = (await completed()).disks.map((x) => x.file);
  t.same(await allocatedRanges(inc1[0]!), [[4 * MiB, 64 * KiB]], "vda: the written cluster");
  t.same(await allocatedRanges(inc1[1]!), [[5 * MiB, 128 * KiB]], "vdb (raw): exactly the written clusters");
  for (let i = 0; i < 2; i++) {
    await rebaseOnto(inc1[i]!, full[i]!);
    const cmp = await imagesIdentical(inc1[i]!, at2[i]!);
    t.ok(cmp.identical, `full + incremental = disk at c2 (${vm.disks[i]!.id}): ${cmp.output}`);
  }
  t.same(await leftovers(vm.monitor), []);

  // QEMU restarts (the same images, the same QMP socket): the volatile bitmaps are gone with the process
  await vm.write(1, 0x23, 8 * MiB, 64 * KiB);
  // a clean shutdown (quit), as a VM restart is: QEMU stores persistent bitmaps only when it closes the image
  await vm.monitor.execute("quit");
  await vm.exited;
  const vm2 = await startVm(t, { dir: vm.dir, images: vm.disks.map((x) => x.path), disks: formats });
  await connected(d, "vm1");
  t.same(await bitmapsOf(vm2), ["drive-vda/c1 persistent", "drive-vda/c2 persistent"], "only the qcow2 disk's bitmaps survived");
  const after = await checkpoints();
  for (const c of after) {
    t.equal(c.valid, false, `${c.name}: shown invalid`);
    t.match(c.problems.join("\n"), /bitmap '.*' on disk 'vdb' is gone: it was volatile .*QEMU restarted/, `${c.name}: with the reason`);
    t.notMatch(c.problems.join("\n"), /vda/, `${c.name}: the qcow2 disk's bitmap is fine`);
  }
  t.match((await ok("checkpoint-list", "vm1")).stdout, /\n c2 \*\s+\S+ \S+ \S+\s+NO\s+vdb\n/);
  const refused = await q("backup-begin", "vm1", file("inc-c2.xml", "<domainbackup><incremental>c2</incremental></domainbackup>"));
  t.not(refused.code, 0, "an incremental of the raw disk since c2 is refused");
  t.match(refused.stderr, /checkpoint 'c2' cannot be used: bitmap 'c2' on disk 'vdb' is gone: it was volatile/);
  t.same(await leftovers(vm2.monitor), [], "the refusal touched nothing");

  // the qcow2 disk's chain goes on: an incremental of vda alone since c2
  await vm2.write(0, 0x13, 6 * MiB, 64 * KiB);
  const vdaOnly = file(
    "inc-vda.xml",
    "<domainbackup><incremental>c2</incremental><disks><disk name='vda'/><disk name='vdb' backup='no'/></disks></domainbackup>",
  );
  await ok("backup-begin", "vm1", vdaOnly);
  await ok("wait", "vm1", "--timeout", "60");
  const vda = (await completed()).disks;
  t.same(
    vda.map((x) => x.name),
    ["vda"],
  );
  t.same(await allocatedRanges(vda[0]!.file), [[6 * MiB, 64 * KiB]], "vda since c2: the written cluster");

  // a new full with checkpoint c3 starts the raw disk's chain again, exact as before
  await ok("backup-begin", "vm1", "", file("c3.xml", "<domaincheckpoint><name>c3</name></domaincheckpoint>"));
  await ok("wait", "vm1", "--timeout", "60");
  const full3 = (await completed()).disks.map((x) => x.file);
  await vm2.write(1, 0x24, 9 * MiB, 64 * KiB);
  const at4 = await snapshotDisks(vm2, "at4", "16M");
  await ok("backup-begin", "vm1", file("inc-c3.xml", "<domainbackup><incremental>c3</incremental></domainbackup>"));
  await ok("wait", "vm1", "--timeout", "60");
  const inc3 = (await completed()).disks.map((x) => x.file);
  t.same(await allocatedRanges(inc3[1]!), [[9 * MiB, 64 * KiB]], "vdb since c3: exactly the written cluster");
  await rebaseOnto(inc3[1]!, full3[1]!);
  t.ok((await imagesIdentical(inc3[1]!, at4[1]!)).identical, "full + incremental = vdb now");
  t.same(await leftovers(vm2.monitor), []);
  // deleting c3 removes its bitmaps and vdb's live marker with them
  await ok("checkpoint-delete", "vm1", "c3");
  t.same(await bitmapsOf(vm2), ["drive-vda/c1 persistent", "drive-vda/c2 persistent"], "c3 gone from QEMU, marker and all");
});

t.test("a qcow2 image with an external raw data-file holds persistent bitmaps like any qcow2", async (t) => {
  const vm = await startVm(t, { disks: [{ size: "16M" }] });
  await vm.kill();
  // the same VM directory, its disk re-created as qcow2 metadata over a raw data file (libvirt ≥ 10.10's way for raw storage)
  const image = vm.disks[0]!.path;
  const { execFileP } = await import("../helpers/qemu.js");
  await execFileP("qemu-img", ["create", "-f", "qcow2", "-o", `data_file=${join(vm.dir, "vda.raw")},data_file_raw=on`, image, "16M"]);
  const vm2 = await startVm(t, { dir: vm.dir, images: [image] });
  const d = await startDaemon(t);
  await addDomain(d, "vm1", vm2.qmpPath);
  const r = await cli(d.socket, ["checkpoint-create-as", "vm1", "c1"]);
  t.equal(r.code, 0, r.stderr);
  t.same(await bitmapsOf(vm2), ["drive-vda/c1 persistent"], "a persistent bitmap, stored in the qcow2 metadata");
  t.notMatch((await cli(d.socket, ["checkpoint-dumpxml", "vm1", "c1"])).stdout, /volatile/);
  await vm2.write(0, 0x31, MiB, 64 * KiB);
  const inc = join(vm2.dir, "inc.xml");
  writeFileSync(inc, "<domainbackup><incremental>c1</incremental></domainbackup>");
  t.equal((await cli(d.socket, ["backup-begin", "vm1", inc])).code, 0);
  t.equal((await cli(d.socket, ["wait", "vm1", "--timeout", "60"])).code, 0);
  const job = JSON.parse((await cli(d.socket, ["--json", "domjobinfo", "vm1", "--completed"])).stdout) as JobJson;
  t.same(await allocatedRanges(job.disks[0]!.file), [[MiB, 64 * KiB]], "the incremental holds the written cluster");
});

/**
 * A bitmap of the checkpoint's name put back on the raw disk's node (the same
 * node-name: libvirt-style fixed names) before qbackupd looks again: it
 * records only from its creation on, so the writes before it are missing from
 * it. Its state (volatile, recording, count ≥ the last seen) cannot tell it
 * from ours; an incremental from it would silently lose those writes.
 */
t.test("a volatile bitmap re-added under the checkpoint's name is not the checkpoint's: the incremental is refused", async (t) => {
  const formats = [{ size: "16M" }, { size: "16M", format: "raw" as const }];
  const readd = (vm: QemuProcess) =>
    vm.monitor.execute("block-dirty-bitmap-add", { node: "drive-vdb", name: "c1", persistent: false }).then((r) => r._unsafeUnwrap());
  const vdbOnly =
    "<domainbackup><incremental>c1</incremental><disks><disk name='vda' backup='no'/><disk name='vdb'/></disks></domainbackup>";

  t.test("QEMU restarted while qbackupd was down (kill -9)", async (t) => {
    const vm = await startVm(t, { disks: formats });
    const d = await startDaemon(t);
    await addDomain(d, "vm1", vm.qmpPath);
    const { ok } = cliOn(t, d.socket);
    await ok("checkpoint-create-as", "vm1", "c1");
    await ok("checkpoint-list", "vm1"); // seen: volatile, nothing dirty yet
    await vm.write(1, 0x41, MiB, 64 * KiB); // recorded by c1 only in this QEMU process
    await d.stop("SIGKILL");
    await vm.monitor.execute("quit");
    await vm.exited;
    const vm2 = await startVm(t, { dir: vm.dir, images: vm.disks.map((x) => x.path), disks: formats });
    await readd(vm2);
    const d2 = await startDaemon(t, { dir: d.dir });
    await connected(d2, "vm1");
    const inc = join(vm.dir, "inc.xml");
    writeFileSync(inc, vdbOnly);
    const r = await cli(d2.socket, ["backup-begin", "vm1", inc]);
    t.not(r.code, 0, "refused: the write at 1 MiB is not in this bitmap");
    t.match(r.stderr, /checkpoint 'c1' cannot be used: bitmap 'c1' on disk 'vdb' is not the checkpoint's: its live marker/);
    const c = JSON.parse((await cli(d2.socket, ["--json", "checkpoint-list", "vm1"])).stdout) as CheckpointJson[];
    t.equal(c[0]?.valid, false, "c1 shown invalid");
  });

  t.test("the disk re-attached (device_del, blockdev-del, blockdev-add, device_add) while qbackupd runs", async (t) => {
    const vm = await startVm(t, { disks: formats });
    const d = await startDaemon(t);
    await addDomain(d, "vm1", vm.qmpPath);
    const { ok } = cliOn(t, d.socket);
    await ok("checkpoint-create-as", "vm1", "c1");
    await ok("checkpoint-list", "vm1");
    await vm.write(1, 0x42, MiB, 64 * KiB);
    const m = vm.monitor;
    (await m.executeRaw("device_del", { id: "vdb" }))._unsafeUnwrap();
    // without a guest, a PCI unplug finishes only on a paused machine's reset; wait for the device to go
    for (let i = 0; i < 100; i++) {
      const left = (await m.execute("qom-list", { path: "/machine/peripheral" }))._unsafeUnwrap();
      if (!left.some((p) => p.name === "vdb")) break;
      await m.executeRaw("system_reset");
      await new Promise((r) => setTimeout(r, 50));
    }
    (await m.execute("blockdev-del", { "node-name": "drive-vdb" }))._unsafeUnwrap();
    const file = { driver: "file", filename: vm.disks[1]!.path };
    (await m.executeRaw("blockdev-add", { "node-name": "drive-vdb", driver: "raw", file }))._unsafeUnwrap();
    await readd(vm);
    (await m.executeRaw("device_add", { driver: "virtio-blk-pci", drive: "drive-vdb", id: "vdb" }))._unsafeUnwrap();
    const inc = join(vm.dir, "inc.xml");
    writeFileSync(inc, vdbOnly);
    const r = await cli(d.socket, ["backup-begin", "vm1", inc]);
    t.not(r.code, 0, "refused: the write at 1 MiB is not in this bitmap");
    t.match(r.stderr, /checkpoint 'c1' cannot be used: bitmap 'c1' on disk 'vdb' is not the checkpoint's: its live marker/);
  });
});
