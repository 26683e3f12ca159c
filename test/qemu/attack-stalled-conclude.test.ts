/**
 * Attack: QEMU stalls (SIGSTOP) past the QMP command timeout right after it
 * reports a push's job concluded, while the daemon asks query-jobs for the
 * outcome. The job took the timeout as "unknown: the next event decides",
 * but a concluded job sends no further event: the backup stayed "running"
 * for ever, `wait` never answered, QEMU kept the concluded job and its node.
 * The stall is injected at that query-jobs (the test wraps the client's
 * execute); QEMU itself is real.
 */
import { setTimeout as sleep } from "node:timers/promises";
import t from "tap";
import { jobManager, leftovers, testDomain } from "../helpers/domain.js";

const MiB = 1024 * 1024;

t.test("QEMU stalled past the QMP timeout as a job concludes: the backup still ends", async (t) => {
  const d = await testDomain(t, "vm1", [{ size: "16M" }], undefined, { commandTimeoutMs: 1000 });
  await d.vm.write(0, 0x3c, 0, 4 * MiB);
  const jm = jobManager(d.backupDir);
  let concluded = false;
  let stalled = false;
  const l = d.client.listen(["JOB_STATUS_CHANGE"], (e) => {
    if (e.data.status === "concluded" && e.data.id.endsWith("-j0")) concluded = true;
    return false;
  });
  t.teardown(() => l.close());
  const execute = d.client.execute.bind(d.client);
  (d.client as { execute: unknown }).execute = (cmd: string, args?: unknown) => {
    if (cmd === "query-jobs" && concluded && !stalled) {
      stalled = true;
      d.vm.proc.kill("SIGSTOP");
      setTimeout(() => d.vm.proc.kill("SIGCONT"), 2500);
    }
    return (execute as (c: string, a?: unknown) => unknown)(cmd, args);
  };
  (await jm.begin(d.domain, undefined, undefined, { bandwidth: 4 * MiB }))._unsafeUnwrap();
  const w = await jm.wait("vm1", 20_000);
  t.ok(stalled, "QEMU was stalled at the query of the concluded job");
  t.equal(w.isOk() ? w.value.state : w.error.code, "ready", "the backup ends ready");
  await sleep(500);
  t.same(await leftovers(d.client), [], "nothing left in QEMU");
});
