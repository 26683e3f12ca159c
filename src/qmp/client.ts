/**
 * The QMP client: greeting and capability negotiation, id-correlated
 * commands (many in flight at once), per-command timeouts, and event
 * fan-out to listeners. It sits on QmpProtocol and knows nothing of backups.
 *
 * Every command resolves to a Result; nothing here ever rejects a promise,
 * so a disconnect with commands pending cannot become an unhandled rejection.
 */
import { err, errAsync, ok, type Result, ResultAsync } from "neverthrow";
import { type Logger, rootLogger } from "../log.js";
import type { QmpError } from "./errors.js";
import { EventListener, type QmpEventName, type QmpEventOf } from "./events.js";
import { type EventMessage, type GreetingMessage, type QmpInbound, type QmpVersion, serializeCommand } from "./messages.js";
import { type CloseInfo, formatAddress, type QmpAddress, QmpProtocol, type Runstate } from "./protocol.js";
import type { QmpCommandMap, QmpCommandName } from "./qapi.js";
import { eventShapeError, REPLY_SHAPES, type Shape } from "./shapes.js";

export interface QmpClientOptions {
  readonly logger?: Logger;
  /** Default per-command timeout. */
  readonly commandTimeoutMs?: number;
  /** Time allowed for connect + greeting + negotiation. */
  readonly connectTimeoutMs?: number;
  /** Longest accepted message; query-qmp-schema is ~250 KiB on 7.2. */
  readonly maxLineBytes?: number;
  /** Enable the "oob" capability when QEMU offers it (default: yes; see connect). */
  readonly oob?: boolean;
}

export interface ExecuteOptions {
  readonly timeoutMs?: number;
}

export const DEFAULT_COMMAND_TIMEOUT_MS = 30_000;
export const DEFAULT_CONNECT_TIMEOUT_MS = 5_000;
export const DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024;

interface Pending {
  readonly command: string;
  readonly resolve: (r: Result<unknown, QmpError>) => void;
  readonly deadline: number;
  readonly timeoutMs: number;
  /** The reply's expected shape (typed commands); a reply that does not fit is a protocol error. */
  readonly shape: Shape | undefined;
}

export class QmpClient {
  private readonly protocol: QmpProtocol;
  private readonly pending = new Map<string, Pending>();
  /** Ids whose caller gave up (timeout); their late replies are dropped, not treated as unexpected. */
  private readonly abandoned = new Set<string>();
  private readonly listeners = new Set<EventListener<QmpEventName>>();
  private readonly closeHandlers = new Set<(info: CloseInfo) => void>();
  private nextId = 0;
  private greetingWaiter: ((g: GreetingMessage) => void) | undefined;
  private greetingMsg: GreetingMessage | undefined;
  private enabled: readonly string[] = [];
  private closeInfo: CloseInfo | undefined;
  private readonly log: Logger;
  private readonly commandTimeoutMs: number;
  /** One timer for all pending commands, armed for the earliest deadline (a timer per command costs more than the command). */
  private timeoutTimer: NodeJS.Timeout | undefined;
  private timeoutAt = Number.POSITIVE_INFINITY;
  /** Resolves (never rejects) once, when the connection has ended for any reason. */
  readonly closed: Promise<CloseInfo>;
  private resolveClosed!: (info: CloseInfo) => void;

  private constructor(
    readonly address: QmpAddress,
    opts: QmpClientOptions,
  ) {
    this.log = (opts.logger ?? rootLogger).child({ qmp: formatAddress(address) });
    this.commandTimeoutMs = opts.commandTimeoutMs ?? DEFAULT_COMMAND_TIMEOUT_MS;
    this.closed = new Promise((r) => {
      this.resolveClosed = r;
    });
    this.protocol = new QmpProtocol({
      maxLineBytes: opts.maxLineBytes ?? DEFAULT_MAX_LINE_BYTES,
      logger: this.log,
      onMessage: (m) => this.onMessage(m),
      onClose: (info) => this.handleClose(info),
    });
  }

  /**
   * Connect, read the greeting, negotiate capabilities.
   *
   * "oob" is enabled when offered, though we never send an out-of-band
   * command: without it QEMU reads one command, runs it and only then reads
   * the next (it stops reading the socket meanwhile), so pipelined commands
   * still go one at a time through the I/O-thread/main-loop hand-off. With
   * it QEMU parses up to 8 ahead. Measured on 7.2 with ids: 4,100-4,800
   * commands/s without, 5,300-6,800 with. Replies to ordinary commands stay
   * in order either way.
   */
  static connect(address: QmpAddress, opts: QmpClientOptions = {}): ResultAsync<QmpClient, QmpError> {
    const client = new QmpClient(address, opts);
    const timeoutMs = opts.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
    const where = formatAddress(address);
    return client.protocol
      .connect(address, timeoutMs)
      .andThen(() => client.awaitGreeting(timeoutMs))
      .andThen((greeting) => {
        // only what the greeting offers may be enabled (QEMU refuses the rest)
        const enable = opts.oob !== false && greeting.capabilities.includes("oob") ? ["oob"] : [];
        return client.execute("qmp_capabilities", enable.length > 0 ? { enable } : {}, { timeoutMs }).map(() => {
          client.enabled = enable;
        });
      })
      .map(() => client)
      .mapErr((e): QmpError => {
        client.close();
        return e.code === "connect" ? e : { code: "connect", address: where, message: describeSetupFailure(e) };
      });
  }

  get runstate(): Runstate {
    return this.protocol.runstate;
  }

  get greeting(): GreetingMessage {
    if (this.greetingMsg === undefined) throw new Error("greeting read before connect completed");
    return this.greetingMsg;
  }

  /** The capabilities negotiated with QEMU. */
  get capabilities(): readonly string[] {
    return this.enabled;
  }

  get version(): QmpVersion {
    return this.greeting.version;
  }

  /** Commands sent and not yet answered. */
  get inFlight(): number {
    return this.pending.size;
  }

  /**
   * A typed command from QmpCommandMap. Its reply is checked against the
   * command's shape (shapes.ts) before the caller sees it: one that does not
   * fit fails with a `protocol` error and the connection is closed, as for
   * any other message QEMU would never send.
   */
  execute<C extends QmpCommandName>(
    command: C,
    ...rest: undefined extends QmpCommandMap[C]["args"]
      ? [args?: QmpCommandMap[C]["args"], opts?: ExecuteOptions]
      : [args: QmpCommandMap[C]["args"], opts?: ExecuteOptions]
  ): ResultAsync<QmpCommandMap[C]["ret"], QmpError> {
    const [args, opts] = rest;
    return this.send(command, args as object | undefined, opts ?? {}, REPLY_SHAPES[command]) as ResultAsync<
      QmpCommandMap[C]["ret"],
      QmpError
    >;
  }

  /** Any command, untyped and unchecked: the escape hatch for what QmpCommandMap does not list. */
  executeRaw(command: string, args?: object, opts: ExecuteOptions = {}): ResultAsync<unknown, QmpError> {
    return this.send(command, args, opts, undefined);
  }

  private send(command: string, args: object | undefined, opts: ExecuteOptions, shape: Shape | undefined): ResultAsync<unknown, QmpError> {
    if (this.protocol.runstate !== "running") {
      return errAsync(
        this.closeInfo !== undefined
          ? { code: "disconnected", message: `cannot send ${command}: ${this.closeInfo.message}` }
          : { code: "state", state: this.protocol.runstate, message: `cannot send ${command}: not connected` },
      );
    }
    // A plain number: QEMU parses and echoes it measurably faster than a string
    // (pipelined query-version here: ~4,450/s against ~3,900/s). Replies carry it back as a number; parseId makes it a key.
    const seq = ++this.nextId;
    const id = String(seq);
    const timeoutMs = opts.timeoutMs ?? this.commandTimeoutMs;
    const deadline = Date.now() + timeoutMs;
    const reply = new Promise<Result<unknown, QmpError>>((resolve) => {
      this.pending.set(id, { command, resolve, deadline, timeoutMs, shape });
    });
    if (deadline < this.timeoutAt) this.armTimeout(deadline);
    this.protocol.send(serializeCommand(seq, command, args));
    return new ResultAsync(reply);
  }

  private armTimeout(at: number): void {
    if (this.timeoutTimer !== undefined) clearTimeout(this.timeoutTimer);
    this.timeoutAt = at;
    this.timeoutTimer = setTimeout(() => this.expirePending(), Math.max(0, at - Date.now()));
    this.timeoutTimer.unref();
  }

  private disarmTimeout(): void {
    if (this.timeoutTimer !== undefined) clearTimeout(this.timeoutTimer);
    this.timeoutTimer = undefined;
    this.timeoutAt = Number.POSITIVE_INFINITY;
  }

  private expirePending(): void {
    this.disarmTimeout();
    const now = Date.now();
    let next = Number.POSITIVE_INFINITY;
    for (const [id, p] of this.pending) {
      if (p.deadline <= now) {
        this.pending.delete(id);
        this.abandoned.add(id);
        p.resolve(err({ code: "timeout", command: p.command, timeoutMs: p.timeoutMs }));
      } else if (p.deadline < next) {
        next = p.deadline;
      }
    }
    if (next !== Number.POSITIVE_INFINITY) this.armTimeout(next);
  }

  /**
   * Listen for events by name, optionally narrowed by a predicate. Register
   * before sending the command that causes them.
   */
  listen<N extends QmpEventName>(names: readonly N[], filter?: (e: QmpEventOf<N>) => boolean): EventListener<N> {
    const l = new EventListener<N>(new Set(names), filter, (x) => this.listeners.delete(x as never));
    if (this.closeInfo !== undefined) l.close();
    else this.listeners.add(l as unknown as EventListener<QmpEventName>);
    return l;
  }

  /** Called once when the connection ends (immediately if it already has). */
  onClose(handler: (info: CloseInfo) => void): () => void {
    if (this.closeInfo !== undefined) {
      const info = this.closeInfo;
      queueMicrotask(() => handler(info));
      return () => {};
    }
    this.closeHandlers.add(handler);
    return () => this.closeHandlers.delete(handler);
  }

  close(): Promise<CloseInfo> {
    this.protocol.close("local", "closed by client");
    return this.closed;
  }

  private awaitGreeting(timeoutMs: number): ResultAsync<GreetingMessage, QmpError> {
    if (this.greetingMsg !== undefined) return ResultAsync.fromSafePromise(Promise.resolve(this.greetingMsg));
    const p = new Promise<Result<GreetingMessage, QmpError>>((resolve) => {
      const timer = setTimeout(() => {
        this.greetingWaiter = undefined;
        resolve(err({ code: "timeout", command: "greeting", timeoutMs }));
      }, timeoutMs);
      const unsub = this.onClose((info) => {
        clearTimeout(timer);
        resolve(err({ code: "disconnected", message: info.message }));
      });
      this.greetingWaiter = (g) => {
        clearTimeout(timer);
        unsub();
        resolve(ok(g));
      };
    });
    return new ResultAsync(p);
  }

  private onMessage(msg: QmpInbound): void {
    switch (msg.kind) {
      case "greeting": {
        const waiter = this.greetingWaiter;
        if (waiter === undefined) {
          this.protocol.protocolError("unexpected greeting");
          return;
        }
        this.greetingWaiter = undefined;
        this.greetingMsg = msg;
        waiter(msg);
        return;
      }
      case "return":
      case "error": {
        if (msg.id === undefined) {
          this.protocol.protocolError(`${msg.kind} without id${msg.kind === "error" ? `: ${msg.desc}` : ""}`);
          return;
        }
        const p = this.pending.get(msg.id);
        if (p === undefined) {
          if (this.abandoned.delete(msg.id)) {
            this.log.warn({ id: msg.id }, "late reply to a timed-out command dropped");
            return;
          }
          this.protocol.protocolError(`reply to unknown id ${JSON.stringify(msg.id)}`);
          return;
        }
        this.pending.delete(msg.id);
        if (this.pending.size === 0) this.disarmTimeout();
        const wrong = msg.kind === "return" ? p.shape?.(msg.value, "return") : undefined;
        if (wrong !== undefined) {
          // not QEMU, or a broken one: nothing it says on this connection can be trusted
          const message = `${p.command} answered with a reply of the wrong shape: ${wrong}`;
          p.resolve(err({ code: "protocol", message: `QMP protocol error: ${message}` }));
          this.protocol.protocolError(message);
          return;
        }
        p.resolve(
          msg.kind === "return" ? ok(msg.value) : err({ code: "command", command: p.command, errorClass: msg.errorClass, desc: msg.desc }),
        );
        return;
      }
      case "event":
        this.dispatchEvent(msg);
        return;
    }
  }

  private dispatchEvent(msg: EventMessage): void {
    const wrong = eventShapeError(msg.event, msg.data);
    if (wrong !== undefined) {
      this.protocol.protocolError(`${msg.event} event of the wrong shape: ${wrong}`);
      return;
    }
    for (const l of this.listeners) l.offer(msg);
  }

  private handleClose(info: CloseInfo): void {
    this.closeInfo = info;
    if (info.cause !== "local") this.log.warn({ cause: info.cause, reason: info.message }, "QMP connection closed");
    const failure: QmpError = { code: "disconnected", message: info.message };
    this.disarmTimeout();
    for (const [, p] of this.pending) p.resolve(err(failure));
    this.pending.clear();
    this.abandoned.clear();
    for (const l of [...this.listeners]) l.close();
    for (const h of [...this.closeHandlers]) h(info);
    this.closeHandlers.clear();
    this.resolveClosed(info);
  }
}

function describeSetupFailure(e: QmpError): string {
  switch (e.code) {
    case "timeout":
      return e.command === "greeting" ? `no QMP greeting within ${e.timeoutMs} ms` : `no reply to ${e.command} within ${e.timeoutMs} ms`;
    case "command":
      return `${e.command} refused: ${e.desc}`;
    default:
      return e.message;
  }
}
