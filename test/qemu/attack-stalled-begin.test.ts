/**
 * Attack: QEMU stalls (SIGSTOP) longer than the QMP command timeout just as
 * begin sends its transaction. The transaction times out, so begin fails
 * and undoes; but QEMU runs the transaction once it is back (the command
 * was delivered), creating the jobs, the temporary bitmap and the new
 * checkpoint's bitmaps. A timeout says nothing about whether QEMU ran a
 * command, yet begin recorded "the transaction did not run": the undo
 * removed the jobs and nodes it reads from QEMU, and left the temporary
 * bitmap and the checkpoint's bitmaps, which only the flags bring into its
 * scope. The stall is made to land between freeze and transaction by the
 * (fake) guest agent's freeze.
 */
import { setTimeout as sleep } from "node:timers/promises";
import t from "tap";
import { jobManager, leftovers, testDomain } from "../helpers/domain.js";
import { startFakeAgent } from "../helpers/fake-agent.js";

const MiB = 1024 * 1024;
const cpXml = (name: string) => `<domaincheckpoint><name>${name}</name></domaincheckpoint>`;

async function allBitmaps(d: Awaited<ReturnType<typeof testDomain>>): Promise<string[]> {
  const nodes = (await d.client.execute("query-named-block-nodes", { flat: true }))._unsafeUnwrap();
  return nodes.flatMap((n) => (n["dirty-bitmaps"] ?? []).map((b) => `${n["node-name"]}/${b.name}`)).sort();
}

t.test("QEMU stalled past the QMP timeout as begin sends its transaction: nothing of the backup is left", async (t) => {
  const d = await testDomain(t, "vm1", [{ size: "16M" }], undefined, { commandTimeoutMs: 1000 });
  await d.vm.write(0, 0x3c, 0, 4 * MiB);
  (await d.checkpoints.create(d.client, cpXml("base")))._unsafeUnwrap();
  await d.vm.write(0, 0x3d, 4 * MiB, 4 * MiB);
  const before = await allBitmaps(d);
  const agent = await startFakeAgent(t);
  let stalled = false;
  agent.onFreeze = async () => {
    stalled = true;
    d.vm.proc.kill("SIGSTOP");
  };
  const jm = jobManager(d.backupDir);
  const begin = jm.begin(
    { ...d.domain, agentPath: agent.path },
    "<domainbackup><incremental>base</incremental></domainbackup>",
    cpXml("c1"),
    {
      quiesce: true,
      bandwidth: 256 * 1024,
    },
  );
  await sleep(3500);
  t.ok(stalled, "QEMU was stopped right before the transaction");
  d.vm.proc.kill("SIGCONT");
  const b = await begin;
  t.comment(`begin answered ${b.isOk() ? b.value.state : `${b.error.code}: ${b.error.message}`}`);
  if (b.isOk()) {
    await jm.setBandwidth("vm1", 0);
    await jm.wait("vm1", 30_000);
  }
  await sleep(1000);
  const cpListed = d.checkpoints.store.get("c1") !== undefined;
  t.same(await leftovers(d.client), [], "no job, node or temporary bitmap left");
  if (!cpListed) t.same(await allBitmaps(d), before, "no bitmap of a checkpoint that does not exist");
});
