/**
 * The persisted form of a backup job: everything needed to adopt it after a
 * daemon restart (plan, files, node and export names, checkpoint) and what
 * had happened in QEMU when it was written. One JSON file per domain with an
 * active job, written atomically before each step acts on QEMU and after
 * each state change; removed once the job is torn down.
 */
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { okAsync, ResultAsync } from "neverthrow";
import type { PreparedCheckpoint } from "../checkpoints/manager.js";
import type { BackupDef } from "../conf/backup.js";
import { ensureDir, type IoError, ioError, removeFileDurable, writeFileAtomic } from "../util/atomic-file.js";
import type { DiskJobState, JobFlags, JobInfo, JobState, NbdServerPlan } from "./job.js";
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
}

export class JobStore {
  constructor(readonly dir: string) {}

  private active(domain: string): string {
    return join(this.dir, `${domain}.json`);
  }

  private completedFile(domain: string): string {
    return join(this.dir, `${domain}.completed.json`);
  }

  save(r: JobRecord): ResultAsync<void, IoError> {
    return ensureDir(this.dir).andThen(() => writeFileAtomic(this.active(r.domain), JSON.stringify(r)));
  }

  remove(domain: string): ResultAsync<void, IoError> {
    return removeFileDurable(this.active(domain));
  }

  load(domain: string): ResultAsync<JobRecord | undefined, IoError> {
    return ResultAsync.fromPromise(
      readFile(this.active(domain), "utf8").then(
        (t) => JSON.parse(t) as JobRecord,
        (e: NodeJS.ErrnoException) => {
          if (e.code === "ENOENT") return undefined;
          throw e;
        },
      ),
      (e) => ioError(`cannot read the job record of '${domain}'`, e),
    ).andThen((r) => okAsync(r?.version === 1 ? r : undefined));
  }

  saveCompleted(info: JobInfo): ResultAsync<void, IoError> {
    return ensureDir(this.dir).andThen(() => writeFileAtomic(this.completedFile(info.domain), JSON.stringify(info)));
  }

  loadCompleted(domain: string): Promise<JobInfo | undefined> {
    return readFile(this.completedFile(domain), "utf8").then(
      (t) => JSON.parse(t) as JobInfo,
      () => undefined,
    );
  }
}
