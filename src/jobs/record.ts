/**
 * The persisted form of a backup job: everything needed to adopt it after a
 * daemon restart (plan, files, node and export names, checkpoint) and what
 * had happened in QEMU when it was written. One JSON file per domain with an
 * active job, written atomically before each step acts on QEMU and after
 * each state change; removed once the job is torn down.
 */
import { readdir, readFile, rename, unlink } from "node:fs/promises";
import { join } from "node:path";
import { errAsync, okAsync, ResultAsync } from "neverthrow";
import type { PreparedCheckpoint } from "../checkpoints/manager.js";
import type { BackupDef } from "../conf/backup.js";
import { fileStem } from "../conf/names.js";
import { ensureDir, fsyncDir, type IoError, ioError, removeFileDurable, TEMP_PREFIX, writeFileAtomic } from "../util/atomic-file.js";
import type { BackupJobInfo, BeginStep, DiskJobState, JobFlags, JobOutcome, JobState, NbdServerPlan } from "./model.js";
import type { DiskPlan, PlanOptions } from "./plan.js";

export interface DiskRecord {
  readonly state: DiskJobState;
  readonly fileCreated: boolean;
  readonly nodeAdded: boolean;
  readonly jobStarted: boolean;
  readonly jobDismissed: boolean;
  readonly exportAdded: boolean;
  readonly bytesDone: number;
  readonly bytesTotal: number;
  readonly error: string | undefined;
}

export interface JobRecord {
  readonly version: 1;
  readonly id: string;
  readonly domain: string;
  readonly startedAt: number;
  readonly state: JobState;
  readonly error: string | undefined;
  readonly def: BackupDef;
  readonly plans: readonly DiskPlan[];
  readonly planOpts: PlanOptions;
  readonly checkpoint: PreparedCheckpoint | undefined;
  readonly nbd: NbdServerPlan | undefined;
  readonly flags: JobFlags;
  readonly disks: readonly DiskRecord[];
  /** Begin: the step about to act (absent in older records, and once begin is over). */
  readonly step?: BeginStep | undefined;
  /** Undo under way toward this outcome (absent until then): a restart finishes it, never re-decides it. */
  readonly outcome?: JobOutcome | undefined;
}

/** A record that exists but cannot be used: kept for a person, never deleted. */
export interface UnreadableRecord {
  readonly code: "unreadable";
  readonly path: string;
  readonly message: string;
}
export type RecordError = IoError | UnreadableRecord;

function escapeRegExp(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

const isObject = (x: unknown): x is Record<string, unknown> => typeof x === "object" && x !== null && !Array.isArray(x);

/** What would make adopting this record go wrong; undefined when it has the shape we write. */
export function recordShapeProblem(r: unknown): string | undefined {
  if (!isObject(r)) return "not an object";
  if (r.version !== 1) return `unknown record version ${JSON.stringify(r.version)}`;
  if (typeof r.id !== "string" || typeof r.domain !== "string") return "no job id or domain";
  if (!isObject(r.def) || !Array.isArray(r.plans) || !Array.isArray(r.disks) || !isObject(r.flags) || !isObject(r.planOpts))
    return "missing its definition, plans, disks or flags";
  if (r.plans.length !== r.disks.length) return "plans and disks differ in number";
  for (const p of r.plans) {
    if (
      !isObject(p) ||
      typeof p.jobId !== "string" ||
      typeof p.targetNode !== "string" ||
      typeof p.file !== "string" ||
      typeof p.node !== "string"
    )
      return "a disk plan lacks its job, node or file";
  }
  if (!["begin", "inprogress", "ready", "failed", "cancelled"].includes(r.state as string))
    return `unknown state ${JSON.stringify(r.state)}`;
  return undefined;
}

export class JobStore {
  constructor(readonly dir: string) {}

  private active(domain: string): string {
    return join(this.dir, `${fileStem(domain)}.json`);
  }

  private completedFile(domain: string): string {
    return join(this.dir, `${fileStem(domain)}.completed.json`);
  }

  save(r: JobRecord): ResultAsync<void, IoError> {
    return ensureDir(this.dir).andThen(() => writeFileAtomic(this.active(r.domain), JSON.stringify(r)));
  }

  remove(domain: string): ResultAsync<void, IoError> {
    return removeFileDurable(this.active(domain));
  }

  /**
   * The domain's record: undefined when there is none; an `unreadable` error
   * when there is one we cannot use (not JSON, another version, a shape we do
   * not know). Such a record is never deleted: see setAside.
   */
  load(domain: string): ResultAsync<JobRecord | undefined, RecordError> {
    const path = this.active(domain);
    return ResultAsync.fromPromise(
      readFile(path, "utf8").then(
        (t) => t as string | undefined,
        (e: NodeJS.ErrnoException) => {
          if (e.code === "ENOENT") return undefined;
          throw e;
        },
      ),
      (e): RecordError => ioError(`cannot read the job record of '${domain}'`, e),
    ).andThen((text) => {
      if (text === undefined) return okAsync(undefined);
      let r: unknown;
      try {
        r = JSON.parse(text);
      } catch (e) {
        return errAsync<JobRecord | undefined, RecordError>({
          code: "unreadable",
          path,
          message: `${path} is not JSON: ${(e as Error).message}`,
        });
      }
      const why = recordShapeProblem(r);
      if (why !== undefined) return errAsync<JobRecord | undefined, RecordError>({ code: "unreadable", path, message: `${path}: ${why}` });
      return okAsync(r as JobRecord);
    });
  }

  private asideDir(): string {
    return join(this.dir, "unreadable");
  }

  /** Keep an unreadable record for a person: moved (never deleted) to unreadable/<domain>.<time>.json. */
  setAside(domain: string): ResultAsync<string, IoError> {
    const to = join(this.asideDir(), `${fileStem(domain)}.${Date.now()}.json`);
    return ensureDir(this.asideDir()).andThen(() =>
      ResultAsync.fromPromise(
        rename(this.active(domain), to).then(() => fsyncDir(this.dir)),
        (e) => ioError(`cannot set ${this.active(domain)} aside`, e),
      ).map(() => to),
    );
  }

  /** Records of this domain set aside and not yet removed by a person. */
  async setAsideOf(domain: string): Promise<string[]> {
    const names = await readdir(this.asideDir()).catch(() => [] as string[]);
    const re = new RegExp(`^${escapeRegExp(fileStem(domain))}\\.\\d+\\.json$`);
    return names.filter((n) => re.test(n)).map((n) => join(this.asideDir(), n));
  }

  /**
   * Temp files of this domain's records that a kill left behind (atomic
   * writes that never reached their rename). Only call while no write of the
   * domain's records is in flight (no job instance of the domain exists).
   */
  async removeStaleTemps(domain: string): Promise<string[]> {
    const names = await readdir(this.dir).catch(() => [] as string[]);
    const re = new RegExp(`^${escapeRegExp(TEMP_PREFIX)}${escapeRegExp(fileStem(domain))}(\\.completed)?\\.json\\.[0-9a-f]+$`);
    const stale = names.filter((n) => re.test(n));
    for (const n of stale) await unlink(join(this.dir, n)).catch(() => {});
    return stale;
  }

  saveCompleted(info: BackupJobInfo): ResultAsync<void, IoError> {
    return ensureDir(this.dir).andThen(() => writeFileAtomic(this.completedFile(info.domain), JSON.stringify(info)));
  }

  loadCompleted(domain: string): Promise<BackupJobInfo | undefined> {
    return readFile(this.completedFile(domain), "utf8").then(
      (t) => JSON.parse(t) as BackupJobInfo,
      () => undefined,
    );
  }
}
