/**
 * Target and scratch images: created 0600 and exclusively (open with O_EXCL
 * first, so we never overwrite a file that appeared meanwhile), then
 * formatted by qemu-img without a shell; removed on failure and teardown.
 */
import { execFile } from "node:child_process";
import { open, unlink } from "node:fs/promises";
import { promisify } from "node:util";
import { ResultAsync } from "neverthrow";
import type { BackupError } from "./errors.js";

const run = promisify(execFile);

export interface ImageSpec {
  readonly path: string;
  readonly format: "qcow2" | "raw";
  readonly size: number;
  readonly clusterSize?: number | undefined;
}

export function imageCreate(spec: ImageSpec): ResultAsync<void, BackupError> {
  return ResultAsync.fromPromise(
    (async () => {
      const fh = await open(spec.path, "wx", 0o600);
      await fh.close();
      try {
        const opts = spec.format === "qcow2" && spec.clusterSize !== undefined ? ["-o", `cluster_size=${spec.clusterSize}`] : [];
        await run("qemu-img", ["create", "-q", "-f", spec.format, ...opts, spec.path, String(spec.size)]);
      } catch (e) {
        await unlink(spec.path).catch(() => {});
        throw e;
      }
    })(),
    (e): BackupError => {
      const x = e as NodeJS.ErrnoException & { stderr?: string };
      return { code: "image", message: `cannot create ${spec.path}: ${(x.stderr ?? "").trim() || x.message}` };
    },
  );
}

/** Remove a file we created; a missing file is fine. */
export async function imageRemove(path: string): Promise<void> {
  await unlink(path).catch(() => {});
}
