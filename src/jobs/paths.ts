/**
 * Where backup files may go. A target or scratch path must be absolute, lie
 * under an allowed directory after symlinks and `..` are resolved (its parent
 * directory is resolved with realpath; the file itself must not exist, or —
 * when reuse is asked — must be a regular file, not a symlink or device).
 * Checked before anything is created. NBD unix sockets obey the same
 * directories (see checkSocketPath).
 *
 * The resolved parent must also be one that nobody untrusted can change
 * (safe-fs.ts: every directory from `/` owned and writable only by root, the
 * daemon's user or QEMU's), because QEMU later opens, creates and unlinks by
 * this path: a directory on it that someone else can write to could be
 * swapped for a symlink between this check and QEMU's use. This module must
 * never accept a path whose meaning an untrusted user can change afterwards.
 */
import type { Stats } from "node:fs";
import { realpath } from "node:fs/promises";
import { basename, dirname, isAbsolute, join, sep } from "node:path";
import { errAsync, okAsync, ResultAsync } from "neverthrow";
import { listening } from "../util/listening.js";
import type { BackupError } from "./errors.js";
import { lstatBelow, openTrustedDir, type Trust, trustFor, untrusted } from "./safe-fs.js";

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

type Located = { readonly resolved: string; readonly st: Stats | undefined };

/** Absolute, names a file, no control characters, its resolved directory under an allowed one; and what is there now. */
function locate(path: string, allowedDirs: readonly string[], what: string, trust: Trust): ResultAsync<Located, BackupError> {
  if (!isAbsolute(path)) return errAsync({ code: "path-refused", message: `${what} '${path}' is not an absolute path` });
  const base = basename(path);
  if (base === "" || base === "." || base === ".." || path.endsWith("/")) {
    return errAsync({ code: "path-refused", message: `${what} '${path}' does not name a file` });
  }
  // biome-ignore lint/suspicious/noControlCharactersInRegex: refusing control characters
  if (/[\u0000-\u001f]/.test(path)) return errAsync({ code: "path-refused", message: `${what} contains control characters` });
  return ResultAsync.fromSafePromise(
    (async (): Promise<Located | BackupError> => {
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
      // what lies there is read through the walked directory, not by the path again
      const walk = await openTrustedDir(dir, trust);
      if (!walk.ok) {
        return {
          code: "path-refused",
          message: `${what} '${path}': ${walk.reason}, and only root, the daemon and QEMU's user may be able to change the directories on the way (whoever can could redirect the file outside)`,
        };
      }
      try {
        return { resolved, st: await lstatBelow(walk.dir, base) };
      } finally {
        await walk.dir.close();
      }
    })(),
  ).andThen((r) => ("code" in r ? errAsync(r) : okAsync(r)));
}

/** `qemuUser`: QEMU's user and group when it is not root, trusted like root (it owns the domain's directory). */
export function checkBackupPath(
  path: string,
  allowedDirs: readonly string[],
  reuse: boolean,
  what: string,
  qemuUser?: { readonly uid: number; readonly gid: number },
): ResultAsync<PathCheck, BackupError> {
  const trust = trustFor(qemuUser);
  return locate(path, allowedDirs, what, trust).andThen(({ resolved, st }): ResultAsync<PathCheck, BackupError> => {
    if (st === undefined) return okAsync({ path: resolved, exists: false });
    if (!reuse)
      return errAsync({
        code: "target-exists",
        message: `${what} '${path}' already exists (ask to reuse it if you created it for this backup)`,
      });
    if (!st.isFile()) return errAsync({ code: "path-refused", message: `${what} '${path}' is not a regular file` });
    // another name for the same file may be anywhere (a hard link made in a sticky directory, say)
    if (st.nlink !== 1) return errAsync({ code: "path-refused", message: `${what} '${path}' has other names (hard links)` });
    // its owner could rename it and leave a symlink for QEMU to follow
    const why = untrusted(st, trust);
    if (why !== undefined) return errAsync({ code: "path-refused", message: `${what} '${path}' ${why}: not reused` });
    return okAsync({ path: resolved, exists: true });
  });
}

/**
 * An NBD server's unix socket. QEMU unlinks whatever is at the path before it
 * binds (tried: a regular file there is replaced by the socket), so the path
 * obeys the same allowed directories as backup files, and an existing entry
 * may only be a stale socket: never a file, never one something listens on
 * (another backup's NBD server, say). Its directory must be trusted like a
 * target's (locate): QEMU's unlink and bind re-resolve the path.
 */
export function checkSocketPath(
  path: string,
  allowedDirs: readonly string[],
  qemuUser?: { readonly uid: number; readonly gid: number },
): ResultAsync<string, BackupError> {
  const what = "NBD socket";
  return locate(path, allowedDirs, what, trustFor(qemuUser)).andThen(({ resolved, st }): ResultAsync<string, BackupError> => {
    if (st === undefined) return okAsync(resolved);
    if (!st.isSocket())
      return errAsync({ code: "target-exists", message: `${what} '${path}' exists and is not a socket: QEMU would delete it` });
    return ResultAsync.fromSafePromise(listening({ path: resolved })).andThen((live) =>
      live ? errAsync({ code: "target-exists" as const, message: `${what} '${path}' is in use` }) : okAsync(resolved),
    );
  });
}

/**
 * Allowed directories that no path can pass under (some directory from `/`
 * down to them can be changed by someone other than root, the daemon's user
 * or one of `qemuUsers`), each with the reason: for a warning at start. The
 * check at each request stays the one that counts (directories change).
 */
export async function allowedDirsUntrusted(
  dirs: readonly string[],
  qemuUsers: readonly { readonly uid: number; readonly gid: number }[] = [],
): Promise<{ readonly dir: string; readonly reason: string }[]> {
  const trust = trustFor();
  const uids = new Set(trust.uids);
  const gids = new Set(trust.gids);
  for (const u of qemuUsers) {
    uids.add(u.uid);
    gids.add(u.gid);
  }
  const out: { dir: string; reason: string }[] = [];
  for (const d of dirs) {
    let real: string;
    try {
      real = await realpath(d);
    } catch (e) {
      out.push({ dir: d, reason: (e as Error).message });
      continue;
    }
    const w = await openTrustedDir(real, { uids, gids });
    if (w.ok) await w.dir.close();
    else out.push({ dir: d, reason: w.reason });
  }
  return out;
}
