/**
 * The last steps of a job's finish, after undo.ts has QEMU's confirmation:
 * a ready push made durable (targets and their directory entries written
 * out before anyone is told), files removed (scratch always, targets of a
 * backup that did not succeed), and a checkpoint created with a backup that
 * did not succeed rolled back (its bitmaps went with the undo; its metadata
 * goes here).
 *
 * What this module must never do: unlink a file whose node QEMU may still
 * have (a node still added, or one undo gave up on), or talk to QEMU.
 */
import type { Logger } from "../log.js";
import { crashPoint } from "../util/crash-point.js";
import { imageRemove } from "./images.js";
import type { DiskRuntime, JobContext, JobOutcome } from "./model.js";

/** Ready means on disk. Undefined when written out; otherwise why not. */
export async function finishWriteOut(
  ctx: JobContext,
  disks: readonly DiskRuntime[],
  writebackErrors: readonly (string | undefined)[],
): Promise<string | undefined> {
  const i = writebackErrors.findIndex((e) => e !== undefined);
  if (i >= 0) return `disk '${disks[i]!.plan.disk}': writing ${disks[i]!.plan.file} out failed: ${writebackErrors[i]}`;
  crashPoint("ready:sync");
  return ctx.writeback.syncFiles(disks.map((d) => d.plan.file));
}

/** Scratch files always go; targets only when the backup did not succeed; never a file QEMU still holds. */
export async function finishRemoveFiles(
  ctx: JobContext,
  disks: readonly DiskRuntime[],
  outcome: JobOutcome,
  stuck: readonly string[],
  log: Logger,
): Promise<void> {
  if (ctx.def.mode === "push" && outcome === "ready") return;
  for (const d of disks) {
    if (!d.fileCreated) continue;
    if (d.nodeAdded || stuck.some((s) => s.includes(d.plan.targetNode))) {
      log.error({ file: d.plan.file }, "QEMU still holds this file open; it is kept");
      continue;
    }
    await imageRemove(d.plan.file);
    d.fileCreated = false;
  }
}

/**
 * A checkpoint created with a backup that did not succeed must not claim a backup exists. True when its metadata went.
 * Only one this job committed: a checkpoint of the same name created by someone else while the backup was being
 * prepared (so that the backup's own bitmaps could not be added) is theirs.
 */
export async function finishRollBackCheckpoint(ctx: JobContext, outcome: JobOutcome, committed: boolean, log: Logger): Promise<boolean> {
  const cp = ctx.checkpoint;
  if (cp === undefined || outcome === "ready" || !committed) return false;
  if (ctx.checkpoints.store.get(cp.def.name) === undefined) return true;
  const r = await ctx.checkpoints.delete(undefined, cp.def.name, { metadataOnly: true });
  if (r.isErr()) {
    log.error({ checkpoint: cp.def.name, error: r.error.message }, "cannot remove the checkpoint's metadata");
    return false;
  }
  return true;
}
