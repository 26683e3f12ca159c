/**
 * The CLI's exit codes, decided here and only here (documented in the
 * README). They follow the HTTP status the daemon answered with, so the
 * error codes themselves are mapped in one place only (src/api/errors.ts).
 */

export const EXIT = {
  ok: 0,
  /** The operation ran and failed (backup failed or cancelled, QEMU error, internal error). */
  failed: 1,
  /** Bad usage or a request the daemon refused as malformed or unsupported. */
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

/** What each exit code means, for the man page (and the README says the same). */
export const EXIT_MEANING: readonly (readonly [number, string])[] = [
  [EXIT.ok, "success"],
  [EXIT.failed, "the operation ran and failed (backup failed or cancelled, QEMU error, internal error)"],
  [EXIT.usage, "bad usage, or a request the daemon refused as malformed or unsupported"],
  [EXIT.notFound, "domain, checkpoint or job not found"],
  [EXIT.conflict, "conflict: busy, exists, invalid checkpoint, path refused"],
  [EXIT.unavailable, "the daemon or the domain's QEMU is unreachable"],
  [EXIT.timeout, "timed out"],
];

export function exitCodeForStatus(status: number): number {
  if (status < 400) return EXIT.ok;
  switch (status) {
    case 400:
    case 405:
    case 413:
    case 415:
    case 422:
      return EXIT.usage;
    case 403:
    case 409:
      return EXIT.conflict;
    case 404:
      return EXIT.notFound;
    case 503:
      return EXIT.unavailable;
    case 504:
      return EXIT.timeout;
    default:
      return EXIT.failed;
  }
}
