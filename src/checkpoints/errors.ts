/** Errors of the checkpoint layer; each variant has a stable code. */
import type { AgentError } from "../agent/client.js";
import type { ConfError } from "../conf/errors.js";
import type { QmpError } from "../qmp/errors.js";
import { qmpErrorMessage } from "../qmp/errors.js";
import type { IoError } from "../util/atomic-file.js";

export type CheckpointError =
  | ConfError
  | IoError
  | { readonly code: "not-found"; readonly message: string }
  | { readonly code: "duplicate"; readonly message: string }
  /** Bitmaps a redefine needs are not in QEMU. */
  | { readonly code: "bitmap-missing"; readonly message: string; readonly missing: readonly { disk: string; bitmap: string }[] }
  /** The checkpoint exists but its bitmaps cannot be trusted (missing, inconsistent, not recording…). */
  | { readonly code: "checkpoint-invalid"; readonly message: string; readonly problems: readonly string[] }
  | { readonly code: "qmp"; readonly message: string; readonly cause: QmpError }
  | { readonly code: "agent"; readonly message: string; readonly cause: AgentError };

export function fromQmp(what: string, e: QmpError): CheckpointError {
  return { code: "qmp", message: `${what}: ${qmpErrorMessage(e)}`, cause: e };
}

export function fromAgent(what: string, e: AgentError): CheckpointError {
  const detail =
    e.code === "agent-command"
      ? `${e.command}: ${e.desc}`
      : e.code === "agent-timeout"
        ? `${e.command} timed out after ${e.timeoutMs} ms`
        : e.message;
  return { code: "agent", message: `${what}: ${detail}`, cause: e };
}
