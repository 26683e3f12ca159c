/**
 * The lower QMP layer: one socket, its runstate, line framing and message
 * parsing. It delivers parsed messages upward and reports exactly one close.
 * It knows nothing of ids, commands, capabilities or backups (qemu.qmp's
 * protocol.py plays the same part).
 */
import net from "node:net";
import { errAsync, ResultAsync } from "neverthrow";
import type { Logger } from "../log.js";
import type { QmpError } from "./errors.js";
import { LineSplitter } from "./framing.js";
import { parseInbound, type QmpInbound } from "./messages.js";

export type Runstate = "idle" | "connecting" | "running" | "disconnecting";

/** Where QEMU's monitor listens: a unix socket path, or TCP host and port. */
export type QmpAddress = { readonly path: string } | { readonly host: string; readonly port: number };

export function formatAddress(a: QmpAddress): string {
  return "path" in a ? a.path : `${a.host}:${a.port}`;
}

/** Accepts "unix:/p", "/p", "./p" or "host:port". */
export function parseAddress(s: string): QmpAddress {
  if (s.startsWith("unix:")) return { path: s.slice(5) };
  const m = /^(\[[^\]]+\]|[^:/]+):(\d+)$/.exec(s);
  if (m?.[1] !== undefined && m[2] !== undefined) {
    return { host: m[1].replace(/^\[|\]$/g, ""), port: Number(m[2]) };
  }
  return { path: s };
}

/** Why a connection ended: `peer` (EOF or socket error), `protocol` (we hung up on bad input), `local` (close()). */
export interface CloseInfo {
  readonly cause: "peer" | "protocol" | "local";
  readonly message: string;
}

export interface ProtocolOptions {
  readonly maxLineBytes: number;
  readonly logger: Logger;
  readonly onMessage: (msg: QmpInbound) => void;
  readonly onClose: (info: CloseInfo) => void;
}

export class QmpProtocol {
  private socket: net.Socket | undefined;
  private state: Runstate = "idle";
  private readonly splitter: LineSplitter;

  constructor(private readonly opts: ProtocolOptions) {
    this.splitter = new LineSplitter(opts.maxLineBytes);
  }

  get runstate(): Runstate {
    return this.state;
  }

  /** Open the socket. On failure the protocol is back to `idle` and onClose is not called. */
  connect(address: QmpAddress, timeoutMs: number): ResultAsync<void, QmpError> {
    if (this.state !== "idle") {
      return errAsync({ code: "state", state: this.state, message: `connect in state ${this.state}` });
    }
    this.state = "connecting";
    const where = formatAddress(address);
    const attempt = new Promise<void>((resolve, reject) => {
      const sock = "path" in address ? net.createConnection(address.path) : net.createConnection(address.port, address.host);
      const timer = setTimeout(() => {
        sock.destroy();
        reject(new Error(`timed out after ${timeoutMs} ms`));
      }, timeoutMs);
      sock.once("error", (e) => {
        clearTimeout(timer);
        reject(e);
      });
      sock.once("connect", () => {
        clearTimeout(timer);
        sock.removeAllListeners("error");
        this.attach(sock);
        resolve();
      });
    });
    return ResultAsync.fromPromise(attempt, (e): QmpError => {
      this.state = "idle";
      return { code: "connect", address: where, message: (e as Error).message };
    });
  }

  /**
   * Queue one serialized message. Messages queued in the same tick go out in
   * one write (one syscall for a burst of pipelined commands). False when the
   * connection is not running.
   */
  send(line: string): boolean {
    if (this.state !== "running" || this.socket === undefined) return false;
    this.outbox.push(line);
    if (this.outbox.length === 1) queueMicrotask(this.flush);
    return true;
  }

  private readonly outbox: string[] = [];
  private readonly flush = (): void => {
    const data = this.outbox.length === 1 ? this.outbox[0]! : this.outbox.join("");
    this.outbox.length = 0;
    this.socket?.write(data);
  };

  /** Close from our side; onClose fires once with the given cause. */
  close(cause: CloseInfo["cause"] = "local", message = "closed by client"): void {
    this.finish({ cause, message });
  }

  private attach(sock: net.Socket): void {
    this.socket = sock;
    this.state = "running";
    sock.setNoDelay(true);
    sock.setEncoding("utf8");
    sock.on("data", (chunk: string) => this.onData(chunk));
    sock.on("error", (e) => this.finish({ cause: "peer", message: `socket error: ${e.message}` }));
    sock.on("close", () => {
      const tail = this.splitter.pending > 0 ? ` (${this.splitter.pending} bytes of an unfinished message)` : "";
      this.finish({ cause: "peer", message: `connection closed by peer${tail}` });
    });
  }

  private onData(chunk: string): void {
    const lines = this.splitter.push(chunk);
    if (lines.isErr()) {
      this.protocolError(`message longer than ${lines.error.limit} bytes`);
      return;
    }
    for (const line of lines.value) {
      if (this.state !== "running") return;
      const msg = parseInbound(line);
      if (msg.isErr()) {
        this.protocolError(`${msg.error.reason}: ${JSON.stringify(msg.error.excerpt)}`);
        return;
      }
      this.opts.onMessage(msg.value);
    }
  }

  /** Called by the layer above too, when a well-formed message is unexpected. */
  protocolError(message: string): void {
    this.opts.logger.error({ reason: message }, "QMP protocol error; closing the connection");
    this.finish({ cause: "protocol", message: `QMP protocol error: ${message}` });
  }

  private finish(info: CloseInfo): void {
    if (this.state === "idle" || this.state === "disconnecting") return;
    this.state = "disconnecting";
    const sock = this.socket;
    this.socket = undefined;
    if (sock !== undefined) {
      sock.removeAllListeners("data");
      sock.removeAllListeners("close");
      sock.removeAllListeners("error");
      sock.on("error", () => {}); // late errors after destroy are expected and harmless
      sock.destroy();
    }
    this.state = "idle";
    this.opts.onClose(info);
  }
}
