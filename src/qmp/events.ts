/**
 * Per-listener event queues (qemu.qmp's events.py). The client pushes each
 * event into every matching listener's own queue synchronously and moves on,
 * so a consumer that is slow to read never delays command replies or other
 * listeners. Register a listener *before* sending the command whose events it
 * waits for: JOB_STATUS_CHANGE can arrive before the command's reply.
 */
import { errAsync, ResultAsync } from "neverthrow";
import type { QmpError } from "./errors.js";
import type { EventMessage, QmpTimestamp } from "./messages.js";
import type { QmpEventMap } from "./qapi.js";

export type QmpEventName = keyof QmpEventMap;

export interface QmpEvent<N extends QmpEventName = QmpEventName> {
  readonly name: N;
  readonly data: QmpEventMap[N];
  readonly timestamp: QmpTimestamp;
}

/** An event of any of the names `N`, narrowed by `name`. */
export type QmpEventOf<N extends QmpEventName> = { [K in N]: QmpEvent<K> }[N];

/** Queued events beyond this are dropped (and counted): a listener nobody reads must not grow without bound. */
export const DEFAULT_MAX_QUEUE = 10_000;

type Waiter<E> = { resolve: (e: E | undefined) => void; timer: NodeJS.Timeout | undefined };

export class EventListener<N extends QmpEventName> implements AsyncIterable<QmpEventOf<N>> {
  private readonly queue: QmpEventOf<N>[] = [];
  private readonly waiters: Waiter<QmpEventOf<N>>[] = [];
  private closed = false;
  /** Events dropped because the queue was full. */
  dropped = 0;

  constructor(
    private readonly names: ReadonlySet<string>,
    private readonly filter: ((e: QmpEventOf<N>) => boolean) | undefined,
    private readonly onClose: (l: EventListener<N>) => void,
    private readonly maxQueue = DEFAULT_MAX_QUEUE,
  ) {}

  /** Called by the client for every event; returns whether it was taken. */
  offer(msg: EventMessage): boolean {
    if (this.closed || !this.names.has(msg.event)) return false;
    const ev = { name: msg.event, data: msg.data, timestamp: msg.timestamp } as QmpEventOf<N>;
    if (this.filter !== undefined && !this.filter(ev)) return false;
    const w = this.waiters.shift();
    if (w !== undefined) {
      if (w.timer !== undefined) clearTimeout(w.timer);
      w.resolve(ev);
    } else if (this.queue.length < this.maxQueue) {
      this.queue.push(ev);
    } else {
      this.dropped++;
    }
    return true;
  }

  /** The next event; undefined once the listener (or its connection) is closed or on timeout. */
  next(timeoutMs?: number): Promise<QmpEventOf<N> | undefined> {
    const queued = this.queue.shift();
    if (queued !== undefined) return Promise.resolve(queued);
    if (this.closed) return Promise.resolve(undefined);
    return new Promise((resolve) => {
      const w: Waiter<QmpEventOf<N>> = { resolve, timer: undefined };
      if (timeoutMs !== undefined) {
        w.timer = setTimeout(() => {
          const i = this.waiters.indexOf(w);
          if (i >= 0) this.waiters.splice(i, 1);
          resolve(undefined);
        }, timeoutMs);
      }
      this.waiters.push(w);
    });
  }

  /** The first event (queued or future) satisfying `pred`, as a Result. */
  waitFor(pred: (e: QmpEventOf<N>) => boolean, timeoutMs: number): ResultAsync<QmpEventOf<N>, QmpError> {
    const deadline = Date.now() + timeoutMs;
    const loop = async (): Promise<QmpEventOf<N> | "timeout" | "closed"> => {
      for (;;) {
        const left = deadline - Date.now();
        if (left <= 0) return "timeout";
        const e = await this.next(left);
        if (e === undefined) return this.closed ? "closed" : "timeout";
        if (pred(e)) return e;
      }
    };
    return ResultAsync.fromSafePromise(loop()).andThen((r) => {
      if (r === "timeout") return errAsync<never, QmpError>({ code: "timeout", command: `wait for event`, timeoutMs });
      if (r === "closed") return errAsync<never, QmpError>({ code: "disconnected", message: "event listener closed" });
      return ResultAsync.fromSafePromise(Promise.resolve(r));
    });
  }

  get pending(): number {
    return this.queue.length;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const w of this.waiters.splice(0)) {
      if (w.timer !== undefined) clearTimeout(w.timer);
      w.resolve(undefined);
    }
    this.onClose(this);
  }

  async *[Symbol.asyncIterator](): AsyncIterator<QmpEventOf<N>> {
    for (;;) {
      const e = await this.next();
      if (e === undefined) return;
      yield e;
    }
  }
}
