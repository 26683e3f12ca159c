/**
 * A domain with a raw disk beside a qcow2 one (raw files and LVM volumes are
 * common in production): full backups include it, a checkpoint leaves it out
 * (no bitmap can live in it), and an incremental of it is refused rather
 * than guessed. Real QEMU.
 */
import t from "tap";
import { jobManager, leftovers, settledBackup, testDomain } from "../helpers/domain.js";
import { rangeHolds } from "../helpers/qemu.js";

const MiB = 1024 * 1024;

t.test("full push with a checkpoint; incremental of the qcow2 disk only", async (t) => {
  const d = await testDomain(t, "vm1", [{ size: "16M" }, { size: "16M", format: "raw" }]);
  const jm = jobManager(d.backupDir);
  await d.vm.write(0, 0x11, 0, MiB);
  await d.vm.write(1, 0x21, 2 * MiB, MiB);
  const full = await settledBackup(jm, d, undefined, "<domaincheckpoint><name>c1</name></domaincheckpoint>");
  t.equal(full.state, "ready", full.error ?? "");
  t.ok(await rangeHolds(full.disks[0]!.file, "qcow2", 0x11, 0, MiB), "vda");
  t.ok(await rangeHolds(full.disks[1]!.file, "qcow2", 0x21, 2 * MiB, MiB), "vdb, the raw disk, in full");
  t.same(
    d.checkpoints.store.get("c1")?.disks,
    [
      { name: "vda", checkpoint: "bitmap", bitmap: "c1" },
      { name: "vdb", checkpoint: "no" },
    ],
    "the checkpoint leaves the raw disk out",
  );

  const all = await jm.begin(d.domain, "<domainbackup><incremental>c1</incremental></domainbackup>", undefined);
  t.match(all._unsafeUnwrapErr(), { code: "unsupported-disk", message: /vdb.*raw/ }, "an incremental of the raw disk is refused");
  t.same(await leftovers(d.client), [], "nothing touched");

  await d.vm.write(0, 0x12, 4 * MiB, 64 * 1024);
  const qcow2Only =
    "<domainbackup><incremental>c1</incremental><disks><disk name='vda'/><disk name='vdb' backup='no'/></disks></domainbackup>";
  const inc = await settledBackup(jm, d, qcow2Only, undefined);
  t.equal(inc.state, "ready", inc.error ?? "");
  t.same(
    inc.disks.map((x) => x.name),
    ["vda"],
  );
  t.ok(await rangeHolds(inc.disks[0]!.file, "qcow2", 0x12, 4 * MiB, 64 * 1024));
  t.same(await leftovers(d.client), []);
});
