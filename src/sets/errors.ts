/** Errors of backup sets; each variant has a stable code (api/errors.ts maps them to HTTP statuses). */
import type { BackupError } from "../jobs/errors.js";

export type SetError =
  | BackupError
  /** A manifest file of the set cannot be read or does not hold what the set writes (the message names the file). */
  | { readonly code: "set-corrupt"; readonly message: string }
  /** The directory is the backup set of another domain. */
  | { readonly code: "set-foreign"; readonly message: string }
  /** A request the set cannot take as it is (a --keep below 1, say). */
  | { readonly code: "bad-request"; readonly message: string };

export type SetErrorCode = SetError["code"];
