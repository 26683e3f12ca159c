/**
 * Target and scratch images: the file is created 0600 and exclusively by us
 * (O_EXCL, so we never take over a file that appeared meanwhile), then
 * formatted by QEMU itself with blockdev-create (a QMP job): no qemu-img
 * process per disk, and half the time of spawning one here (5 vs 10 ms,
 * more on a loaded host). Removed on failure (only once QEMU shows no job
 * that may still write it: else it is left, and the error says so) and at
 * teardown.
 *
 * Creation and removal go through safe-fs.ts: the parent directory is walked
 * again from `/` without following symlinks and must still be trusted, the
 * file is created through that directory's descriptor, and removal deletes
 * only the inode we created. A name swapped meanwhile is never followed out
 * of the allowed directories; this module must never create or unlink by a
 * plain path.
 */
import { err, ok, type Result, ResultAsync } from "neverthrow";
import type { QmpClient } from "../qmp/client.js";
import { type QmpError, qmpErrorMessage } from "../qmp/errors.js";
import type { EventListener } from "../qmp/events.js";
import type { BlockdevCreateOptions } from "../qmp/qapi.js";
import type { BackupError } from "./errors.js";
import { type Created, createExclusive, removeSafely, type Trust, trustFor } from "./safe-fs.js";

export interface ImageSpec {
  readonly path: string;
  readonly format: "qcow2" | "raw";
  readonly size: number;
  readonly clusterSize?: number | undefined;
  /** Id of the blockdev-create job (ours: named with the qbk- prefix, so leftovers are found). */
  readonly jobId: string;
  /** QEMU runs as this user: the file is given to it (still 0600). */
  readonly owner?: { readonly uid: number; readonly gid: number } | undefined;
}

/** How long imageCreate waits for QEMU; tests shorten them. */
export interface ImageTimeouts {
  /** For the blockdev-create job to conclude (QEMU to format the file). */
  readonly formatMs: number;
  /**
   * Between reads of query-jobs while waiting: the concluded event only wakes
   * the wait early, so one that never reaches us costs this, not formatMs.
   */
  readonly pollMs: number;
  /** For a job we cancelled to conclude; past it the file is left to QEMU. */
  readonly cancelMs: number;
}

export const IMAGE_TIMEOUTS: ImageTimeouts = { formatMs: 60_000, pollMs: 1_000, cancelMs: 10_000 };

/** The create job as QEMU shows it: "running" is any state but concluded (it may still write the file). */
type JobState =
  | { readonly kind: "running" }
  | { readonly kind: "concluded"; readonly error: string | undefined }
  | { readonly kind: "absent" };

type Concluded = EventListener<"JOB_STATUS_CHANGE">;

export function imageCreateOptions(spec: ImageSpec): BlockdevCreateOptions {
  const file = { driver: "file" as const, filename: spec.path };
  if (spec.format === "raw") return { ...file, size: spec.size };
  return { driver: "qcow2", file, size: spec.size, ...(spec.clusterSize !== undefined ? { "cluster-size": spec.clusterSize } : {}) };
}

export function imageCreate(client: QmpClient, spec: ImageSpec, timeouts: ImageTimeouts = IMAGE_TIMEOUTS): ResultAsync<void, BackupError> {
  const failed = (why: string): BackupError => ({
    code: "image",
    // QEMU opens the file itself, with its own user's rights
    message: `cannot create ${spec.path}: ${why}${/Permission denied/.test(why) ? " (QEMU must reach and open it: see qemuUser in the README)" : ""}`,
  });
  const createFile = async (): Promise<void> => {
    const trust = trustFor(spec.owner);
    created.set(spec.path, { id: await createExclusive(spec.path, trust, spec.owner), trust });
  };
  return ResultAsync.fromPromise(createFile(), (e) => failed((e as Error).message)).andThen(() => {
    // before the command: the event can come before its reply
    const concluded = client.listen(["JOB_STATUS_CHANGE"], (e) => e.data.id === spec.jobId && e.data.status === "concluded");
    const run = async (): Promise<Result<void, BackupError>> => {
      const why = await formatFile(client, spec, concluded, timeouts);
      if (why === undefined) return ok(undefined);
      const settled = await settleJob(client, spec.jobId, concluded, timeouts);
      // removed only once QEMU shows no job that may still write it
      if (settled.isErr()) return err(failed(`${why}; the file was left, as QEMU may still write it: ${settled.error}`));
      await imageRemove(spec.path);
      return err(failed(why));
    };
    return new ResultAsync(run().finally(() => concluded.close()));
  });
}

/**
 * Have QEMU format the file: undefined when it did (the job concluded without
 * error and is dismissed), else why not. A refused blockdev-create, one that
 * got no answer and a wait that gave up all leave a job of that id possibly
 * there (QEMU may run a command we stopped waiting for); settleJob ends it.
 */
async function formatFile(client: QmpClient, spec: ImageSpec, concluded: Concluded, t: ImageTimeouts): Promise<string | undefined> {
  const started = await client.execute("blockdev-create", { "job-id": spec.jobId, options: imageCreateOptions(spec) });
  if (started.isErr()) return qmpErrorMessage(started.error);
  const state = await awaitJob(client, spec.jobId, concluded, t.formatMs, t.pollMs);
  if (state.isErr()) return `QEMU did not answer while formatting it: ${qmpErrorMessage(state.error)}`;
  switch (state.value.kind) {
    case "running":
      return `QEMU did not finish formatting it within ${t.formatMs} ms`;
    case "absent":
      return `its blockdev-create job ${spec.jobId} was gone before its outcome was read (dismissed by someone else)`;
    case "concluded": {
      const dismissed = await client.execute("job-dismiss", { id: spec.jobId });
      if (dismissed.isErr()) return qmpErrorMessage(dismissed.error);
      return state.value.error;
    }
  }
}

/** Job `id` as query-jobs shows it. */
function jobState(client: QmpClient, id: string): ResultAsync<JobState, QmpError> {
  return client.execute("query-jobs").map((jobs): JobState => {
    const j = jobs.find((x) => x.id === id);
    if (j === undefined) return { kind: "absent" };
    return j.status === "concluded" ? { kind: "concluded", error: j.error } : { kind: "running" };
  });
}

/**
 * Until job `id` concludes or is gone, or `ms` pass ("running" then). The
 * outcome is always read from QEMU: the concluded event only cuts a poll
 * short, so a job that concluded before we looked, or whose event we never
 * got, still counts as concluded. A closed connection closes the listener
 * too, so the next read fails at once instead of the wait spinning.
 */
function awaitJob(client: QmpClient, id: string, concluded: Concluded, ms: number, pollMs: number): ResultAsync<JobState, QmpError> {
  const deadline = Date.now() + ms;
  const loop = async (): Promise<Result<JobState, QmpError>> => {
    for (;;) {
      await concluded.next(Math.max(0, Math.min(pollMs, deadline - Date.now())));
      const state = await jobState(client, id);
      if (state.isErr() || state.value.kind !== "running" || Date.now() >= deadline) return state;
    }
  };
  return new ResultAsync(loop());
}

/**
 * After giving up on a create: end job `id` if it exists (job-cancel, then
 * wait for it to conclude) and dismiss it. Ok once QEMU shows no job of that
 * id that may still write the file; else why that could not be confirmed.
 */
async function settleJob(client: QmpClient, id: string, concluded: Concluded, t: ImageTimeouts): Promise<Result<void, string>> {
  let state = await jobState(client, id);
  if (state.isErr()) return err(`cannot read its job ${id} from QEMU: ${qmpErrorMessage(state.error)}`);
  if (state.value.kind === "running") {
    const cancel = await client.execute("job-cancel", { id });
    // a refusal is fine (it concluded meanwhile: read again below); no answer leaves it unknown
    if (cancel.isErr() && cancel.error.code !== "command") return err(`cannot cancel its job ${id}: ${qmpErrorMessage(cancel.error)}`);
    state = await awaitJob(client, id, concluded, t.cancelMs, t.pollMs);
    if (state.isErr()) return err(`cannot read its job ${id} from QEMU: ${qmpErrorMessage(state.error)}`);
    if (state.value.kind === "running") return err(`job ${id} still ran ${t.cancelMs} ms after job-cancel`);
  }
  // a concluded job writes nothing more: a dismiss without an answer leaves only the job (recovery dismisses ours)
  if (state.value.kind === "concluded") await client.execute("job-dismiss", { id });
  return ok(undefined);
}

/** What imageCreate made, by path: only that inode is ever removed, through a trusted directory walk. */
const created = new Map<string, { readonly id: Created; readonly trust: Trust }>();

/**
 * Remove a file we created; a missing file is fine. Anything else now at the
 * name (or a name we did not create in this process that is not a regular
 * file) is left, as is a file whose directory is no longer trusted.
 */
export async function imageRemove(path: string): Promise<void> {
  const c = created.get(path);
  if (await removeSafely(path, c?.trust ?? trustFor(), c?.id)) created.delete(path);
}
