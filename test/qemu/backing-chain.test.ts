/**
 * A disk that is an overlay on a base image (a VM cloned from a template,
 * or after an external snapshot): a full backup holds the whole chain's
 * data in one standalone image; an incremental only what the guest wrote;
 * a pull serves the chain. Real QEMU.
 */
import { join } from "node:path";
import t from "tap";
import { allocatedRanges } from "../helpers/backup.js";
import { jobManager, leftovers, settledBackup, testDomain } from "../helpers/domain.js";
import { execFileP, rangeHolds, tempDir } from "../helpers/qemu.js";

const KiB = 1024;
const MiB = 1024 * KiB;

async function overlayOnBase(dir: string): Promise<string> {
  const base = join(dir, "base.qcow2");
  const top = join(dir, "top.qcow2");
  await execFileP("qemu-img", ["create", "-q", "-f", "qcow2", base, "16M"]);
  await execFileP("qemu-io", ["-f", "qcow2", "-c", `write -P 0x61 0 ${MiB}`, "-c", `write -P 0x62 ${4 * MiB} ${MiB}`, base]);
  await execFileP("qemu-img", ["create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top]);
  // the overlay hides part of the base
  await execFileP("qemu-io", ["-f", "qcow2", "-c", `write -P 0x71 ${4 * MiB} ${512 * KiB}`, top]);
  return top;
}

t.test("full push flattens the chain; incremental holds only the guest's writes; pull serves the chain", async (t) => {
  const top = await overlayOnBase(tempDir(t));
  const d = await testDomain(t, "vm1", [], undefined, { images: [top] });
  const jm = jobManager(d.backupDir);
  const full = await settledBackup(jm, d, undefined, "<domaincheckpoint><name>c1</name></domaincheckpoint>");
  t.equal(full.state, "ready", full.error ?? "");
  const f = full.disks[0]!.file;
  const info = JSON.parse((await execFileP("qemu-img", ["info", "-U", "--output=json", f])).stdout) as { "backing-filename"?: string };
  t.equal(info["backing-filename"], undefined, "the full backup stands alone");
  t.ok(await rangeHolds(f, "qcow2", 0x61, 0, MiB), "base data");
  t.ok(await rangeHolds(f, "qcow2", 0x71, 4 * MiB, 512 * KiB), "overlay data over the base");
  t.ok(await rangeHolds(f, "qcow2", 0x62, 4 * MiB + 512 * KiB, 512 * KiB), "the base where the overlay has nothing");
  t.ok(await rangeHolds(f, "qcow2", 0, MiB, 3 * MiB), "zeros between");

  await d.vm.write(0, 0x81, 8 * MiB, 64 * KiB);
  const inc = await settledBackup(
    jm,
    d,
    "<domainbackup><incremental>c1</incremental></domainbackup>",
    "<domaincheckpoint><name>c2</name></domaincheckpoint>",
  );
  t.equal(inc.state, "ready", inc.error ?? "");
  t.same(await allocatedRanges(inc.disks[0]!.file), [[8 * MiB, 64 * KiB]], "only the cluster the guest wrote");

  const sock = join(d.backupDir, "nbd.sock");
  (
    await jm.begin(d.domain, `<domainbackup mode='pull'><server transport='unix' socket='${sock}'/></domainbackup>`, undefined)
  )._unsafeUnwrap();
  const uri = `nbd+unix:///vda?socket=${sock}`;
  t.ok(await rangeHolds(uri, "raw", 0x61, 0, MiB), "pull: base data");
  t.ok(await rangeHolds(uri, "raw", 0x71, 4 * MiB, 512 * KiB), "pull: overlay data");
  t.ok(await rangeHolds(uri, "raw", 0x81, 8 * MiB, 64 * KiB), "pull: the guest's write");
  (await jm.end("vm1"))._unsafeUnwrap();
  t.same(await leftovers(d.client), []);
});
