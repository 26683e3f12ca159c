/**
 * What the job layer needs of a domain, and the options of a begin. Types
 * only: the daemon's domain registry implements BackupDomain.
 */
import type { CheckpointManager } from "../checkpoints/manager.js";
import type { QmpClient } from "../qmp/client.js";

/** What the job manager needs of a domain. */
export interface BackupDomain {
  readonly name: string;
  /** The current QMP connection, if any. */
  client(): QmpClient | undefined;
  readonly checkpoints: CheckpointManager;
  readonly agentPath?: string | undefined;
  /** blockdev-backup x-perf available (from the capability probe). */
  readonly backupPerf: boolean;
  /** QEMU's user, when the files we create must be given to it (QEMU runs as another user than the daemon). */
  readonly imageOwner?: { readonly uid: number; readonly gid: number } | undefined;
}

export interface BeginOptions {
  /** Use caller-created target files as they are (libvirt's REUSE_EXTERNAL). */
  readonly reuseExternal?: boolean;
  /** Freeze guest filesystems around the transaction. */
  readonly quiesce?: boolean;
  /** Bytes per second per disk. */
  readonly bandwidth?: number;
  /**
   * Push: false reports ready as soon as the copy is complete, leaving the
   * targets to the kernel's writeback (a host crash soon after can lose them).
   * For targets read and shipped elsewhere at once. Default true.
   */
  readonly durable?: boolean;
  /**
   * Where a disk the definition gives no target goes (default: a generated
   * name in the domain's directory of generated files). A backup set names
   * its own images.
   */
  readonly defaultTarget?: ((disk: string) => string) | undefined;
}
