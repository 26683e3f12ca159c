/**
 * A clock whose time moves only when the test moves it, so a scheduler's
 * decisions (intervals, back-off, concurrency) are checked exactly instead
 * of against wall-clock gaps a loaded CI machine stretches at random.
 */
import type { Clock } from "../../src/jobs/writeback.js";

interface Sleeper {
  readonly at: number;
  readonly seq: number;
  readonly wake: () => void;
}

const immediate = () => new Promise<void>((r) => setImmediate(r));
/** Real file-system requests in flight (opening or closing a file under test). */
const fileIo = () => process.getActiveResourcesInfo().filter((r) => r.startsWith("FSReq") || r.endsWith("CloseReq")).length;

export class VirtualClock implements Clock {
  private t = 0;
  private seq = 0;
  private sleepers: Sleeper[] = [];

  now(): number {
    return this.t;
  }

  sleep(ms: number): Promise<void> {
    return new Promise((wake) => {
      this.sleepers.push({ at: this.t + Math.max(0, ms), seq: this.seq++, wake });
    });
  }

  /** Let everything run that does not wait for the clock: promise chains and real file I/O. */
  async settle(): Promise<void> {
    // bounded: file I/O that is not ours (the test runner's) must not hang the test; a file open takes far fewer turns
    for (let quiet = 0, turns = 0; quiet < 2 && turns < 20_000; turns++) {
      await immediate();
      quiet = fileIo() === 0 ? quiet + 1 : 0;
    }
  }

  /** Move time forward by `ms`, waking sleepers one at a time in order and letting each run before the next. */
  async advance(ms: number): Promise<void> {
    const end = this.t + ms;
    while (await this.step(end));
    this.t = end;
  }

  /** Move time forward until `p` settles (it must be waiting on this clock, or it never would). */
  async until<T>(p: Promise<T>): Promise<T> {
    let done = false;
    const watched = p.finally(() => {
      done = true;
    });
    while (!done)
      if (!(await this.step(Number.POSITIVE_INFINITY)) && !done) throw new Error("nothing left to wake, and the promise is still pending");
    return watched;
  }

  /** Settle, then wake the next sleeper due by `end`; false if there is none. */
  private async step(end: number): Promise<boolean> {
    await this.settle();
    let next: Sleeper | undefined;
    for (const s of this.sleepers) if (next === undefined || s.at < next.at || (s.at === next.at && s.seq < next.seq)) next = s;
    if (next === undefined || next.at > end) return false;
    this.sleepers.splice(this.sleepers.indexOf(next), 1);
    this.t = next.at;
    next.wake();
    return true;
  }
}
