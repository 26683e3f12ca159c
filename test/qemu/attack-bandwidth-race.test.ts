/**
 * Attack: a script changing the bandwidth again and again while the push
 * finishes. QEMU refuses block-job-set-speed on a job that has just
 * concluded (or that is already dismissed), and the daemon passed that on
 * as `job-failed` — "the backup failed" — for a backup that then ended
 * ready.
 */
import { setTimeout as sleep } from "node:timers/promises";
import t from "tap";
import { jobManager, leftovers, testDomain } from "../helpers/domain.js";

const MiB = 1024 * 1024;

t.test("bandwidth changes racing a push's end never answer that the backup failed", async (t) => {
  const d = await testDomain(t, "vm1", [{ size: "16M" }, { size: "16M" }]);
  await d.vm.write(0, 0x3c, 0, 2 * MiB);
  await d.vm.write(1, 0x3d, 0, 2 * MiB);
  const jm = jobManager(d.backupDir);
  const codes: Record<string, number> = {};
  for (let round = 0; round < 8; round++) {
    (await jm.begin(d.domain, undefined, undefined, { bandwidth: 4 * MiB }))._unsafeUnwrap();
    let done = false;
    const waited = jm.wait("vm1", 30_000).map((i) => {
      done = true;
      return i;
    });
    while (!done) {
      const r = await jm.setBandwidth("vm1", 4 * MiB + round);
      const k = r.isOk() ? "ok" : r.error.code;
      codes[k] = (codes[k] ?? 0) + 1;
      if (r.isErr() && r.error.code !== "no-job") t.fail(`round ${round}: bandwidth change answered ${r.error.code}: ${r.error.message}`);
      await sleep(2);
    }
    const w = await waited;
    t.equal(w.isOk() ? w.value.state : w.error.code, "ready", `round ${round}: the backup ended ready`);
  }
  t.comment(JSON.stringify(codes));
  t.same(await leftovers(d.client), []);
});
