/**
 * Target and scratch images: the file is created 0600 and exclusively by us
 * (O_EXCL, so we never take over a file that appeared meanwhile), then
 * formatted by QEMU itself with blockdev-create (a QMP job): no qemu-img
 * process per disk, and half the time of spawning one here (5 vs 10 ms,
 * more on a loaded host). Removed on failure and teardown.
 *
 * Creation and removal go through safe-fs.ts: the parent directory is walked
 * again from `/` without following symlinks and must still be trusted, the
 * file is created through that directory's descriptor, and removal deletes
 * only the inode we created. A name swapped meanwhile is never followed out
 * of the allowed directories; this module must never create or unlink by a
 * plain path.
 */
import { errAsync, okAsync, ResultAsync } from "neverthrow";
import type { QmpClient } from "../qmp/client.js";
import { qmpErrorMessage } from "../qmp/errors.js";
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

const CREATE_TIMEOUT_MS = 60_000;

export function imageCreateOptions(spec: ImageSpec): BlockdevCreateOptions {
  const file = { driver: "file" as const, filename: spec.path };
  if (spec.format === "raw") return { ...file, size: spec.size };
  return { driver: "qcow2", file, size: spec.size, ...(spec.clusterSize !== undefined ? { "cluster-size": spec.clusterSize } : {}) };
}

export function imageCreate(client: QmpClient, spec: ImageSpec): ResultAsync<void, BackupError> {
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
    const done = client.listen(["JOB_STATUS_CHANGE"], (e) => e.data.id === spec.jobId && e.data.status === "concluded");
    const job = client
      .execute("blockdev-create", { "job-id": spec.jobId, options: imageCreateOptions(spec) })
      .mapErr((e) => failed(qmpErrorMessage(e)))
      .andThen(() =>
        ResultAsync.fromSafePromise(done.next(CREATE_TIMEOUT_MS)).andThen((e) =>
          e === undefined ? errAsync(failed("QEMU did not finish formatting it")) : okAsync(undefined),
        ),
      )
      .andThen(() => client.execute("query-jobs").mapErr((e) => failed(qmpErrorMessage(e))))
      .andThen((jobs) => {
        const error = jobs.find((j) => j.id === spec.jobId)?.error;
        return client
          .execute("job-dismiss", { id: spec.jobId })
          .mapErr((e) => failed(qmpErrorMessage(e)))
          .andThen(() => (error === undefined ? okAsync(undefined) : errAsync(failed(error))));
      });
    return new ResultAsync(
      (async () => {
        const r = await job;
        done.close();
        if (r.isErr()) await imageRemove(spec.path);
        return r;
      })(),
    );
  });
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
