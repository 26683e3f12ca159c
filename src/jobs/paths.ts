/**
 * Where backup files may go. A target or scratch path must be absolute, lie
 * under an allowed directory after symlinks and `..` are resolved (its parent
 * directory is resolved with realpath; the file itself must not exist, or —
 * when reuse is asked — must be a regular file, not a symlink or device).
 * Checked before anything is created.
 */
import { lstat, realpath } from "node:fs/promises";
import { basename, dirname, isAbsolute, join, sep } from "node:path";
import { errAsync, okAsync, ResultAsync } from "neverthrow";
import type { BackupError } from "./errors.js";

export function isUnder(path: string, dir: string): boolean {
  return path === dir || path.startsWith(dir.endsWith(sep) ? dir : dir + sep);
}

async function resolveAllowed(dirs: readonly string[]): Promise<string[]> {
  const out: string[] = [];
  for (const d of dirs) {
    try {
      out.push(await realpath(d));
    } catch {
      // an allowed directory that does not exist allows nothing
    }
  }
  return out;
}

export interface PathCheck {
  /** The path with its directory resolved (what we hand to QEMU). */
  readonly path: string;
  /** The file exists (only possible with reuse). */
  readonly exists: boolean;
}

export function checkBackupPath(
  path: string,
  allowedDirs: readonly string[],
  reuse: boolean,
  what: string,
): ResultAsync<PathCheck, BackupError> {
  if (!isAbsolute(path)) return errAsync({ code: "path-refused", message: `${what} '${path}' is not an absolute path` });
  const base = basename(path);
  if (base === "" || base === "." || base === ".." || path.endsWith("/")) {
    return errAsync({ code: "path-refused", message: `${what} '${path}' does not name a file` });
  }
  // biome-ignore lint/suspicious/noControlCharactersInRegex: refusing control characters
  if (/[\u0000-\u001f]/.test(path)) return errAsync({ code: "path-refused", message: `${what} contains control characters` });
  return ResultAsync.fromSafePromise(
    (async (): Promise<PathCheck | BackupError> => {
      const allowed = await resolveAllowed(allowedDirs);
      let dir: string;
      try {
        dir = await realpath(dirname(path));
      } catch {
        return { code: "path-refused", message: `${what} '${path}': directory ${dirname(path)} does not exist` };
      }
      const resolved = join(dir, base);
      if (!allowed.some((a) => isUnder(resolved, a))) {
        return { code: "path-refused", message: `${what} '${path}' is outside the allowed directories (${allowedDirs.join(", ")})` };
      }
      let st: Awaited<ReturnType<typeof lstat>> | undefined;
      try {
        st = await lstat(resolved);
      } catch {
        st = undefined;
      }
      if (st === undefined) return { path: resolved, exists: false };
      if (!reuse)
        return { code: "target-exists", message: `${what} '${path}' already exists (ask to reuse it if you created it for this backup)` };
      if (!st.isFile()) return { code: "path-refused", message: `${what} '${path}' is not a regular file` };
      return { path: resolved, exists: true };
    })(),
  ).andThen((r) => ("code" in r ? errAsync(r) : okAsync(r)));
}
