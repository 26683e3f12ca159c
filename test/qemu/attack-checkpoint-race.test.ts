/**
 * Attack: a checkpoint created by name while a backup creating a checkpoint
 * of the same name is still being prepared (the API refuses checkpoint
 * changes only once the job exists, not while its begin is validated). The
 * checkpoint-create wins, the backup's transaction then fails (the bitmap
 * exists), and the failed backup's rollback deleted the metadata of the
 * *other* checkpoint: its bitmaps stayed in QEMU with no checkpoint claiming
 * them, and the checkpoint someone had just been told was created was gone.
 */
import { setTimeout as sleep } from "node:timers/promises";
import t from "tap";
import { bitmapNames, jobManager, leftovers, testDomain } from "../helpers/domain.js";

const MiB = 1024 * 1024;
const cpXml = (name: string) => `<domaincheckpoint><name>${name}</name></domaincheckpoint>`;

t.test("a failed backup never rolls back a checkpoint of the same name it did not create", async (t) => {
  const d = await testDomain(t, "vm1", [{ size: "16M" }]);
  await d.vm.write(0, 0x3c, 0, 4 * MiB);
  const jm = jobManager(d.backupDir);
  const seen: Record<string, number> = {};
  for (let i = 0; i < 12; i++) {
    const name = `k${i}`;
    const begin = jm.begin(d.domain, undefined, cpXml(name));
    await sleep(i % 6);
    const created = await d.checkpoints.create(d.client, cpXml(name));
    const b = await begin;
    if (b.isOk()) await jm.wait("vm1", 30_000);
    const key = `begin ${b.isOk() ? "ok" : b.error.code}, create ${created.isOk() ? "ok" : created.error.code}`;
    seen[key] = (seen[key] ?? 0) + 1;
    const listed = d.checkpoints.store.get(name) !== undefined;
    const bitmaps = (await bitmapNames(d.client)).includes(name);
    t.equal(listed, bitmaps, `round ${i} (${key}): checkpoint listed ${listed}, its bitmap in QEMU ${bitmaps}`);
    if (created.isOk()) t.ok(listed, `round ${i}: the checkpoint create answered as created still exists`);
    t.same(await leftovers(d.client), [], `round ${i}: nothing of the backup left`);
    if (listed) await d.checkpoints.delete(d.client, name);
    else if (bitmaps) await d.client.execute("block-dirty-bitmap-remove", { node: "drive-vda", name });
  }
  t.comment(JSON.stringify(seen));
});
