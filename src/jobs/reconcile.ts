/**
 * Adoption's decision, pure: a job record read back after a restart (or a
 * reconnect) against what QEMU has now and what the checkpoint store holds.
 * The flags in a record may be stale — a kill can land between a step and
 * the write that records it — so every flag that says "this exists" is
 * re-derived from QEMU's own state or the store, never trusted from disk.
 *
 * What this module must never do: talk to QEMU or touch a file. It reads a
 * snapshot (qemu-state.ts) and says what the job is and what to do.
 */
import { BEGIN_STEPS, type BeginStep, type JobFlags, type JobOutcome } from "./model.js";
import type { DiskRecord, JobRecord } from "./record.js";

export interface QemuJobSnapshot {
  readonly id: string;
  readonly status: string;
  readonly error?: string | undefined;
}

/** What QEMU has now, as far as a backup job is concerned. */
export interface QemuSnapshot {
  readonly jobs: readonly QemuJobSnapshot[];
  readonly nodes: ReadonlySet<string>;
  readonly exports: ReadonlySet<string>;
  /** "node/bitmap" */
  readonly bitmaps: ReadonlySet<string>;
}

export interface ReconcileFacts {
  /** The checkpoint created with the job has metadata in the store. */
  readonly checkpointInStore: boolean;
  /** Per disk: a file exists at its target path (only asked for disks we create, during begin). */
  readonly fileExists: readonly boolean[];
  /** Names the daemon may call its own in this QEMU (exports of another owner keep the NBD server theirs). */
  readonly isOwn: (name: string) => boolean;
}

export type AdoptDecision =
  /** Undo toward this outcome (begin interrupted, QEMU lost the job, or an undo was already under way). */
  | { readonly kind: "finish"; readonly outcome: JobOutcome; readonly reason: string | undefined }
  /** Follow the job again (disks whose QEMU job concluded while we were away are handled first). */
  | { readonly kind: "follow" };

export interface Reconciled {
  readonly flags: JobFlags;
  readonly disks: readonly DiskRecord[];
  readonly decision: AdoptDecision;
}

function stepReached(step: BeginStep | undefined, which: BeginStep): boolean {
  // an older record without a step: assume the furthest, so nothing that may exist is forgotten
  if (step === undefined) return true;
  return BEGIN_STEPS.indexOf(step) >= BEGIN_STEPS.indexOf(which);
}

export function reconcileRecord(rec: JobRecord, q: QemuSnapshot, facts: ReconcileFacts): Reconciled {
  const inBegin = rec.state === "begin";
  const byId = new Map(q.jobs.map((j) => [j.id, j]));
  let vanished: string | undefined;
  const disks = rec.disks.map((r, i): DiskRecord => {
    const plan = rec.plans[i]!;
    const job = byId.get(plan.jobId);
    const exportAdded = plan.export !== undefined && q.exports.has(plan.export.id);
    if (!inBegin && rec.outcome === undefined) {
      if (job === undefined && r.state === "running") vanished ??= `disk '${plan.disk}': its QEMU job is gone (QEMU restarted?)`;
      if (rec.def.mode === "pull" && r.state === "running" && !exportAdded) vanished ??= `disk '${plan.disk}': its NBD export is gone`;
    }
    return {
      ...r,
      nodeAdded: q.nodes.has(plan.targetNode),
      exportAdded,
      jobStarted: job !== undefined,
      jobDismissed: job === undefined,
      // paths were checked free and created with O_EXCL: during begin, whatever is there now is ours
      fileCreated: inBegin && plan.createFile ? facts.fileExists[i] === true : r.fileCreated,
    };
  });
  const pull = rec.def.mode === "pull";
  const foreignExports = [...q.exports].some((id) => !facts.isOwn(id));
  // begin records the step before it acts: a kill after nbd-server-start but before the next write
  // leaves nbdStarted false although QEMU serves; the server is ours unless another owner exports on it
  const serverMaybeOurs = pull && (rec.flags.nbdStarted || (inBegin && stepReached(rec.step, "exports") && !foreignExports));
  // auto-dismiss is off: after a transaction that ran, its jobs stay in QEMU until we dismiss them
  const txDone = rec.flags.txDone || disks.some((d) => d.jobStarted);
  const flags: JobFlags = {
    txDone,
    // only ours when our transaction ran: a failed one may have met another owner's bitmap of that name
    tempBitmapsAdded: txDone && rec.plans.some((p) => p.tempBitmap !== undefined && q.bitmaps.has(`${p.node}/${p.tempBitmap}`)),
    // the store decides: a kill between commit and the next record write leaves the flag false; but only once our
    // transaction ran (its bitmaps of that name were added), else a checkpoint of that name is someone else's
    checkpointCommitted: rec.flags.checkpointCommitted || (txDone && facts.checkpointInStore),
    nbdStarted: serverMaybeOurs,
    tlsAdded: rec.flags.tlsAdded || (serverMaybeOurs && rec.nbd?.tlsCreds !== undefined),
  };
  let decision: AdoptDecision;
  if (rec.outcome !== undefined) decision = { kind: "finish", outcome: rec.outcome, reason: rec.error };
  else if (inBegin) decision = { kind: "finish", outcome: "failed", reason: "the daemon stopped while the backup was starting" };
  else if (vanished !== undefined) decision = { kind: "finish", outcome: "failed", reason: vanished };
  else decision = { kind: "follow" };
  return { flags, disks, decision };
}
