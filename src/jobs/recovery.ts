/**
 * Recovery on every (re)connect of a domain: adopt the job its record
 * describes (the job reconciles the record with QEMU: reconcile.ts), or
 * remove what a crashed daemon left in QEMU without a record; remove temp
 * files of interrupted record writes. A record that cannot be read is set
 * aside for a person and keeps the domain busy: QEMU is left as it is, since
 * nobody can tell what of it belongs to the job the record described.
 *
 * What this module must never do: delete a job record it could not read, or
 * remove a QEMU object that does not carry this domain's own name.
 */
import type { Logger } from "../log.js";
import type { QmpClient } from "../qmp/client.js";
import type { BackupJob } from "./job.js";
import { isOwnName } from "./plan.js";
import type { JobRecord, JobStore } from "./record.js";

export type RecoveryResult =
  | { readonly kind: "none" }
  | { readonly kind: "adopted"; readonly job: BackupJob }
  /** The domain must stay busy until a person looks: `message` says why and where. */
  | { readonly kind: "blocked"; readonly message: string };

function blockedMessage(domain: string, paths: readonly string[]): string {
  return (
    `the job record of domain '${domain}' could not be read and was set aside (${paths.join(", ")}); ` +
    "QEMU was left as it is: check its block jobs, nodes and exports, then remove that file to allow backups again"
  );
}

export async function recoverDomain(
  store: JobStore,
  domain: string,
  client: QmpClient,
  opts: {
    readonly log: Logger;
    /** No instance of a job of this domain exists (so no record write of it is in flight). */
    readonly idle: boolean;
    readonly adopt: (rec: JobRecord) => Promise<BackupJob>;
  },
): Promise<RecoveryResult> {
  const log = opts.log;
  const aside = await store.setAsideOf(domain);
  if (aside.length > 0) return { kind: "blocked", message: blockedMessage(domain, aside) };
  if (opts.idle) {
    const stale = await store.removeStaleTemps(domain);
    if (stale.length > 0) log.warn({ domain, removed: stale }, "removed temp files of interrupted job record writes");
  }
  const rec = await store.load(domain);
  if (rec.isErr()) {
    if (rec.error.code === "io") {
      log.error({ domain, error: rec.error.message }, "cannot read the job record; leaving QEMU as it is");
      return { kind: "blocked", message: `${rec.error.message}; QEMU was left as it is` };
    }
    const moved = await store.setAside(domain);
    const where = moved.isOk() ? moved.value : rec.error.path;
    log.error({ domain, error: rec.error.message, keptAt: where }, "unreadable job record set aside; leaving QEMU as it is");
    return { kind: "blocked", message: blockedMessage(domain, [where]) };
  }
  if (rec.value === undefined) {
    await cleanLeftovers(domain, client, new Set(), log);
    return { kind: "none" };
  }
  const r = rec.value;
  const job = await opts.adopt(r);
  // anything else named like ours is older debris
  const claimed = new Set(job.active ? r.plans.flatMap((p) => [p.jobId, p.targetNode, ...(p.export ? [p.export.id] : [])]) : []);
  await cleanLeftovers(domain, client, claimed, log);
  return { kind: "adopted", job };
}

/**
 * Nodes, jobs and exports named like this domain's but claimed by no job
 * record: a crash mid-begin without a record, or older leftovers. Another
 * domain's (another registration of the same QEMU) carry another tag.
 */
export async function cleanLeftovers(domain: string, client: QmpClient, claimed: ReadonlySet<string>, log: Logger): Promise<void> {
  const cleaned: string[] = [];
  const jobs = await client.execute("query-jobs");
  for (const j of jobs.isOk() ? jobs.value : []) {
    if (!isOwnName(j.id, domain) || claimed.has(j.id)) continue;
    if (j.status !== "concluded") {
      const l = client.listen(["JOB_STATUS_CHANGE"], (e) => e.data.id === j.id && e.data.status === "concluded");
      await client.execute("job-cancel", { id: j.id });
      await l.next(10_000);
      l.close();
    }
    await client.execute("job-dismiss", { id: j.id });
    cleaned.push(`job ${j.id}`);
  }
  const exports = await client.execute("query-block-exports");
  for (const e of exports.isOk() ? exports.value : []) {
    if (!isOwnName(e.id, domain) || claimed.has(e.id)) continue;
    await client.execute("block-export-del", { id: e.id, mode: "hard" });
    cleaned.push(`export ${e.id}`);
  }
  const nodes = await client.execute("query-named-block-nodes", { flat: true });
  for (const n of nodes.isOk() ? nodes.value : []) {
    const name = n["node-name"];
    if (name === undefined || !isOwnName(name, domain) || claimed.has(name)) continue;
    const r = await client.execute("blockdev-del", { "node-name": name });
    if (r.isOk()) cleaned.push(`node ${name}`);
  }
  if (cleaned.length > 0) log.warn({ domain, cleaned }, "removed leftovers of an interrupted backup");
}
