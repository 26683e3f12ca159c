/**
 * Attack: checkpoint changes and domain-remove sent while a backup's begin
 * is still being prepared (validated against QEMU, not yet a job). The API
 * refused them only once the job existed, so they went ahead in the middle
 * of the begin: a checkpoint of the backup's own name (see
 * attack-checkpoint-race for what that did), a checkpoint deleted under an
 * incremental that had just checked it, the domain unregistered under its
 * begin. QEMU is SIGSTOPped to hold the begin in its preparation.
 */
import { setTimeout as sleep } from "node:timers/promises";
import t from "tap";
import { ApiClient } from "../../src/cli/client.js";
import { addDomain, startDaemon } from "../helpers/daemon.js";
import { startVm } from "../helpers/qemu.js";

/** The reply, or "no answer" after `ms`. */
async function within(ms: number, p: Promise<unknown>): Promise<unknown> {
  return Promise.race([p, sleep(ms).then(() => "no answer")]);
}

t.test("checkpoint changes and domain-remove during a begin's preparation are refused as busy", async (t) => {
  const vm = await startVm(t, { disks: [{ size: "16M" }] });
  const d = await startDaemon(t);
  await addDomain(d, "vm", vm.qmpPath);
  const api = new ApiClient(d.socket);
  const base = await api.request("POST", "/v1/domains/vm/checkpoints", { xml: "<domaincheckpoint><name>base</name></domaincheckpoint>" });
  t.ok("status" in base && base.status === 201, "checkpoint base created");
  vm.proc.kill("SIGSTOP");
  const begin = api.request("POST", "/v1/domains/vm/backup", {
    backupXml: "<domainbackup><incremental>base</incremental></domainbackup>",
    checkpointXml: "<domaincheckpoint><name>c1</name></domaincheckpoint>",
  });
  await sleep(200);
  const code = (r: unknown) =>
    typeof r === "object" && r !== null && "status" in r ? (r as unknown as { body: { code?: string } }).body.code : r;
  const create = await within(
    2000,
    api.request("POST", "/v1/domains/vm/checkpoints", { xml: "<domaincheckpoint><name>c1</name></domaincheckpoint>" }),
  );
  t.equal(code(create), "busy", "checkpoint-create is refused as busy");
  const del = await within(2000, api.request("DELETE", "/v1/domains/vm/checkpoints/base"));
  t.equal(code(del), "busy", "checkpoint-delete is refused as busy");
  const rm = await within(2000, api.request("DELETE", "/v1/domains/vm"));
  t.equal(code(rm), "busy", "domain-remove is refused as busy");
  vm.proc.kill("SIGCONT");
  const b = await begin;
  t.ok("status" in b && b.status === 201, `and the begin goes on (${JSON.stringify("status" in b ? b.body : b)})`);
  const w = await api.request("GET", "/v1/domains/vm/backup/wait?timeout=30");
  t.equal("status" in w ? (w.body as { state?: string }).state : w, "ready");
});
