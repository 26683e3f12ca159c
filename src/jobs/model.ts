/**
 * The backup job's data model: what a job reports (BackupJobInfo, events),
 * what it needs from its manager (JobContext), and the per-disk and job-wide
 * flags saying what exists in QEMU so far (libvirt's qemuBackupDiskData
 * habit: undo reads these and nothing else). Types only: no behaviour here.
 */
import type { ResultAsync } from "neverthrow";
import type { CheckpointManager, PreparedCheckpoint } from "../checkpoints/manager.js";
import type { BackupDef } from "../conf/backup.js";
import type { Logger } from "../log.js";
import type { QmpClient } from "../qmp/client.js";
import type { BackupError } from "./errors.js";
import type { DiskPlan, PlanOptions } from "./plan.js";
import type { JobStore } from "./record.js";
import type { WritebackPump } from "./writeback.js";

/** What a job reports (libvirt's job states): begin → inprogress → ready, or failed / cancelled. */
export type JobState = "begin" | "inprogress" | "ready" | "failed" | "cancelled";
export type JobOutcome = "ready" | "failed" | "cancelled";
export type DiskJobState = "begin" | "running" | "complete" | "failed" | "cancelled";

export interface DiskProgress {
  readonly name: string;
  readonly state: DiskJobState;
  readonly bytesDone: number;
  readonly bytesTotal: number;
  readonly file: string;
  readonly exportName?: string | undefined;
  readonly exportBitmap?: string | undefined;
  readonly error?: string | undefined;
}

/** Our view of a backup job (not QEMU's JobInfo of query-jobs). */
export interface BackupJobInfo {
  readonly id: string;
  readonly domain: string;
  readonly mode: BackupDef["mode"];
  readonly state: JobState;
  /** True until torn down (a ready pull stays active until ended). */
  readonly active: boolean;
  readonly incremental: string | undefined;
  readonly checkpoint: string | undefined;
  readonly startedAt: string;
  readonly endedAt: string | undefined;
  readonly elapsedMs: number;
  readonly bytesDone: number;
  readonly bytesTotal: number;
  /** Bytes per second over the job so far. */
  readonly rate: number;
  readonly error: string | undefined;
  readonly nbd: string | undefined;
  /** Push: ready means written out to disk (false: ready once copied). */
  readonly durable: boolean | undefined;
  readonly disks: readonly DiskProgress[];
}

export type JobEventType = "started" | "progress" | "ready" | "failed" | "cancelled" | "ended";
export interface JobEvent {
  readonly type: JobEventType;
  readonly info: BackupJobInfo;
}

export interface NbdServerPlan {
  readonly addr: { type: "unix"; data: { path: string } } | { type: "inet"; data: { host: string; port: string } };
  readonly tlsCreds?: { readonly id: string; readonly dir: string } | undefined;
  /** For display: nbd+unix:///?socket=… or nbd://host:port */
  readonly uri: string;
}

export interface JobContext {
  readonly id: string;
  readonly domain: string;
  readonly client: QmpClient;
  readonly checkpoints: CheckpointManager;
  readonly def: BackupDef;
  readonly plans: readonly DiskPlan[];
  readonly planOpts: PlanOptions;
  readonly checkpoint: PreparedCheckpoint | undefined;
  readonly nbd: NbdServerPlan | undefined;
  /** Runs the transaction, with the guest frozen when asked. */
  readonly runTransaction: (tx: () => ResultAsync<void, BackupError>) => ResultAsync<void, BackupError>;
  readonly logger: Logger;
  readonly emit: (e: JobEvent) => void;
  /** Durable job record (undefined: not persisted, as in unit tests). */
  readonly store?: JobStore | undefined;
  /** The daemon stops following this instance (QEMU keeps the job); the manager forgets it and adopts the job again at reconnect. */
  readonly onDetached?: ((job: { info(): BackupJobInfo }) => void) | undefined;
  /** Writes push targets out while they are copied, and at the end. */
  readonly writeback: WritebackPump;
}

/** What has happened in QEMU, job-wide. */
export interface JobFlags {
  txDone: boolean;
  tempBitmapsAdded: boolean;
  checkpointCommitted: boolean;
  nbdStarted: boolean;
  tlsAdded: boolean;
}

/** What has happened in QEMU and on disk, per disk. */
export interface DiskRuntime {
  readonly plan: DiskPlan;
  state: DiskJobState;
  fileCreated: boolean;
  nodeAdded: boolean;
  jobStarted: boolean;
  jobDismissed: boolean;
  exportAdded: boolean;
  bytesDone: number;
  bytesTotal: number;
  error: string | undefined;
}

/** Begin's steps, in order; each is recorded on disk before it acts (and is a crash point `begin:<step>`). */
export const BEGIN_STEPS = ["files", "nodes", "transaction", "checkpoint", "exports"] as const;
export type BeginStep = (typeof BEGIN_STEPS)[number];

export function newDiskRuntime(plan: DiskPlan): DiskRuntime {
  return {
    plan,
    state: "begin",
    fileCreated: false,
    nodeAdded: false,
    jobStarted: false,
    jobDismissed: false,
    exportAdded: false,
    bytesDone: 0,
    // known before QEMU says for a full copy, and a pull's export (its size); see progressTotal in job.ts
    bytesTotal: plan.sync === "full" || plan.sync === "none" ? plan.virtualSize : 0,
    error: undefined,
  };
}
