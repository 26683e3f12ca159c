/**
 * The steps of a backup's begin, in libvirt's order (qemuBackupBegin):
 * create the files, add the target/scratch nodes, start every disk's job in
 * one transaction (with the checkpoint's bitmaps), commit the checkpoint's
 * metadata, and (pull) serve the exports. Each step sets the flags of what
 * it made exist, so undo (undo.ts) knows what there is to remove; a step
 * that fails part-way still settles every disk first.
 *
 * What this module must never do: decide the job's state, write the job
 * record, or undo anything (job.ts sequences the steps, undo.ts undoes).
 */
import { errAsync, okAsync, ResultAsync } from "neverthrow";
import { type QmpError, qmpErrorMessage } from "../qmp/errors.js";
import type { BackupError } from "./errors.js";
import { imageCreate } from "./images.js";
import type { DiskRuntime, JobContext, JobFlags } from "./model.js";
import { backupTransaction, exportArgs, targetBlockdev } from "./plan.js";

export const stepFailed = (message: string): BackupError => ({ code: "job-failed", message });

/**
 * A command that got no answer (a stalled QEMU past the QMP timeout, a dropped connection) may still run in QEMU:
 * its flags are set as if it had, so undo looks for what it would have made (undo removes only what QEMU then
 * shows, and "not found" counts as gone). Only a refusal (`command`) says it did not run.
 */
const noAnswer = (e: QmpError): boolean => e.code !== "command";

/** All disks at once; settles only when every one has (so undo sees every flag it must). */
function allSettled(rs: ResultAsync<void, BackupError>[]): ResultAsync<void, BackupError> {
  return ResultAsync.combineWithAllErrors(rs)
    .map(() => undefined)
    .mapErr((errors) => errors[0]!);
}

export function backupDiskCreateFiles(ctx: JobContext, disks: readonly DiskRuntime[]): ResultAsync<void, BackupError> {
  return allSettled(
    disks
      .filter((d) => d.plan.createFile)
      .map((d) =>
        imageCreate(ctx.client, {
          path: d.plan.file,
          format: d.plan.format,
          size: d.plan.virtualSize,
          clusterSize: d.plan.clusterSize,
          jobId: d.plan.createJobId,
          owner: ctx.planOpts.imageOwner,
        }).map(() => {
          d.fileCreated = true;
        }),
      ),
  );
}

/** Pipelined: QEMU answers in order, and a failure of one still lets the others settle first. */
export function backupDiskAddNodes(ctx: JobContext, disks: readonly DiskRuntime[]): ResultAsync<void, BackupError> {
  return allSettled(
    disks.map((d) =>
      ctx.client
        .execute("blockdev-add", targetBlockdev(d.plan, ctx.def.mode))
        .map(() => {
          d.nodeAdded = true;
        })
        .mapErr((e) => stepFailed(`cannot open ${d.plan.file} for disk '${d.plan.disk}': ${qmpErrorMessage(e)}`)),
    ),
  );
}

export function backupStartJobs(ctx: JobContext, disks: readonly DiskRuntime[], f: JobFlags): ResultAsync<void, BackupError> {
  const actions = backupTransaction(ctx.plans, ctx.checkpoint?.actions ?? [], ctx.planOpts);
  return ctx.client
    .execute("transaction", { actions })
    .map(() => {
      f.txDone = true;
      f.tempBitmapsAdded = true;
      for (const d of disks) d.jobStarted = true;
    })
    .mapErr((e) => {
      if (noAnswer(e)) {
        f.txDone = true;
        f.tempBitmapsAdded = true;
        for (const d of disks) d.jobStarted = true;
      }
      return stepFailed(`cannot start the backup: ${qmpErrorMessage(e)}`);
    });
}

/** Metadata after the bitmaps exist; without metadata the bitmaps are removed by undo (they are in the flags' scope). */
export function backupCommitCheckpoint(ctx: JobContext, f: JobFlags): ResultAsync<void, BackupError> {
  const cp = ctx.checkpoint;
  if (cp === undefined) return okAsync(undefined);
  return ctx.checkpoints
    .commit(cp.def)
    .map(() => {
      f.checkpointCommitted = true;
    })
    .orElse((e) => errAsync(e));
}

export function backupStartExports(ctx: JobContext, disks: readonly DiskRuntime[], f: JobFlags): ResultAsync<void, BackupError> {
  const nbd = ctx.nbd!;
  const c = ctx.client;
  const tls: ResultAsync<void, BackupError> =
    nbd.tlsCreds === undefined
      ? okAsync(undefined)
      : c
          .execute("object-add", {
            "qom-type": "tls-creds-x509",
            id: nbd.tlsCreds.id,
            dir: nbd.tlsCreds.dir,
            endpoint: "server",
            "verify-peer": false,
          })
          .map(() => {
            f.tlsAdded = true;
          })
          .mapErr((e) => {
            if (noAnswer(e)) f.tlsAdded = true;
            return stepFailed(`cannot load TLS credentials: ${qmpErrorMessage(e)}`);
          });
  let chain = tls.andThen(() =>
    c
      .execute("nbd-server-start", { addr: nbd.addr, ...(nbd.tlsCreds ? { "tls-creds": nbd.tlsCreds.id } : {}) })
      .map(() => {
        f.nbdStarted = true;
      })
      .mapErr((e) => {
        if (noAnswer(e)) f.nbdStarted = true;
        return stepFailed(`cannot start the NBD server at ${nbd.uri}: ${qmpErrorMessage(e)}`);
      }),
  );
  for (const d of disks) {
    chain = chain.andThen(() =>
      c
        .execute("block-export-add", exportArgs(d.plan))
        .map(() => {
          d.exportAdded = true;
        })
        .mapErr((e) => stepFailed(`cannot export disk '${d.plan.disk}': ${qmpErrorMessage(e)}`)),
    );
  }
  return chain;
}
