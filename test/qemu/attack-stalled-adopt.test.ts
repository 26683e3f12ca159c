/**
 * Attack: QEMU stalls (SIGSTOP) longer than the QMP command timeout while a
 * reconnect's recovery adopts a job. Adoption's read of QEMU's state timed
 * out and it detached the job "until the next connect"; but the connection
 * stayed up, so no next connect came: the job was forgotten, the domain
 * looked idle, and the next begin overwrote its record. The QEMU job, its
 * node and file, and its checkpoint were left with nothing claiming them.
 */
import { setTimeout as sleep } from "node:timers/promises";
import t from "tap";
import { jobManager, leftovers, testDomain } from "../helpers/domain.js";
import { tempDir } from "../helpers/qemu.js";

const MiB = 1024 * 1024;
const cpXml = (name: string) => `<domaincheckpoint><name>${name}</name></domaincheckpoint>`;

t.test("QEMU stalled past the QMP timeout during adoption: the job is still adopted", async (t) => {
  const d = await testDomain(t, "vm1", [{ size: "16M" }], undefined, { commandTimeoutMs: 1000 });
  await d.vm.write(0, 0x3c, 0, 8 * MiB);
  const stateDir = tempDir(t);
  const jm1 = jobManager(d.backupDir, { stateDir });
  const first = (await jm1.begin(d.domain, undefined, cpXml("c1"), { bandwidth: 256 * 1024 }))._unsafeUnwrap();
  jm1.detachAll();
  await sleep(300);
  const jm2 = jobManager(d.backupDir, { stateDir });
  const recovering = jm2.recover(d.domain);
  d.vm.proc.kill("SIGSTOP");
  await sleep(2500); // past the QMP timeout
  d.vm.proc.kill("SIGCONT");
  await recovering;
  const again = await jm2.begin(d.domain, undefined, undefined);
  t.ok(
    again.isErr() && again.error.code === "busy",
    `a new begin is refused as busy (${again.isErr() ? again.error.message : "it started"})`,
  );
  const i = await jm2.info("vm1");
  t.equal(i.isOk() ? i.value.id : i.error.code, first.id, "the recorded job is followed");
  await jm2.setBandwidth("vm1", 0);
  const done = await jm2.wait("vm1", 30_000);
  t.equal(done.isOk() ? done.value.state : done.error.code, "ready", "and completes");
  await sleep(500);
  t.same(await leftovers(d.client), [], "nothing left in QEMU");
});
