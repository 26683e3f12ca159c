/**
 * Reconnection with exponential backoff, for callers that want a monitor to
 * come back after QEMU restarts (the daemon keeps one per domain). The client
 * itself never reconnects: a new connection is a new QmpClient, so no reply
 * from an old connection can ever reach a caller of the new one.
 */
import type { Logger } from "../log.js";
import { rootLogger } from "../log.js";
import { QmpClient, type QmpClientOptions } from "./client.js";
import { qmpErrorMessage } from "./errors.js";
import type { CloseInfo, QmpAddress } from "./protocol.js";
import { formatAddress } from "./protocol.js";

export interface BackoffOptions {
  readonly initialDelayMs?: number;
  readonly maxDelayMs?: number;
  readonly factor?: number;
}

/** Delay before attempt `n` (0-based), with ±20% jitter so many domains do not retry in lockstep. */
export function backoffDelay(n: number, o: BackoffOptions = {}, random = Math.random): number {
  const base = Math.min((o.initialDelayMs ?? 100) * (o.factor ?? 2) ** n, o.maxDelayMs ?? 10_000);
  return Math.round(base * (0.8 + 0.4 * random()));
}

export interface SupervisorHandlers {
  /** A new connection is up and negotiated. */
  readonly connected: (client: QmpClient) => void;
  /** The connection went away; the supervisor is already retrying. */
  readonly disconnected: (info: CloseInfo) => void;
  /** A connect attempt failed (the socket is missing, refused, QEMU did not greet…); retrying. */
  readonly failed?: (message: string) => void;
}

/**
 * Keeps one QMP connection up: connects, and after every close retries with
 * backoff until stopped.
 */
export class QmpSupervisor {
  private stopped = false;
  private attempt = 0;
  private timer: NodeJS.Timeout | undefined;
  private current: QmpClient | undefined;
  private readonly log: Logger;

  constructor(
    readonly address: QmpAddress,
    private readonly handlers: SupervisorHandlers,
    private readonly clientOpts: QmpClientOptions = {},
    private readonly backoff: BackoffOptions = {},
  ) {
    this.log = (clientOpts.logger ?? rootLogger).child({ qmp: formatAddress(address) });
  }

  get client(): QmpClient | undefined {
    return this.current;
  }

  start(): void {
    this.stopped = false;
    void this.tryConnect();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer !== undefined) clearTimeout(this.timer);
    const c = this.current;
    this.current = undefined;
    if (c !== undefined) await c.close();
  }

  private async tryConnect(): Promise<void> {
    this.timer = undefined;
    if (this.stopped) return;
    const r = await QmpClient.connect(this.address, this.clientOpts);
    if (this.stopped) {
      if (r.isOk()) await r.value.close();
      return;
    }
    if (r.isErr()) {
      const delay = backoffDelay(this.attempt++, this.backoff);
      if (this.attempt === 1 || this.attempt % 10 === 0) {
        this.log.warn({ attempt: this.attempt, retryInMs: delay, reason: qmpErrorMessage(r.error) }, "QMP connect failed; retrying");
      }
      this.timer = setTimeout(() => void this.tryConnect(), delay);
      this.handlers.failed?.(qmpErrorMessage(r.error));
      return;
    }
    const client = r.value;
    this.current = client;
    client.onClose((info) => {
      if (this.current === client) this.current = undefined;
      if (this.stopped) return;
      // A connection we hung up on for nonsense does not reset the backoff: a
      // peer that greets properly and then answers garbage (not QEMU, or a
      // broken one) would otherwise be redialled every initialDelayMs forever.
      if (info.cause !== "protocol") this.attempt = 0;
      this.handlers.disconnected(info);
      this.timer = setTimeout(() => void this.tryConnect(), backoffDelay(this.attempt++, this.backoff));
    });
    this.handlers.connected(client);
  }
}
