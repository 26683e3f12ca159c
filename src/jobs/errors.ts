/** Errors of backup jobs; each variant has a stable code (the API maps codes to HTTP statuses). */
import type { CheckpointError } from "../checkpoints/errors.js";

export type BackupError =
  | CheckpointError
  /** A backup is already running on the domain. */
  | { readonly code: "busy"; readonly message: string }
  /** The domain's QEMU is not connected. */
  | { readonly code: "not-connected"; readonly message: string }
  /** A target/scratch path is outside the allowed directories, relative, or otherwise refused. */
  | { readonly code: "path-refused"; readonly message: string }
  /** A target/scratch file exists (and reuse was not asked for). */
  | { readonly code: "target-exists"; readonly message: string }
  /** A valid request we do not implement (encryption, block targets, fd transport, …). */
  | { readonly code: "unsupported"; readonly message: string }
  /** No backup job on the domain. */
  | { readonly code: "no-job"; readonly message: string }
  /** Creating a target/scratch image failed. */
  | { readonly code: "image"; readonly message: string }
  /** Waiting for the job took longer than asked. */
  | { readonly code: "timeout"; readonly message: string }
  /** The backup was aborted by request while it was starting (nothing of it is left). */
  | { readonly code: "aborted"; readonly message: string }
  /** The backup job ran and failed. */
  | { readonly code: "job-failed"; readonly message: string };

export type BackupErrorCode = BackupError["code"];
