/**
 * `prune --keep N`: keep the newest N restore points, each restorable as it
 * was. When the oldest kept point is an incremental, the images below it (its
 * chain's full and the incrementals between) are merged up into it:
 * `qemu-img commit -d -b FULL TOP` writes the point's view into the full's
 * file (the top image is left as it is), then the full's file is renamed
 * over the top's, so the images after it, whose backing links name the top's
 * file, now read the merged full. The merge writes only what the
 * incrementals hold, not the whole full again.
 *
 * Crash safety, through a journal (prune.json) written first:
 *   1. the journal: what is kept, dropped, merged;
 *   2. the index without the dropped points (from here on they are not
 *      offered: no answer lists a point that may be half merged);
 *   3. each merge: while the full's file exists, commit (again: a repeated
 *      commit writes the same data) and rename; once renamed, done;
 *   4. the kept point's manifest (now a full, digest of the merged file),
 *      the dropped points' images and manifests removed, the journal removed.
 * Each step can run again after a crash; `resumePrune` does.
 */
import { readdir, rename } from "node:fs/promises";
import { err, errAsync, ok, okAsync, type Result, ResultAsync } from "neverthrow";
import { removeSafely, type Trust } from "../jobs/safe-fs.js";
import { fsyncDir, ioError } from "../util/atomic-file.js";
import { digestFile } from "./digest.js";
import type { SetError } from "./errors.js";
import { chainOf, DATA_DIR, type Point, type PointDisk, type PruneJournal, SET_FORMAT, type SetIndex, seqName } from "./manifest.js";
import type { QemuImg } from "./qemu-img.js";
import type { SetDir } from "./store.js";

export function planPrune(index: SetIndex, points: ReadonlyMap<number, Point>, keep: number): Result<PruneJournal, SetError> {
  if (!Number.isSafeInteger(keep) || keep < 1)
    return err({ code: "bad-request", message: "--keep takes a number of restore points, at least 1" });
  const seqs = index.points.map((p) => p.seq);
  const kept = seqs.slice(-keep);
  const drop = seqs.slice(0, Math.max(0, seqs.length - keep));
  const merges: PruneJournal["merges"][number][] = [];
  const oldest = kept[0] === undefined ? undefined : points.get(kept[0]);
  if (drop.length > 0 && oldest !== undefined && oldest.kind === "incremental") {
    for (const d of oldest.disks) {
      const chain = chainOf(points, oldest.seq, d.name);
      if (chain.isErr()) return err(chain.error);
      const base = chain.value[chain.value.length - 1]!;
      merges.push({ point: oldest.seq, disk: d.name, base: base.file, top: d.file });
    }
  }
  return ok({ format: SET_FORMAT, keep: kept, drop, merges });
}

async function exists(path: string): Promise<boolean> {
  const { lstat } = await import("node:fs/promises");
  return lstat(path).then(
    () => true,
    () => false,
  );
}

/** Steps 3 and 4 (after the journal and the index were written): idempotent. */
export function resumePrune(set: SetDir, journal: PruneJournal, img: QemuImg, trust: Trust): ResultAsync<void, SetError> {
  const merge = (m: PruneJournal["merges"][number]): ResultAsync<void, SetError> =>
    ResultAsync.fromSafePromise(exists(set.path(m.base))).andThen((baseThere) => {
      if (!baseThere) return okAsync(undefined);
      return img.commit(set.path(m.base), set.path(m.top)).andThen(() =>
        ResultAsync.fromPromise(
          (async () => {
            await rename(set.path(m.base), set.path(m.top));
            await fsyncDir(set.path(DATA_DIR));
          })(),
          (e) => ioError(`cannot rename ${m.base} over ${m.top}`, e) as SetError,
        ),
      );
    });
  const rewriteKept = (): ResultAsync<void, SetError> => {
    const seq = journal.merges[0]?.point;
    if (seq === undefined) return okAsync(undefined);
    return set
      .readPoint(seq)
      .andThen((p) =>
        ResultAsync.combine(
          p.disks.map((d) =>
            journal.merges.some((m) => m.disk === d.name)
              ? digestFile(set.path(d.file)).map((g): PointDisk => ({ ...d, backing: null, sha256: g.sha256, dataSize: g.dataSize }))
              : okAsync<PointDisk, SetError>(d),
          ),
        ).andThen((disks) => set.writePoint({ ...p, kind: "full", parent: null, merged: true, disks, reason: undefined })),
      );
  };
  const removeDropped = (): ResultAsync<void, SetError> =>
    ResultAsync.fromPromise(readdir(set.path(DATA_DIR)), (e) => ioError(`cannot list ${set.path(DATA_DIR)}`, e) as SetError).andThen(
      (names) => {
        const prefixes = journal.drop.map((s) => `${seqName(s)}.`);
        const doomed = names.filter((n) => prefixes.some((p) => n.startsWith(p)));
        return ResultAsync.fromSafePromise(Promise.all(doomed.map((n) => removeSafely(set.path(`${DATA_DIR}/${n}`), trust)))).andThen(
          (done) => {
            const left = doomed.filter((_, i) => !done[i]);
            if (left.length > 0)
              return errAsync<void, SetError>({ code: "io", message: `cannot remove ${left.join(", ")} from the set`, errno: undefined });
            return ResultAsync.combine(journal.drop.map((s) => set.removePoint(s))).map(() => undefined);
          },
        );
      },
    );
  return journal.merges
    .reduce<ResultAsync<void, SetError>>((acc, m) => acc.andThen(() => merge(m)), okAsync(undefined))
    .andThen(rewriteKept)
    .andThen(removeDropped)
    .andThen(() => set.removePrune());
}

/** Steps 1 to 4. */
export function runPrune(set: SetDir, index: SetIndex, journal: PruneJournal, img: QemuImg, trust: Trust): ResultAsync<SetIndex, SetError> {
  const kept: SetIndex = { ...index, points: index.points.filter((p) => journal.keep.includes(p.seq)) };
  if (journal.drop.length === 0) return okAsync(index);
  return set
    .writePrune(journal)
    .andThen(() => set.writeIndex(kept))
    .andThen(() => resumePrune(set, journal, img, trust))
    .map(() => kept);
}
