/**
 * Errors of the domain registry (domain-add, domain-remove); each variant has
 * a stable code. The API turns codes into HTTP statuses in src/api/errors.ts
 * and nowhere else; this module never knows about HTTP.
 */
import type { CheckpointError } from "../checkpoints/errors.js";
import type { IoError } from "../util/atomic-file.js";

export type DomainError =
  /** Opening the domain's checkpoint store failed (a bad name, its files unreadable). */
  | CheckpointError
  /** domains.json could not be written: nothing was changed. */
  | IoError
  /** A domain of that name is registered, or domains.json keeps an entry of that name it could not load. */
  | { readonly code: "duplicate"; readonly message: string }
  | { readonly code: "unknown-domain"; readonly message: string };

export type DomainErrorCode = DomainError["code"];
