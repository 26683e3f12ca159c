/**
 * The API's error type and the one place codes become HTTP statuses (as
 * Firecracker's convert_to_response). The CLI maps the same codes to exit
 * codes in src/cli/exit-codes.ts.
 */
import type { DomainError } from "../daemon/errors.js";
import type { BackupError } from "../jobs/errors.js";
import type { SetError } from "../sets/errors.js";
import { assertNever } from "../util/assert-never.js";

export type ApiError =
  | BackupError
  | SetError
  /** domain-add, domain-remove (the registry's own errors; their codes map below like all others). */
  | DomainError
  | { readonly code: "unknown-domain"; readonly message: string }
  | { readonly code: "bad-request"; readonly message: string }
  | { readonly code: "too-large"; readonly message: string }
  /** A wrong method on a known path (the answer carries Allow). */
  | { readonly code: "method-not-allowed"; readonly message: string }
  /** A body that is not application/json. */
  | { readonly code: "unsupported-media-type"; readonly message: string }
  | { readonly code: "internal"; readonly message: string };

export type ApiErrorCode = ApiError["code"];

export function httpStatus(code: ApiErrorCode): number {
  switch (code) {
    case "bad-request":
    case "xml-malformed":
    case "xml-invalid":
    case "invalid-name":
    case "unknown-disk":
    case "unsupported-disk":
    case "config-invalid":
      return 400;
    case "path-refused":
      return 403;
    case "unknown-domain":
    case "not-found":
    case "no-job":
      return 404;
    case "duplicate":
    case "busy":
    case "aborted":
    case "target-exists":
    case "bitmap-missing":
    case "checkpoint-invalid":
    case "set-corrupt":
    case "set-foreign":
      return 409;
    case "method-not-allowed":
      return 405;
    case "too-large":
      return 413;
    case "unsupported-media-type":
      return 415;
    case "unsupported":
      return 422;
    case "qmp":
    case "agent":
      return 502;
    case "not-connected":
      return 503;
    case "timeout":
      return 504;
    case "io":
    case "image":
    case "job-failed":
    case "internal":
      return 500;
    default:
      return assertNever(code, "error code");
  }
}

/** The JSON body of an error response. */
export function errorBody(e: ApiError): { code: string; message: string } {
  return { code: e.code, message: e.message };
}
