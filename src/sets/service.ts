/**
 * Backup sets: a directory per domain of restore points, each one a backup
 * of every disk marked by a checkpoint, that one command keeps growing —
 * incremental since the newest point while its checkpoint is valid on every
 * disk, otherwise full, saying why — and that can be listed, restored,
 * verified, pruned and served. This module sequences those operations; the
 * manifest (manifest.ts, store.ts), the qemu-img steps (qemu-img.ts) and each
 * operation's own steps (restore.ts, verify.ts, prune.ts, export.ts) live
 * apart.
 *
 * A set backup is a push backup like any other (the job layer runs it: undo,
 * adoption, durability are theirs), with its targets in the set and a
 * journal (pending.json) written before it starts. The backup becomes a
 * restore point when its job ends ready (`settle`): its images get their
 * relative backing links, their digests, then the point's manifest, then
 * the index. A job that failed leaves no point and its files are removed; a
 * daemon killed meanwhile settles the backup on the job's outcome later (job
 * records survive a restart). Until a backup settles, the set's next backup
 * and prune are refused as busy.
 */
import { createHash } from "node:crypto";
import { readdir } from "node:fs/promises";
import { join } from "node:path";
import { errAsync, okAsync, ResultAsync } from "neverthrow";
import { escapeText } from "../conf/escape.js";
import { checkName } from "../conf/names.js";
import type { BeginOptions } from "../jobs/domain.js";
import type { BackupError } from "../jobs/errors.js";
import type { BackupJobInfo, JobEvent } from "../jobs/model.js";
import { removeSafely, type Trust, trustFor } from "../jobs/safe-fs.js";
import type { Logger } from "../log.js";
import { ensureDir, removeFileDurable, writeFileAtomic } from "../util/atomic-file.js";
import { digestFile } from "./digest.js";
import type { SetError } from "./errors.js";
import { type SetExportInfo, SetExports } from "./export.js";
import { SetLocks, type SetOp } from "./lock.js";
import {
  backingLink,
  DATA_DIR,
  imageFile,
  type PendingBackup,
  POINT_FORMAT,
  type Point,
  type PointDisk,
  type PointKind,
  type PruneJournal,
  SET_FORMAT,
  type SetIndex,
  seqName,
} from "./manifest.js";
import { planPrune, resumePrune, runPrune } from "./prune.js";
import { QemuImg } from "./qemu-img.js";
import { type RestoreResult, restorePoint } from "./restore.js";
import { locateSet, type SetDir } from "./store.js";
import { type VerifyReport, verifySet } from "./verify.js";

/** What the sets need of a domain (the daemon's Domain has it). */
export interface SetDomain {
  readonly name: string;
  readonly state: string;
  readonly imageOwner?: { readonly uid: number; readonly gid: number } | undefined;
  readonly checkpoints: {
    readonly store: {
      get(name: string): { readonly disks: readonly { readonly name: string; readonly checkpoint: string }[] } | undefined;
    };
  };
}

export interface SetServiceDeps {
  readonly logger: Logger;
  readonly stateDir: string;
  readonly allowedDirs: readonly string[];
  readonly domain: (name: string) => SetDomain | undefined;
  /** Begin a push backup (online or offline, as the API would). */
  readonly begin: (
    d: SetDomain,
    backupXml: string | undefined,
    checkpointXml: string,
    opts: BeginOptions,
  ) => ResultAsync<BackupJobInfo, BackupError>;
  /** The domain's running job, if any (after its recovery), and its last finished one. */
  readonly activeJob: (domain: string) => Promise<BackupJobInfo | undefined>;
  readonly completedJob: (domain: string) => Promise<BackupJobInfo | undefined>;
  readonly subscribe: (fn: (e: JobEvent) => void) => () => void;
  /** Delete a checkpoint (online or offline); refused while the domain is busy. */
  readonly deleteCheckpoint: (d: SetDomain, name: string) => ResultAsync<unknown, BackupError>;
  /** QEMU's users of the registered domains (a set's directories belong to its domain's). */
  readonly qemuUsers?: (() => readonly { readonly uid: number; readonly gid: number }[]) | undefined;
  readonly qemuImg?: QemuImg | undefined;
  readonly storageDaemon?: string | undefined;
}

export interface SetBackupOptions {
  readonly full?: boolean;
  readonly quiesce?: boolean;
  readonly bandwidth?: number | undefined;
}

export interface SetBackupStarted {
  readonly set: string;
  readonly checkpoint: string;
  readonly kind: PointKind;
  /** Why a full was made when none was asked for. */
  readonly reason: string | null;
  readonly job: BackupJobInfo;
}

export interface PointJson {
  readonly checkpoint: string;
  readonly seq: number;
  readonly time: string;
  readonly kind: PointKind;
  readonly reason: string | null;
  readonly merged: boolean;
  readonly parent: string | null;
  readonly disks: readonly { name: string; file: string; dataSize: number; virtualSize: number; sha256: string }[];
}

export interface SetListing {
  readonly set: string;
  readonly domain: string;
  readonly points: readonly PointJson[];
  /** A backup not settled yet: its job runs, or its outcome is not known yet. */
  readonly pending: { readonly checkpoint: string; readonly kind: PointKind; readonly job: string | null; readonly state: string } | null;
  /** What the last settled backup of this set came to, while the daemon runs (for `qbackup backup`'s wait). */
  readonly lastSettled: { readonly checkpoint: string; readonly outcome: "recorded" | "discarded"; readonly message: string | null } | null;
}

export interface PruneResult {
  readonly set: string;
  readonly kept: readonly string[];
  readonly removed: readonly string[];
  readonly merged: readonly string[];
  readonly checkpointsDeleted: readonly string[];
  /** Checkpoints the set no longer needs that could not be deleted now (tried again at the next prune), with why. */
  readonly checkpointsLeft: readonly { readonly checkpoint: string; readonly reason: string }[];
}

/** Codes of a begin refused because the incremental cannot be trusted: the backup is made full instead, saying why. */
const FALLBACK: ReadonlySet<string> = new Set(["checkpoint-invalid", "bitmap-missing", "not-found", "unknown-disk", "xml-invalid"]);

type Settled = "none" | "running" | "unknown" | "recorded" | "discarded";

function pointJson(p: Point, points: ReadonlyMap<number, Point>): PointJson {
  return {
    checkpoint: p.checkpoint,
    seq: p.seq,
    time: p.time,
    kind: p.kind,
    reason: p.reason ?? null,
    merged: p.merged === true,
    parent: p.parent === null ? null : (points.get(p.parent)?.checkpoint ?? null),
    disks: p.disks.map((d) => ({ name: d.name, file: d.file, dataSize: d.dataSize, virtualSize: d.virtualSize, sha256: d.sha256 })),
  };
}

/** `work`, then the set given back, whatever the work came to (its Result passes through). */
function releasing<T>(release: () => void, work: ResultAsync<T, SetError>): ResultAsync<T, SetError> {
  return new ResultAsync(
    Promise.resolve(work).then((r) => {
      release();
      return r;
    }),
  );
}

/** The checkpoint marking a point: unique per set and time. */
function pointName(seq: number): string {
  const stamp = new Date().toISOString().replace(/[-:]/g, "").replace(/\..*$/, "");
  return `set-${stamp}-${seqName(seq)}`;
}

export class SetService {
  readonly locks = new SetLocks();
  private readonly img: QemuImg;
  private readonly exports: SetExports;
  private readonly log: Logger;
  /** Sets with a backup this daemon watches: set root → the lock's release. */
  private readonly watching = new Map<
    string,
    { readonly set: SetDir; readonly release: () => void; readonly domain: string; readonly checkpoint: string }
  >();
  private readonly lastSettled = new Map<string, SetListing["lastSettled"]>();
  private readonly registry: string;
  private readonly settling = new Map<string, Promise<unknown>>();

  constructor(private readonly deps: SetServiceDeps) {
    this.log = deps.logger;
    this.img = deps.qemuImg ?? new QemuImg();
    this.exports = new SetExports({
      stateDir: deps.stateDir,
      logger: deps.logger,
      binary: deps.storageDaemon,
      allowedDirs: deps.allowedDirs,
    });
    this.registry = join(deps.stateDir, "set-pending");
    deps.subscribe((e) => this.onJobEvent(e));
  }

  /** Start: end exports a killed daemon left; watch the sets whose backups it left unsettled. */
  async start(): Promise<void> {
    this.exports.cleanLeftovers();
    const names = await readdir(this.registry).catch(() => [] as string[]);
    for (const n of names) {
      if (!n.endsWith(".json")) continue;
      const root = await import("node:fs/promises").then((f) => f.readFile(join(this.registry, n), "utf8")).catch(() => undefined);
      if (root === undefined) continue;
      const set = await locateSet(root.trim(), { allowedDirs: this.deps.allowedDirs, trust: trustFor() });
      if (set.isErr()) {
        this.log.warn({ set: root, error: set.error.message }, "a backup set with an unsettled backup is gone or refused");
        await removeFileDurable(join(this.registry, n));
        continue;
      }
      const p = await set.value.readPending();
      if (p.isErr() || p.value === undefined) {
        await removeFileDurable(join(this.registry, n));
        continue;
      }
      const held = this.locks.acquire(
        set.value.root,
        "backup",
        `backup of '${p.value.domain}' for checkpoint '${p.value.checkpoint}' (left by the previous daemon)`,
      );
      if (held.isOk())
        this.watching.set(set.value.root, { set: set.value, release: held.value, domain: p.value.domain, checkpoint: p.value.checkpoint });
    }
  }

  async stop(): Promise<void> {
    await this.exports.endAll();
  }

  private registryFile(root: string): string {
    return join(this.registry, `${createHash("sha256").update(root).digest("hex").slice(0, 32)}.json`);
  }

  private onJobEvent(e: JobEvent): void {
    if (e.info.active) return;
    for (const w of this.watching.values()) {
      if (w.domain === e.info.domain && w.checkpoint === e.info.checkpoint) void this.settleWatched(w.set.root);
    }
  }

  private async settleWatched(root: string): Promise<void> {
    const w = this.watching.get(root);
    if (w === undefined) return;
    const r = await this.settle(w.set);
    if (r.isErr()) {
      this.log.error({ set: root, error: r.error.message }, "a set backup could not be settled");
      return;
    }
    if (r.value === "running" || r.value === "unknown") return;
    if (this.watching.get(root) === w) {
      this.watching.delete(root);
      w.release();
    }
  }

  private locate(dir: string, owner: SetDomain["imageOwner"], create = false): ResultAsync<SetDir, SetError> {
    return locateSet(dir, {
      allowedDirs: this.deps.allowedDirs,
      trust: owner !== undefined || create ? trustFor(owner) : this.anyQemuTrust(),
      create,
      owner,
    });
  }

  /** Before the set is read, its domain is not known: root, the daemon and the QEMU user of any registered domain. */
  private anyQemuTrust(): Trust {
    const t = trustFor();
    const uids = new Set(t.uids);
    const gids = new Set(t.gids);
    for (const u of this.deps.qemuUsers?.() ?? []) {
      uids.add(u.uid);
      gids.add(u.gid);
    }
    return { uids, gids };
  }

  private trustOf(index: SetIndex | undefined): Trust {
    return trustFor(index === undefined ? undefined : this.deps.domain(index.domain)?.imageOwner);
  }

  /**
   * Settle the set's unsettled backup if its job has ended: a point when
   * ready, nothing (and its files removed) otherwise. "running" while its
   * job runs; "unknown" while the job's domain is not known to have it or
   * not (not connected yet after a restart).
   */
  private settle(set: SetDir): ResultAsync<Settled, SetError> {
    // one at a time per set: the job's event and a listing may ask at once, and each step reads then writes the index
    const before = this.settling.get(set.root) ?? Promise.resolve();
    const mine = before.then(() => this.settleNow(set));
    const tail = mine.then(
      () => undefined,
      () => undefined,
    );
    this.settling.set(set.root, tail);
    void tail.then(() => {
      if (this.settling.get(set.root) === tail) this.settling.delete(set.root);
    });
    return new ResultAsync(mine);
  }

  private settleNow(set: SetDir): ResultAsync<Settled, SetError> {
    return set.readPending().andThen((p) => {
      if (p === undefined) return okAsync<Settled, SetError>("none");
      const d = this.deps.domain(p.domain);
      return ResultAsync.fromSafePromise(
        (async () => {
          const active = await this.deps.activeJob(p.domain);
          if (active?.active && active.checkpoint === p.checkpoint) return { kind: "running" as const };
          const done = await this.deps.completedJob(p.domain);
          if (done !== undefined && !done.active && done.checkpoint === p.checkpoint) return { kind: "ended" as const, job: done };
          if (d !== undefined && d.state !== "connected" && d.state !== "offline") return { kind: "unknown" as const };
          return { kind: "gone" as const };
        })(),
      ).andThen((s): ResultAsync<Settled, SetError> => {
        if (s.kind === "running" || s.kind === "unknown") return okAsync(s.kind);
        if (s.kind === "ended" && s.job.state === "ready")
          return this.record(set, p, s.job)
            .map((): Settled => "recorded")
            .orElse((e) => this.discard(set, p, `it could not be recorded: ${e.message}`).map((): Settled => "discarded"));
        const why =
          s.kind === "ended"
            ? `its backup job ${s.job.id} ended ${s.job.state}${s.job.error ? `: ${s.job.error}` : ""}`
            : "its backup job is not known to the daemon (it never started, or its record is gone)";
        return this.discard(set, p, why).map((): Settled => "discarded");
      });
    });
  }

  /** The job ended ready: backing links, digests, the point, the index. Each step can run again. */
  private record(set: SetDir, p: PendingBackup, job: BackupJobInfo): ResultAsync<void, SetError> {
    return set.readIndex().andThen((index) => {
      if (index === undefined) return errAsync<void, SetError>({ code: "set-corrupt", message: `${set.path("set.json")} is missing` });
      if (index.points.some((x) => x.seq === p.seq)) return this.finishPending(set, p, "recorded", null);
      const parent =
        p.parent === null ? okAsync<Point | undefined, SetError>(undefined) : set.readPoint(p.parent).map((x): Point | undefined => x);
      return parent.andThen((par) => {
        const disks = job.disks.map((jd) => {
          const file = imageFile(p.seq, jd.name);
          if (jd.file !== set.path(file))
            return errAsync<PointDisk, SetError>({
              code: "set-corrupt",
              message: `disk '${jd.name}' was written to ${jd.file}, not ${set.path(file)}`,
            });
          const prev = par?.disks.find((x) => x.name === jd.name);
          if (p.kind === "incremental" && prev === undefined)
            return errAsync<PointDisk, SetError>({
              code: "set-corrupt",
              message: `disk '${jd.name}' has no image in the previous restore point`,
            });
          const linked =
            prev === undefined ? okAsync<void, SetError>(undefined) : this.img.rebaseUnsafe(set.path(file), backingLink(prev.file));
          return linked
            .andThen(() => this.img.info(set.path(file)))
            .andThen((info) =>
              digestFile(set.path(file)).map(
                (g): PointDisk => ({
                  name: jd.name,
                  file,
                  backing: prev?.file ?? null,
                  virtualSize: info.virtualSize,
                  dataSize: g.dataSize,
                  sha256: g.sha256,
                }),
              ),
            );
        });
        return ResultAsync.combine(disks).andThen((ds) => {
          const point: Point = {
            format: POINT_FORMAT,
            seq: p.seq,
            checkpoint: p.checkpoint,
            time: p.time,
            kind: p.kind,
            ...(p.reason !== undefined ? { reason: p.reason } : {}),
            parent: p.kind === "incremental" ? p.parent : null,
            disks: ds,
          };
          return set
            .writePoint(point)
            .andThen(() => set.readIndex())
            .andThen((now) =>
              set.writeIndex({ ...(now ?? index), points: [...(now ?? index).points, { seq: p.seq, checkpoint: p.checkpoint }] }),
            )
            .andThen(() => this.finishPending(set, p, "recorded", null));
        });
      });
    });
  }

  /** No point: the backup's files go (the job removed what it made; this removes what is left), its checkpoint is noted for prune. */
  private discard(set: SetDir, p: PendingBackup, why: string): ResultAsync<void, SetError> {
    this.log.warn({ set: set.root, checkpoint: p.checkpoint, why }, "a set backup did not become a restore point");
    const trust = trustFor(this.deps.domain(p.domain)?.imageOwner);
    return ResultAsync.fromSafePromise(
      (async () => {
        const names = await readdir(set.path(DATA_DIR)).catch(() => [] as string[]);
        for (const n of names.filter((x) => x.startsWith(`${seqName(p.seq)}.`))) await removeSafely(set.path(`${DATA_DIR}/${n}`), trust);
      })(),
    )
      .andThen(() => set.readIndex())
      .andThen((index) => {
        const d = this.deps.domain(p.domain);
        const still = d?.checkpoints.store.get(p.checkpoint) !== undefined;
        if (index === undefined || !still || index.abandoned.includes(p.checkpoint)) return okAsync<void, SetError>(undefined);
        return set.writeIndex({ ...index, abandoned: [...index.abandoned, p.checkpoint] });
      })
      .andThen(() => this.finishPending(set, p, "discarded", why));
  }

  private finishPending(
    set: SetDir,
    p: PendingBackup,
    outcome: "recorded" | "discarded",
    message: string | null,
  ): ResultAsync<void, SetError> {
    this.lastSettled.set(set.root, { checkpoint: p.checkpoint, outcome, message });
    return set
      .removePending()
      .andThen(() => removeFileDurable(this.registryFile(set.root)))
      .map(() => undefined);
  }

  /** An interrupted prune is finished before anything else touches the set. */
  private resume(set: SetDir): ResultAsync<void, SetError> {
    return set.readPrune().andThen((j) => {
      if (j === undefined) return okAsync<void, SetError>(undefined);
      const held = this.locks.acquire(set.root, "prune", "finishing an interrupted prune");
      if (held.isErr()) return errAsync<void, SetError>(held.error);
      return releasing(
        held.value,
        set.readIndex().andThen((index) => resumePrune(set, j, this.img, this.trustOf(index))),
      );
    });
  }

  /** Take the set for `op` after finishing what a crash interrupted. */
  private open(set: SetDir, op: SetOp, what: string): ResultAsync<() => void, SetError> {
    return this.resume(set).andThen(() => {
      const held = this.locks.acquire(set.root, op, what);
      return held.isErr() ? errAsync(held.error) : okAsync(held.value);
    });
  }

  private indexAndPoints(set: SetDir): ResultAsync<{ index: SetIndex; points: Map<number, Point> }, SetError> {
    return set.readIndex().andThen((index) => {
      if (index === undefined)
        return errAsync<{ index: SetIndex; points: Map<number, Point> }, SetError>({
          code: "not-found",
          message: `${set.root} is not a backup set (no set.json)`,
        });
      return set.readPoints(index).map((points) => ({ index, points }));
    });
  }

  private pickPoint(index: SetIndex, points: ReadonlyMap<number, Point>, at: string | undefined): ResultAsync<Point, SetError> {
    const ref = at === undefined ? index.points[index.points.length - 1] : index.points.find((p) => p.checkpoint === at);
    const p = ref === undefined ? undefined : points.get(ref.seq);
    if (p === undefined)
      return errAsync({
        code: "not-found",
        message: at === undefined ? "the backup set has no restore point yet" : `the backup set has no restore point '${at}'`,
      });
    return okAsync(p);
  }

  // ---- operations

  backup(domainName: string, dir: string, o: SetBackupOptions): ResultAsync<SetBackupStarted, SetError> {
    const d = this.deps.domain(domainName);
    if (d === undefined) return errAsync({ code: "not-found", message: `no domain named '${domainName}'` });
    return this.locate(dir, d.imageOwner, true).andThen((set) =>
      this.resume(set)
        // a backup still watched (this daemon's, or one a killed daemon left) is settled first if its job has ended
        .andThen(() => ResultAsync.fromSafePromise(this.watching.has(set.root) ? this.settleWatched(set.root) : Promise.resolve()))
        .andThen(() => {
          const held = this.locks.acquire(set.root, "backup", `a backup of '${d.name}' into it runs`);
          if (held.isErr()) return errAsync<SetBackupStarted, SetError>(held.error);
          const release = held.value;
          return this.settle(set)
            .andThen((s) => {
              if (s === "running" || s === "unknown")
                return errAsync<SetBackupStarted, SetError>({
                  code: "busy",
                  message: `backup set ${set.root} is busy: ${s === "running" ? "its previous backup still runs" : `the outcome of its previous backup is not known until '${d.name}' is connected`}`,
                });
              return this.startBackup(set, d, o, release);
            })
            .mapErr((e) => {
              if (!this.watching.has(set.root)) release();
              return e;
            });
        }),
    );
  }

  private startBackup(set: SetDir, d: SetDomain, o: SetBackupOptions, release: () => void): ResultAsync<SetBackupStarted, SetError> {
    return set.readIndex().andThen((existing) => {
      if (existing !== undefined && existing.domain !== d.name)
        return errAsync<SetBackupStarted, SetError>({
          code: "set-foreign",
          message: `${set.root} is the backup set of domain '${existing.domain}', not '${d.name}'`,
        });
      const index: SetIndex = existing ?? {
        format: SET_FORMAT,
        domain: d.name,
        created: new Date().toISOString(),
        points: [],
        abandoned: [],
        nextSeq: 1,
      };
      const seq = index.nextSeq;
      const newestRef = index.points[index.points.length - 1];
      // the number is taken before anything is made: a crash leaves files under a number no later backup uses
      return set
        .writeIndex({ ...index, nextSeq: seq + 1 })
        .andThen(() =>
          newestRef === undefined
            ? okAsync<Point | undefined, SetError>(undefined)
            : set.readPoint(newestRef.seq).map((x): Point | undefined => x),
        )
        .andThen((newest) => {
          let kind: PointKind = "incremental";
          let reason: string | undefined;
          if (o.full === true) kind = "full";
          else if (newest === undefined) [kind, reason] = ["full", "the set has no restore point yet"];
          else {
            const cp = d.checkpoints.store.get(newest.checkpoint);
            const covered =
              cp?.disks
                .filter((x) => x.checkpoint === "bitmap")
                .map((x) => x.name)
                .sort() ?? [];
            const held = newest.disks.map((x) => x.name).sort();
            if (cp === undefined)
              [kind, reason] = ["full", `checkpoint '${newest.checkpoint}' of the newest restore point no longer exists`];
            else if (covered.join(",") !== held.join(","))
              [kind, reason] = [
                "full",
                `checkpoint '${newest.checkpoint}' covers disks ${covered.join(", ") || "none"}, the newest restore point holds ${held.join(", ")}`,
              ];
          }
          const checkpoint = pointName(seq);
          const pending = (k: PointKind, why: string | undefined, job: string): PendingBackup => ({
            format: POINT_FORMAT,
            seq,
            checkpoint,
            domain: d.name,
            job,
            time: new Date().toISOString(),
            kind: k,
            ...(why !== undefined ? { reason: why } : {}),
            parent: k === "incremental" ? (newest?.seq ?? null) : null,
          });
          const cpXml = `<domaincheckpoint><name>${checkpoint}</name><description>${escapeText(`qbackup set ${set.root}`)}</description></domaincheckpoint>`;
          const opts: BeginOptions = {
            quiesce: o.quiesce === true,
            ...(o.bandwidth !== undefined ? { bandwidth: o.bandwidth } : {}),
            defaultTarget: (disk) => set.path(imageFile(seq, disk)),
          };
          const begin = (
            k: PointKind,
            why: string | undefined,
          ): ResultAsync<{ job: BackupJobInfo; kind: PointKind; reason: string | undefined }, SetError> =>
            set
              .writePending(pending(k, why, ""))
              .andThen(() =>
                this.deps.begin(
                  d,
                  k === "incremental"
                    ? `<domainbackup mode='push'><incremental>${newest!.checkpoint}</incremental></domainbackup>`
                    : undefined,
                  cpXml,
                  opts,
                ),
              )
              .map((job) => ({ job, kind: k, reason: why }))
              .orElse((e) => {
                if (k === "incremental" && FALLBACK.has(e.code))
                  return begin("full", `the incremental since '${newest!.checkpoint}' was refused: ${e.message}`);
                return set.removePending().andThen(() => errAsync(e));
              });
          for (const disk of newest?.disks ?? []) {
            const bad = checkName(disk.name, "disk name");
            if (bad.isErr()) return errAsync<SetBackupStarted, SetError>({ code: "unsupported", message: bad.error.message });
          }
          return ensureDir(this.registry)
            .andThen(() => writeFileAtomic(this.registryFile(set.root), set.root))
            .andThen(() => begin(kind, reason))
            .andThen((b) => {
              this.watching.set(set.root, { set, release, domain: d.name, checkpoint });
              const started: SetBackupStarted = { set: set.root, checkpoint, kind: b.kind, reason: b.reason ?? null, job: b.job };
              // a job may already have ended (an offline push of a small disk): settle it now
              return set.writePending(pending(b.kind, b.reason, b.job.id)).map(() => {
                if (!b.job.active) void this.settleWatched(set.root);
                this.log.info(
                  { set: set.root, domain: d.name, checkpoint, kind: b.kind, reason: b.reason, job: b.job.id },
                  "set backup started",
                );
                return started;
              });
            })
            .mapErr((e) => {
              void removeFileDurable(this.registryFile(set.root));
              return e;
            });
        });
    });
  }

  list(dir: string): ResultAsync<SetListing, SetError> {
    return this.locate(dir, undefined).andThen((set) =>
      this.resume(set).andThen(() =>
        // settled here too: a listing right after the job ended shows the point
        (this.watching.has(set.root) ? ResultAsync.fromSafePromise(this.settleWatched(set.root)) : okAsync(undefined)).andThen(() =>
          this.indexAndPoints(set).andThen(({ index, points }) =>
            set.readPending().andThen((p) =>
              (p === undefined
                ? okAsync<BackupJobInfo | undefined, SetError>(undefined)
                : ResultAsync.fromSafePromise(this.deps.activeJob(p.domain))
              ).map(
                (job): SetListing => ({
                  set: set.root,
                  domain: index.domain,
                  points: [...points.values()].map((x) => pointJson(x, points)),
                  pending:
                    p === undefined
                      ? null
                      : {
                          checkpoint: p.checkpoint,
                          kind: p.kind,
                          job: p.job || null,
                          state: job !== undefined && job.checkpoint === p.checkpoint ? job.state : "unknown",
                        },
                  lastSettled: this.lastSettled.get(set.root) ?? null,
                }),
              ),
            ),
          ),
        ),
      ),
    );
  }

  restore(dir: string, disk: string, file: string, at: string | undefined, format: "raw" | "qcow2"): ResultAsync<RestoreResult, SetError> {
    return this.locate(dir, undefined).andThen((set) =>
      this.open(set, "restore", `a restore of '${disk}' into ${file}`).andThen((release) =>
        releasing(
          release,
          this.indexAndPoints(set).andThen(({ index, points }) =>
            this.pickPoint(index, points, at).andThen((p) =>
              restorePoint(set, p, { disk, file, format }, this.deps.allowedDirs, trustFor(), this.img),
            ),
          ),
        ),
      ),
    );
  }

  verify(dir: string): ResultAsync<VerifyReport & { set: string }, SetError> {
    return this.locate(dir, undefined).andThen((set) =>
      this.open(set, "verify", "a verify").andThen((release) =>
        releasing(
          release,
          this.indexAndPoints(set)
            .andThen(({ points }) => verifySet(set, points, this.img))
            .map((r) => ({ set: set.root, ...r })),
        ),
      ),
    );
  }

  prune(dir: string, keep: number): ResultAsync<PruneResult, SetError> {
    return this.locate(dir, undefined).andThen((set) =>
      this.open(set, "prune", `a prune to ${keep} restore points`).andThen((release) =>
        releasing(
          release,
          this.settle(set)
            .andThen((s) =>
              s === "running" || s === "unknown"
                ? errAsync<{ index: SetIndex; points: Map<number, Point> }, SetError>({
                    code: "busy",
                    message: `backup set ${set.root} is busy: a backup of it is not settled yet`,
                  })
                : this.indexAndPoints(set),
            )
            .andThen(({ index, points }) =>
              planPrune(index, points, keep).asyncAndThen((plan) =>
                runPrune(set, index, plan, this.img, this.trustOf(index)).andThen((after) =>
                  this.dropCheckpoints(set, after, points, plan),
                ),
              ),
            ),
        ),
      ),
    );
  }

  /** Every checkpoint of the set but the newest point's: the set never starts an incremental from another. */
  private dropCheckpoints(
    set: SetDir,
    index: SetIndex,
    before: ReadonlyMap<number, Point>,
    plan: PruneJournal,
  ): ResultAsync<PruneResult, SetError> {
    const newest = index.points[index.points.length - 1]?.checkpoint;
    const names = [...index.abandoned, ...[...before.values()].map((p) => p.checkpoint)].filter(
      (n, i, a) => n !== newest && a.indexOf(n) === i,
    );
    const d = this.deps.domain(index.domain);
    return ResultAsync.fromSafePromise(
      (async () => {
        const deleted: string[] = [];
        const left: { checkpoint: string; reason: string }[] = [];
        for (const n of names) {
          if (d === undefined) {
            left.push({ checkpoint: n, reason: `domain '${index.domain}' is not registered` });
            continue;
          }
          if (d.checkpoints.store.get(n) === undefined) continue;
          const r = await this.deps.deleteCheckpoint(d, n);
          if (r.isOk()) deleted.push(n);
          else left.push({ checkpoint: n, reason: r.error.message });
        }
        return { deleted, left };
      })(),
    ).andThen(({ deleted, left }) =>
      set.readIndex().andThen((now) =>
        set
          .writeIndex({
            ...(now ?? index),
            abandoned: left.map((x) => x.checkpoint).filter((n) => !(now ?? index).points.some((p) => p.checkpoint === n)),
          })
          .map(
            (): PruneResult => ({
              set: set.root,
              kept: index.points.map((p) => p.checkpoint),
              removed: plan.drop.map((s) => before.get(s)?.checkpoint ?? seqName(s)),
              merged: plan.merges.length > 0 ? [before.get(plan.merges[0]!.point)?.checkpoint ?? ""] : [],
              checkpointsDeleted: deleted,
              checkpointsLeft: left,
            }),
          ),
      ),
    );
  }

  exportStart(dir: string, disk: string, at: string | undefined, socket: string): ResultAsync<SetExportInfo, SetError> {
    return this.locate(dir, undefined).andThen((set) =>
      this.open(set, "export", `an export of '${disk}' on ${socket}`).andThen((release) =>
        this.indexAndPoints(set)
          .andThen(({ index, points }) => this.pickPoint(index, points, at))
          .mapErr((e) => {
            release();
            return e;
          })
          .andThen((p) => this.exports.start(set, p, disk, socket, release)),
      ),
    );
  }

  exportList(): SetExportInfo[] {
    return this.exports.list();
  }

  exportEnd(id: string): ResultAsync<SetExportInfo, SetError> {
    return this.exports.end(id);
  }
}
