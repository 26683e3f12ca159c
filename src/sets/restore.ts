/**
 * `restore`: a disk as it was at a restore point, written into a new file.
 * The file is created by the daemon itself, exclusively and below a walked
 * directory (jobs/safe-fs.ts: never through a symlink, never over anything
 * that exists), then `qemu-img convert -n` reads the point's chain (the top
 * image, whose backing links lead down to the full) into it. Nothing is
 * left of a restore that failed.
 *
 * Without the daemon the same is one command (docs/backup-sets.md):
 *     qemu-img convert -f qcow2 -O raw DIR/data/NNNNNN.DISK.qcow2 FILE
 */
import { constants } from "node:fs";
import { open } from "node:fs/promises";
import { errAsync, okAsync, ResultAsync } from "neverthrow";
import { checkBackupPath } from "../jobs/paths.js";
import { type Created, createExclusive, removeSafely, type Trust } from "../jobs/safe-fs.js";
import { ioError } from "../util/atomic-file.js";
import type { SetError } from "./errors.js";
import type { Point } from "./manifest.js";
import type { QemuImg } from "./qemu-img.js";
import type { SetDir } from "./store.js";

export interface RestoreRequest {
  readonly disk: string;
  readonly file: string;
  readonly format: "raw" | "qcow2";
}

export interface RestoreResult {
  readonly checkpoint: string;
  readonly disk: string;
  readonly file: string;
  readonly format: "raw" | "qcow2";
  readonly virtualSize: number;
  readonly elapsedMs: number;
}

/** Size the fresh file (raw: sparse to the disk's size; qcow2: a new image) and flush what convert wrote. */
function sized(path: string, format: "raw" | "qcow2", size: number, img: QemuImg): ResultAsync<void, SetError> {
  if (format === "qcow2") return img.create(path, size);
  return ResultAsync.fromPromise(
    (async () => {
      const fh = await open(path, constants.O_WRONLY | constants.O_NOFOLLOW);
      try {
        await fh.truncate(size);
      } finally {
        await fh.close();
      }
    })(),
    (e) => ioError(`cannot size ${path}`, e) as SetError,
  );
}

function flush(path: string): ResultAsync<void, SetError> {
  return ResultAsync.fromPromise(
    (async () => {
      const fh = await open(path, constants.O_RDONLY | constants.O_NOFOLLOW);
      try {
        await fh.sync();
      } finally {
        await fh.close();
      }
    })(),
    (e) => ioError(`cannot write ${path} out`, e) as SetError,
  );
}

export function restorePoint(
  set: SetDir,
  point: Point,
  req: RestoreRequest,
  allowedDirs: readonly string[],
  trust: Trust,
  img: QemuImg,
): ResultAsync<RestoreResult, SetError> {
  const d = point.disks.find((x) => x.name === req.disk);
  if (d === undefined)
    return errAsync({
      code: "unknown-disk",
      message: `restore point '${point.checkpoint}' has no disk '${req.disk}' (it has ${point.disks.map((x) => x.name).join(", ")})`,
    });
  const t0 = Date.now();
  return checkBackupPath(req.file, allowedDirs, false, "restore file").andThen((p) => {
    let created: Created | undefined;
    const undo = (e: SetError) =>
      ResultAsync.fromSafePromise(created === undefined ? Promise.resolve(true) : removeSafely(p.path, trust, created)).andThen(() =>
        errAsync<RestoreResult, SetError>(e),
      );
    return ResultAsync.fromPromise(createExclusive(p.path, trust), (e): SetError => {
      const m = (e as Error).message;
      return /EEXIST/.test(m)
        ? { code: "target-exists", message: `restore file '${req.file}' already exists` }
        : { code: "path-refused", message: `restore file '${req.file}': ${m}` };
    })
      .andThen((c) => {
        created = c;
        return sized(p.path, req.format, d.virtualSize, img);
      })
      .andThen(() => img.convertInto(set.path(d.file), p.path, req.format))
      .andThen(() => flush(p.path))
      .map(
        (): RestoreResult => ({
          checkpoint: point.checkpoint,
          disk: d.name,
          file: p.path,
          format: req.format,
          virtualSize: d.virtualSize,
          elapsedMs: Date.now() - t0,
        }),
      )
      .orElse(undo)
      .andThen((r) => okAsync(r));
  });
}
