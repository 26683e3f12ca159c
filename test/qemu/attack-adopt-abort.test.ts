/**
 * Attack: an abort that lands while adoption is still reading QEMU's state,
 * after a kill between a begin step and the record write that says it
 * happened (begin:transaction:done: the record says the transaction has not
 * run, QEMU has the jobs, the temporary bitmap and the new checkpoint's
 * bitmaps). The abort takes the job over before adoption has re-derived the
 * flags from QEMU (reconcile.ts), so the undo ran with the record's stale
 * flags: QEMU's jobs and nodes went (undo reads those), but the temporary
 * bitmap and the checkpoint's bitmaps stayed, and the abort answered
 * "cancelled". The kill is emulated by writing the record a kill at that
 * point leaves; QEMU is SIGSTOPped so the abort surely lands mid-adoption.
 */
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import t from "tap";
import { bitmapNames, jobManager, leftovers, testDomain } from "../helpers/domain.js";
import { tempDir } from "../helpers/qemu.js";

const MiB = 1024 * 1024;
const cpXml = (name: string) => `<domaincheckpoint><name>${name}</name></domaincheckpoint>`;

t.test("an abort during adoption undoes what QEMU has, not what a stale record says", async (t) => {
  const d = await testDomain(t, "vm1", [{ size: "16M" }]);
  await d.vm.write(0, 0x3c, 0, 4 * MiB);
  (await d.checkpoints.create(d.client, cpXml("base")))._unsafeUnwrap();
  await d.vm.write(0, 0x3d, 4 * MiB, 4 * MiB);
  const stateDir = tempDir(t);
  const jm1 = jobManager(d.backupDir, { stateDir });
  const xml = "<domainbackup><incremental>base</incremental></domainbackup>";
  (await jm1.begin(d.domain, xml, cpXml("c1"), { bandwidth: 128 * 1024 }))._unsafeUnwrap();
  jm1.detachAll();
  await sleep(300);
  // what a kill at begin:transaction:done leaves: the record of the transaction step, no checkpoint metadata
  const recPath = join(stateDir, "jobs", "vm1.json");
  const rec = JSON.parse(readFileSync(recPath, "utf8"));
  rec.state = "begin";
  rec.step = "transaction";
  rec.flags = { txDone: false, tempBitmapsAdded: false, checkpointCommitted: false, nbdStarted: false, tlsAdded: false };
  rec.disks = rec.disks.map((x: Record<string, unknown>) => ({ ...x, state: "begin", jobStarted: false }));
  writeFileSync(recPath, JSON.stringify(rec));
  (await d.checkpoints.delete(undefined, "c1", { metadataOnly: true }))._unsafeUnwrap();
  // (query-block shows the backup's filter node while the job runs: ask the nodes)
  const nodes = (await d.client.execute("query-named-block-nodes", { flat: true }))._unsafeUnwrap();
  const all = nodes.flatMap((n) => (n["dirty-bitmaps"] ?? []).map((b) => b.name));
  t.ok(all.includes("c1") && all.includes("backup-vda"), "QEMU has c1's and the temporary bitmap, the store has no c1");

  const jm2 = jobManager(d.backupDir, { stateDir });
  const recovering = jm2.recover(d.domain);
  d.vm.proc.kill("SIGSTOP"); // adoption's read of QEMU's state waits
  const aborting = jm2.end("vm1");
  await sleep(1000);
  d.vm.proc.kill("SIGCONT");
  const ab = await aborting;
  await recovering;
  const state = ab.isOk() ? ab.value.state : ab.error.code;
  const left = await leftovers(d.client);
  const c1Left = (await bitmapNames(d.client)).includes("c1");
  t.ok(
    state !== "cancelled" || (left.length === 0 && !c1Left),
    `answered ${state} with ${JSON.stringify(left)}, c1's bitmap ${c1Left ? "left" : "gone"}`,
  );
  // whatever was answered, nothing of the job may stay
  await sleep(500);
  t.same(await leftovers(d.client), [], "no job, node or temporary bitmap left");
  t.notOk((await bitmapNames(d.client)).includes("c1"), "no bitmap of the checkpoint the backup was creating");
});
