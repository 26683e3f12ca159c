/** The CLI's exit codes: decided here and only here (documented in the README). */
import type { ApiErrorCode } from "../api/errors.js";

export const EXIT = {
  ok: 0,
  /** The operation ran and failed (backup failed or cancelled, QEMU error, internal error). */
  failed: 1,
  /** Bad usage or a request the daemon refused as malformed. */
  usage: 2,
  /** Domain, checkpoint or job not found. */
  notFound: 3,
  /** Conflict: busy, exists, invalid checkpoint, path refused. */
  conflict: 4,
  /** The daemon or the domain's QEMU is unreachable. */
  unavailable: 5,
  /** Timed out. */
  timeout: 6,
} as const;

export function exitCodeFor(code: ApiErrorCode | "not-found" | "unreachable"): number {
  switch (code) {
    case "bad-request":
    case "xml-malformed":
    case "xml-invalid":
    case "invalid-name":
    case "unknown-disk":
    case "unsupported-disk":
    case "config-invalid":
    case "too-large":
    case "unsupported":
      return EXIT.usage;
    case "unknown-domain":
    case "not-found":
    case "no-job":
      return EXIT.notFound;
    case "duplicate":
    case "busy":
    case "target-exists":
    case "bitmap-missing":
    case "checkpoint-invalid":
    case "path-refused":
      return EXIT.conflict;
    case "not-connected":
    case "unreachable":
      return EXIT.unavailable;
    case "timeout":
      return EXIT.timeout;
    case "qmp":
    case "agent":
    case "io":
    case "image":
    case "job-failed":
    case "internal":
      return EXIT.failed;
  }
}
