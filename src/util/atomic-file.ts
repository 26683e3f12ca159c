/**
 * Durable metadata writes: write a temp file in the same directory, fsync it,
 * rename it over the target, fsync the directory. A crash at any point leaves
 * either the old file or the new one, never a mix. Hand-written because
 * write-file-atomic (the usual library) needs Node 22 from v7 on and never
 * fsyncs the directory, which is what makes the rename itself durable.
 */
import { randomBytes } from "node:crypto";
import { constants } from "node:fs";
import { mkdir, open, rename, unlink } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import { ResultAsync } from "neverthrow";

export interface IoError {
  readonly code: "io";
  readonly message: string;
  /** errno code (ENOSPC, EACCES, …) when there is one. */
  readonly errno: string | undefined;
}

export function ioError(what: string, e: unknown): IoError {
  const errno = (e as NodeJS.ErrnoException).code;
  return { code: "io", message: `${what}: ${(e as Error).message}`, errno };
}

/** Prefix of temp files; names starting with '.' can never be checkpoint names. */
export const TEMP_PREFIX = ".tmp-";

export async function fsyncDir(dir: string): Promise<void> {
  const fh = await open(dir, constants.O_RDONLY | constants.O_DIRECTORY);
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

export function writeFileAtomic(path: string, data: string | Uint8Array, mode = 0o600): ResultAsync<void, IoError> {
  const dir = dirname(path);
  const tmp = join(dir, `${TEMP_PREFIX}${basename(path)}.${randomBytes(6).toString("hex")}`);
  const run = async (): Promise<void> => {
    const fh = await open(tmp, "wx", mode);
    try {
      await fh.writeFile(data);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, path);
    await fsyncDir(dir);
  };
  return ResultAsync.fromPromise(
    run().catch(async (e: unknown) => {
      await unlink(tmp).catch(() => {});
      throw e;
    }),
    (e) => ioError(`cannot write ${path}`, e),
  );
}

/** Remove a file and make the removal durable. Removing a missing file is not an error. */
export function removeFileDurable(path: string): ResultAsync<void, IoError> {
  return ResultAsync.fromPromise(
    (async () => {
      try {
        await unlink(path);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code === "ENOENT") return;
        throw e;
      }
      await fsyncDir(dirname(path));
    })(),
    (e) => ioError(`cannot remove ${path}`, e),
  );
}

/** mkdir -p with a mode for the directories it creates. */
export function ensureDir(path: string, mode = 0o700): ResultAsync<void, IoError> {
  return ResultAsync.fromPromise(
    mkdir(path, { recursive: true, mode }).then(() => undefined),
    (e) => ioError(`cannot create directory ${path}`, e),
  );
}
