/**
 * Undo of a backup job in QEMU: exports, NBD server, TLS object, block jobs
 * (ours: backup and image-create jobs), target/scratch nodes, the temporary
 * bitmaps and, when asked, the bitmaps of a checkpoint created with the job.
 *
 * It works from QEMU's state, not from what was sent: each round reads what
 * QEMU has (qemu-state.ts), asks for the removal of what is still there, and
 * ends only when a read shows nothing of ours left. So it is idempotent (run
 * it again and it finds nothing to do) and a lost answer never concludes
 * anything: a QMP timeout (QEMU stalled) or a stalled job just means another
 * round. A removal QEMU *refuses* again and again (someone else holds our
 * node, say) is given up after a while and reported as stuck, so the caller
 * can keep the file QEMU still has open.
 *
 * What this module must never do: remove a file, touch the job record, or
 * remove anything not named in the plans (another owner's objects).
 */
import { setTimeout as sleep } from "node:timers/promises";
import type { ResultAsync } from "neverthrow";
import type { Logger } from "../log.js";
import type { QmpClient } from "../qmp/client.js";
import { type QmpError, qmpErrorMessage } from "../qmp/errors.js";
import type { DiskRuntime, JobFlags, NbdServerPlan } from "./model.js";
import { readQemuState } from "./qemu-state.js";

export interface UndoOptions {
  /** Remove the temporary bitmaps (incrementals; after their jobs are gone). */
  readonly tempBitmaps: boolean;
  /** Also remove these bitmaps (a checkpoint created with a backup that did not succeed). */
  readonly checkpointBitmaps: readonly { readonly node: string; readonly name: string }[];
  /** Refusals of one object before it is given up as stuck (QEMU answered an error each time). */
  readonly maxRefusals?: number;
  /** Wait between rounds, doubling up to the max (ms). */
  readonly backoffMs?: readonly [number, number];
}

export type UndoResult =
  /** Nothing of ours is left in QEMU, except what is listed as stuck (with QEMU's reason). */
  | { readonly kind: "done"; readonly stuck: readonly string[] }
  /** The QMP connection went away before QEMU confirmed: whether QEMU still runs is the caller's question. */
  | { readonly kind: "disconnected" };

const GONE = /not (running|found)|does not exist|no such|cannot find|not exist/i;

export async function undoInQemu(
  client: QmpClient,
  disks: readonly DiskRuntime[],
  flags: JobFlags,
  nbd: NbdServerPlan | undefined,
  log: Logger,
  opts: UndoOptions,
): Promise<UndoResult> {
  const maxRefusals = opts.maxRefusals ?? 8;
  const [first, max] = opts.backoffMs ?? [50, 2000];
  const refusals = new Map<string, { count: number; last: string }>();
  const stuck = new Set<string>();
  let wait = first;
  /** A command whose answer counts: ok, or an error saying it is already gone. */
  const ask = async (what: string, r: ResultAsync<unknown, QmpError>): Promise<boolean> => {
    const x = await r;
    if (x.isOk()) return true;
    const e = x.error;
    if (e.code === "command" && GONE.test(e.desc)) return true;
    if (e.code === "command") {
      const n = refusals.get(what) ?? { count: 0, last: "" };
      n.count++;
      n.last = e.desc;
      refusals.set(what, n);
      if (n.count >= maxRefusals) {
        stuck.add(`${what}: ${e.desc}`);
        log.error({ step: what, error: e.desc }, "QEMU keeps refusing this undo step; giving up on it");
      }
    } else log.warn({ step: what, error: qmpErrorMessage(e) }, "undo step got no answer; trying again");
    return false;
  };
  const isStuck = (what: string) => [...stuck].some((s) => s.startsWith(`${what}:`));
  const jobIds = new Set(disks.flatMap((d) => [d.plan.jobId, d.plan.createJobId]));
  for (let round = 0; ; round++) {
    if (client.runstate !== "running") return { kind: "disconnected" };
    const s = await readQemuState(client);
    if (s.isErr()) {
      if (client.runstate !== "running") return { kind: "disconnected" };
      log.warn({ error: qmpErrorMessage(s.error) }, "cannot read QEMU's state to undo the backup; trying again");
      await sleep(wait);
      wait = Math.min(max, wait * 2);
      continue;
    }
    const q = s.value;
    let left = 0;
    for (const d of disks) {
      const ex = d.plan.export;
      d.exportAdded = ex !== undefined && q.exports.has(ex.id);
      if (ex === undefined || !d.exportAdded || isStuck(`block-export-del ${ex.id}`)) continue;
      left++;
      await ask(`block-export-del ${ex.id}`, client.execute("block-export-del", { id: ex.id, mode: "hard" }));
    }
    if (flags.nbdStarted && !isStuck("nbd-server-stop")) {
      if (await ask("nbd-server-stop", client.execute("nbd-server-stop"))) flags.nbdStarted = false;
      else left++;
    }
    if (flags.tlsAdded && nbd?.tlsCreds !== undefined && !isStuck(`object-del ${nbd.tlsCreds.id}`)) {
      if (await ask(`object-del ${nbd.tlsCreds.id}`, client.execute("object-del", { id: nbd.tlsCreds.id }))) flags.tlsAdded = false;
      else left++;
    }
    const ours = q.jobs.filter((j) => jobIds.has(j.id));
    for (const d of disks) {
      const j = ours.find((x) => x.id === d.plan.jobId);
      if (j === undefined) {
        d.jobDismissed = true;
        continue;
      }
      if (d.state === "running" && j.status !== "concluded") d.state = "cancelled";
    }
    for (const j of ours) {
      if (isStuck(`job ${j.id}`)) continue;
      left++;
      if (j.status === "concluded") await ask(`job ${j.id}`, client.execute("job-dismiss", { id: j.id }));
      else if (j.status !== "aborting" && j.status !== "waiting" && j.status !== "pending")
        await ask(`job ${j.id}`, client.execute("job-cancel", { id: j.id }));
    }
    // a job holds its nodes and bitmaps: those go once QEMU shows the jobs gone
    const jobsGone = ours.every((j) => isStuck(`job ${j.id}`));
    for (const d of disks) {
      d.nodeAdded = q.nodes.has(d.plan.targetNode);
      if (!d.nodeAdded) continue;
      if (isStuck(`blockdev-del ${d.plan.targetNode}`)) continue;
      left++;
      if (jobsGone) await ask(`blockdev-del ${d.plan.targetNode}`, client.execute("blockdev-del", { "node-name": d.plan.targetNode }));
    }
    const bitmaps: { node: string; name: string }[] = [...opts.checkpointBitmaps];
    if (opts.tempBitmaps)
      for (const d of disks)
        if (d.plan.tempBitmap !== undefined && d.plan.incremental !== undefined)
          bitmaps.push({ node: d.plan.node, name: d.plan.tempBitmap });
    for (const b of bitmaps) {
      const what = `block-dirty-bitmap-remove ${b.node}/${b.name}`;
      if (!q.bitmaps.has(`${b.node}/${b.name}`) || isStuck(what)) continue;
      left++;
      if (jobsGone) await ask(what, client.execute("block-dirty-bitmap-remove", { node: b.node, name: b.name }));
    }
    if (opts.tempBitmaps && !disks.some((d) => d.plan.tempBitmap !== undefined && q.bitmaps.has(`${d.plan.node}/${d.plan.tempBitmap}`)))
      flags.tempBitmapsAdded = false;
    if (left === 0) return { kind: "done", stuck: [...stuck] };
    if (round > 0 && round % 20 === 0) log.warn({ round, left }, "still waiting for QEMU to confirm the backup's undo");
    await sleep(wait);
    wait = Math.min(max, wait * 2);
  }
}
