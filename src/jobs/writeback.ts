/**
 * Durable push targets without QEMU flushing them on the copy's critical path.
 *
 * Push targets are opened with cache.no-flush: otherwise qcow2 flushes the
 * target file each time it writes out metadata whose order matters for a
 * crash mid-write, and the job waits for the disk again and again (measured:
 * a 1 GiB copy took 1.1 s instead of 0.56 s). Crash consistency of a target
 * mid-copy is worthless to us anyway: a backup interrupted by a host crash
 * is failed and removed.
 *
 * Durability is then ours to provide, in two parts:
 *   - the pump: while jobs copy, fdatasync their targets over and over from
 *     the daemon, so the device writes the backup out while QEMU is still
 *     copying instead of all at the end (the kernel itself starts writeback
 *     only at dirty_background_ratio, many GiB on a large host);
 *   - syncFiles: once QEMU has closed a target (blockdev-del writes the qcow2
 *     metadata out), fdatasync it and fsync its directory; only then is the
 *     backup ready. An error there fails the backup.
 *
 * A writeback error is reported by fsync only once per file (Linux errseq):
 * the pump keeps what it saw, and the final step reports it.
 */
import { constants } from "node:fs";
import { type FileHandle, open } from "node:fs/promises";
import { dirname } from "node:path";
import { fsyncDir } from "../util/atomic-file.js";

/** fdatasync of an open file; `phase` says whether the copy may still be running. */
export type DataSync = (fh: FileHandle, path: string, phase: "background" | "final") => Promise<void>;

/** Time as the pump sees it; tests run the pump on a virtual clock so its schedule does not depend on the machine's load. */
export interface Clock {
  now(): number;
  sleep(ms: number): Promise<void>;
}

const realClock: Clock = {
  now: () => Date.now(),
  sleep: (ms) => new Promise((r) => setTimeout(r, ms)),
};

interface Entry {
  readonly path: string;
  fh: FileHandle | undefined;
  /** The first writeback error the pump saw on this file. */
  error: string | undefined;
  removed: boolean;
  busy: Promise<void> | undefined;
  /** When the next sync is due, and the wait after the last one. */
  due: number;
  interval: number;
}

export interface PumpOptions {
  /** How a file is written out (tests inject failures here). */
  readonly datasync?: DataSync;
  /** fdatasync calls in flight at once (they occupy libuv's thread pool, which the daemon's own I/O shares). */
  readonly concurrency?: number;
  /** Do not sync a file more often than this. */
  readonly minIntervalMs?: number;
  /**
   * A sync quicker than `quickMs` found little to write (a throttled or
   * finished copy): the wait before the next one doubles, up to this. Each
   * sync also commits the filesystem journal and flushes the device cache,
   * so a slow backup must not cost 20 of those a second for hours.
   */
  readonly maxIntervalMs?: number;
  readonly quickMs?: number;
  readonly clock?: Clock;
}

export class WritebackPump {
  private readonly entries: Entry[] = [];
  private workers = 0;
  private readonly concurrency: number;
  private readonly minIntervalMs: number;
  private readonly maxIntervalMs: number;
  private readonly quickMs: number;
  private readonly datasync: DataSync;
  private readonly clock: Clock;

  constructor(opts: PumpOptions = {}) {
    this.concurrency = opts.concurrency ?? 2;
    this.minIntervalMs = opts.minIntervalMs ?? 50;
    this.maxIntervalMs = opts.maxIntervalMs ?? 1000;
    this.quickMs = opts.quickMs ?? 20;
    this.datasync = opts.datasync ?? ((fh) => fh.datasync());
    this.clock = opts.clock ?? realClock;
  }

  /** Start writing `path` out in the background; the returned function stops that and tells the first error seen. */
  add(path: string): () => Promise<string | undefined> {
    const e: Entry = { path, fh: undefined, error: undefined, removed: false, busy: undefined, due: 0, interval: this.minIntervalMs };
    this.entries.push(e);
    while (this.workers < this.concurrency) {
      this.workers++;
      void this.work();
    }
    return async () => {
      e.removed = true;
      const i = this.entries.indexOf(e);
      if (i >= 0) this.entries.splice(i, 1);
      await e.busy;
      await e.fh?.close().catch(() => {});
      e.fh = undefined;
      return e.error;
    };
  }

  private next(): Entry | undefined {
    let best: Entry | undefined;
    for (const e of this.entries) if (e.busy === undefined && (best === undefined || e.due < best.due)) best = e;
    return best;
  }

  private async work(): Promise<void> {
    try {
      for (;;) {
        if (this.entries.length === 0) return;
        const e = this.next();
        if (e === undefined) {
          // every file is being synced by another worker
          await this.clock.sleep(this.minIntervalMs);
          continue;
        }
        const wait = e.due - this.clock.now();
        if (wait > 0) {
          // not longer than the shortest interval: another file may fall due meanwhile
          await this.clock.sleep(Math.min(wait, this.minIntervalMs));
          continue;
        }
        const start = this.clock.now();
        e.busy = this.syncOnce(e);
        await e.busy;
        e.busy = undefined;
        const end = this.clock.now();
        e.interval = end - start < this.quickMs ? Math.min(e.interval * 2, this.maxIntervalMs) : this.minIntervalMs;
        e.due = end + e.interval;
      }
    } finally {
      this.workers--;
    }
  }

  private async syncOnce(e: Entry): Promise<void> {
    try {
      e.fh ??= await open(e.path, constants.O_RDONLY);
      if (!e.removed) await this.datasync(e.fh, e.path, "background");
    } catch (x) {
      // ENOENT: the file is already gone (a failed job removed it); anything else is a real writeback error
      const code = (x as NodeJS.ErrnoException).code;
      if (code !== "ENOENT") e.error ??= (x as Error).message;
      e.removed = true;
      const i = this.entries.indexOf(e);
      if (i >= 0) this.entries.splice(i, 1);
    }
  }

  /**
   * Make closed files durable: fdatasync each (data, size, allocation), then
   * fsync each directory once (the entries of newly created files).
   * Resolves with the first error, naming the file.
   */
  async syncFiles(paths: readonly string[]): Promise<string | undefined> {
    return syncFiles(paths, this.datasync);
  }
}

async function syncFiles(paths: readonly string[], datasync: DataSync): Promise<string | undefined> {
  for (const p of paths) {
    try {
      const fh = await open(p, constants.O_RDONLY);
      try {
        await datasync(fh, p, "final");
      } finally {
        await fh.close();
      }
    } catch (e) {
      return `cannot write ${p} out to disk: ${(e as Error).message}`;
    }
  }
  for (const dir of new Set(paths.map((p) => dirname(p)))) {
    try {
      await fsyncDir(dir);
    } catch (e) {
      return `cannot write directory ${dir} out to disk: ${(e as Error).message}`;
    }
  }
  return undefined;
}
