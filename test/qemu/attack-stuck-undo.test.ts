/**
 * Attack: an abort whose undo QEMU keeps refusing. Another owner (an
 * operator on QEMU's monitor) opens a node on top of the push's target, so
 * blockdev-del of the target is refused every round; undo gives up after
 * its refusals and the file QEMU still holds is kept. The abort then
 * answered "cancelled" although the job's node and target file were left:
 * docs/reliability.md says such a backup fails, with the reason, and
 * "cancelled" is only ever answered once nothing of the job is left.
 */
import { existsSync } from "node:fs";
import t from "tap";
import { jobManager, leftovers, testDomain } from "../helpers/domain.js";

const MiB = 1024 * 1024;

t.test("an abort whose undo QEMU refuses is not answered cancelled", async (t) => {
  const d = await testDomain(t, "vm1", [{ size: "16M" }]);
  await d.vm.write(0, 0x3c, 0, 8 * MiB);
  const jm = jobManager(d.backupDir);
  const started = (
    await jm.begin(d.domain, undefined, "<domaincheckpoint><name>c1</name></domaincheckpoint>", { bandwidth: 256 * 1024 })
  )._unsafeUnwrap();
  const target = (await leftovers(d.client)).find((l) => l.startsWith("node "))!.slice(5);
  const hostile = await d.client.execute("blockdev-add", { driver: "raw", "node-name": "hostile", file: target, "read-only": true });
  t.ok(hostile.isOk(), `another owner opens a node on the target (${hostile.isErr() ? JSON.stringify(hostile.error) : target})`);
  const info = (await jm.end("vm1"))._unsafeUnwrap();
  const left = await leftovers(d.client);
  t.ok(left.includes(`node ${target}`), "the target node is still there (QEMU refused to let it go)");
  t.ok(existsSync(started.disks[0]!.file), "and its file is kept, not unlinked under QEMU");
  t.not(info.state, "cancelled", "so the abort does not answer cancelled");
  t.equal(info.state, "failed", "the backup failed");
  t.match(info.error ?? "", /blockdev-del/, `with the reason (${info.error})`);
  t.equal(d.checkpoints.store.get("c1"), undefined, "no checkpoint claims it");
  await d.client.execute("blockdev-del", { "node-name": "hostile" });
  await d.client.execute("blockdev-del", { "node-name": target });
});
