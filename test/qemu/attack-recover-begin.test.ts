/**
 * Attack: a begin that arrives while a reconnect's recovery is still reading
 * the job record. The daemon marks a domain connected (so `client()` answers
 * and the API accepts a begin) before its onConnect has adopted the record;
 * recovery then saw the new begin's reservation and skipped the record
 * altogether. The job QEMU still ran was never adopted, its record was
 * overwritten by the new job's, and its QEMU job, node, target file and
 * checkpoint were left with nothing claiming them.
 */
import { setTimeout as sleep } from "node:timers/promises";
import t from "tap";
import { jobManager, leftovers, testDomain } from "../helpers/domain.js";
import { tempDir } from "../helpers/qemu.js";

const MiB = 1024 * 1024;
const cpXml = (name: string) => `<domaincheckpoint><name>${name}</name></domaincheckpoint>`;

t.test("a begin racing a reconnect's recovery never leaves the recovered job unadopted", async (t) => {
  const d = await testDomain(t, "vm1", [{ size: "16M" }]);
  await d.vm.write(0, 0x3c, 0, 8 * MiB);
  const stateDir = tempDir(t);
  const jm1 = jobManager(d.backupDir, { stateDir });
  const first = (await jm1.begin(d.domain, undefined, cpXml("c1"), { bandwidth: 256 * 1024 }))._unsafeUnwrap();
  jm1.detachAll(); // the daemon stops (or the connection drops); QEMU keeps the job
  await sleep(300);

  // the daemon starts again: recovery of the domain and a client's begin in the same moment
  const jm2 = jobManager(d.backupDir, { stateDir });
  const recovering = jm2.recover(d.domain);
  const begin = jm2.begin(d.domain, undefined, undefined);
  await recovering;
  const b = await begin;
  t.ok(b.isErr() && b.error.code === "busy", `the racing begin is refused as busy (${b.isErr() ? b.error.message : "it started"})`);
  const now = await jm2.info("vm1");
  t.equal(now.isOk() ? now.value.id : undefined, first.id, "the job of the record is the one followed");

  // let whatever runs finish, then nothing may be left
  await jm2.setBandwidth("vm1", 0);
  await jm2.wait("vm1", 30_000);
  await sleep(500);
  t.same(await leftovers(d.client), [], "no QEMU job or node left unclaimed");
  t.ok(d.checkpoints.store.get("c1") !== undefined, "the adopted backup completed and its checkpoint stays");
});

// scripts/abort-race --rounds 60 --kill-every 6 --seed 4242 failed 2 of its 10 kill rounds this way: the
// restarted daemon lists the domain connected, `wait` answers at once, and the job is adopted only after
t.test("wait, domjobinfo and abort during a reconnect's recovery answer about the job being adopted", async (t) => {
  const d = await testDomain(t, "vm1", [{ size: "16M" }]);
  await d.vm.write(0, 0x3c, 0, 8 * MiB);
  const stateDir = tempDir(t);
  const jm1 = jobManager(d.backupDir, { stateDir });
  const first = (await jm1.begin(d.domain, undefined, cpXml("c1"), { bandwidth: 256 * 1024 }))._unsafeUnwrap();
  jm1.detachAll();
  await sleep(300);
  const jm2 = jobManager(d.backupDir, { stateDir });
  const recovering = jm2.recover(d.domain);
  const info = jm2.info("vm1");
  const waited = jm2.wait("vm1", 0);
  const bw = jm2.setBandwidth("vm1", 0);
  await recovering;
  const i = await info;
  t.equal(i.isOk() ? i.value.id : i.error.code, first.id, "domjobinfo shows the job being adopted, not 'no job'");
  const w = await waited;
  t.ok(w.isErr() && w.error.code === "timeout", `wait does not answer 'no job' (${w.isOk() ? w.value.state : w.error.code})`);
  t.ok((await bw).isOk(), "the bandwidth change reaches the adopted job");
  const done = await jm2.wait("vm1", 30_000);
  t.equal(done.isOk() ? done.value.state : done.error.code, "ready", "and the adopted job completes");
  t.same(await leftovers(d.client), []);
});
