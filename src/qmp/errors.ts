/**
 * The QMP layer's error union. Every variant carries a stable `code`; callers
 * switch on it (with assertNever) and higher layers wrap it in their own.
 */
export type QmpError =
  /** Could not connect or the greeting/negotiation failed. */
  | { readonly code: "connect"; readonly address: string; readonly message: string }
  /** The connection went away while the command was pending or before it was sent. */
  | { readonly code: "disconnected"; readonly message: string }
  /** No reply within the per-command timeout; the connection stays up. */
  | { readonly code: "timeout"; readonly command: string; readonly timeoutMs: number }
  /** QEMU answered with an error; `errorClass` and `desc` are QEMU's own. */
  | {
      readonly code: "command";
      readonly command: string;
      readonly errorClass: string;
      readonly desc: string;
    }
  /** The peer broke the protocol (a malformed message, or a reply or event of the wrong shape: shapes.ts); the connection has been closed. */
  | { readonly code: "protocol"; readonly message: string }
  /** Called in the wrong runstate (e.g. execute before connect). */
  | { readonly code: "state"; readonly state: string; readonly message: string }
  /** The QEMU at the other end lacks what we need. */
  | { readonly code: "unsupported"; readonly message: string };

export type QmpErrorCode = QmpError["code"];

export function qmpErrorMessage(e: QmpError): string {
  switch (e.code) {
    case "connect":
      return `cannot connect to QMP at ${e.address}: ${e.message}`;
    case "disconnected":
    case "protocol":
    case "state":
    case "unsupported":
      return e.message;
    case "timeout":
      return `QMP command ${e.command} got no reply within ${e.timeoutMs} ms`;
    case "command":
      return `QMP command ${e.command} failed: ${e.errorClass}: ${e.desc}`;
  }
}
