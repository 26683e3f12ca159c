/**
 * Directory walks, creation and removal that no unprivileged user can
 * redirect, for a daemon that runs as root and writes where users ask.
 *
 * The threat: someone who can write inside an allowed directory swaps a
 * directory on a target's path for a symlink (atomically, renameat2
 * RENAME_EXCHANGE) between our check and a later use of the path. Every use
 * by path then lands outside: our unlink at abort, QEMU's blockdev-create
 * (which opens with O_CREAT and truncates), QEMU's unlink-then-bind of an NBD
 * unix socket.
 *
 * The mechanism, and why: QEMU opens target files and binds sockets by PATH,
 * in its own process. Handing it a file descriptor instead (add-fd with
 * SCM_RIGHTS, then /dev/fdset/N) is not available everywhere: Node's sockets
 * cannot send SCM_RIGHTS (only its internal pipe_wrap binding can, tried),
 * qemu-storage-daemon has no add-fd (7.2 and 10.0, tried), and QMP may be
 * reached over TCP. So the path itself must be one nobody untrusted can
 * change, as sshd's StrictModes demands of ~/.ssh: every directory from `/`
 * to the file's parent must be owned by a trusted user (root, the daemon's
 * user, QEMU's user) and writable by no one else — group-writable only for a
 * trusted group; world-writable only with the sticky bit (as /tmp: others
 * may add names there but not rename or remove ours, and the next directory
 * down must again be owned by a trusted user). A path that passes cannot be
 * redirected later by anyone untrusted, so QEMU's opens by path stay inside.
 * Whoever can write inside an allowed directory can still have a backup
 * written there only into directories that they cannot modify.
 *
 * The walk itself is race-free: each component is opened with
 * O_DIRECTORY|O_NOFOLLOW below the previous one's descriptor (through
 * /proc/self/fd/N/name, since Node has no openat), and ownership and mode are
 * read with fstat from the descriptor that is then used. Files are created
 * (O_CREAT|O_EXCL|O_NOFOLLOW) and removed through the parent's descriptor
 * too, and a removal first checks that the name still holds the very inode
 * we created (device and inode number).
 *
 * Not covered: POSIX ACLs granting write to other users (Node cannot read
 * them; the group bits show the ACL mask, so a writable mask on a
 * non-trusted group is refused, but a named-user ACL with group root is not
 * seen), and bind mounts made by root.
 *
 * This module must never follow a symlink below a descriptor it holds, nor
 * create or remove anything by a path that is re-resolved from `/`.
 */
import { constants, type Stats } from "node:fs";
import { type FileHandle, lstat, open, unlink } from "node:fs/promises";
import { basename, dirname } from "node:path";

/** Who may own or write the directories on a path (besides root). */
export interface Trust {
  readonly uids: ReadonlySet<number>;
  readonly gids: ReadonlySet<number>;
}

/** Root, the daemon's own user and group, and QEMU's when it runs as another user. */
export function trustFor(qemu?: { readonly uid: number; readonly gid: number }): Trust {
  const uids = new Set([0, process.geteuid?.() ?? 0]);
  const gids = new Set([0, process.getegid?.() ?? 0]);
  if (qemu !== undefined) {
    uids.add(qemu.uid);
    gids.add(qemu.gid);
  }
  return { uids, gids };
}

/** Why a directory or file is not safe to use, or undefined when it is. */
export function untrusted(st: Stats, trust: Trust): string | undefined {
  if (!trust.uids.has(st.uid)) return `is owned by uid ${st.uid}`;
  if ((st.mode & 0o020) !== 0 && !trust.gids.has(st.gid)) return `is writable by group ${st.gid}`;
  if (st.isDirectory() && (st.mode & 0o002) !== 0 && (st.mode & 0o1000) === 0) return "is writable by everyone (without the sticky bit)";
  if (!st.isDirectory() && (st.mode & 0o002) !== 0) return "is writable by everyone";
  return undefined;
}

// libuv adds O_CLOEXEC to every open: QEMU and other children never inherit these
const DIR_FLAGS = constants.O_RDONLY | constants.O_DIRECTORY | constants.O_NOFOLLOW;

/** A name below a held directory descriptor: the kernel resolves the magic link to that very directory. */
export function below(dir: FileHandle, name: string): string {
  return `/proc/self/fd/${dir.fd}/${name}`;
}

export type Walk = { readonly ok: true; readonly dir: FileHandle } | { readonly ok: false; readonly reason: string };

/**
 * Open `dir` (absolute, symlinks already resolved) one component at a time
 * from `/`, never following a symlink, and refuse it unless every directory
 * on the way is trusted. The caller closes the returned handle.
 */
export async function openTrustedDir(dir: string, trust: Trust): Promise<Walk> {
  let cur: FileHandle;
  try {
    cur = await open("/", DIR_FLAGS);
  } catch (e) {
    return { ok: false, reason: `cannot open /: ${(e as Error).message}` };
  }
  let at = "/";
  let handed = false;
  try {
    for (const name of ["", ...dir.split("/").filter((c) => c !== "" && c !== ".")]) {
      if (name === "..") return { ok: false, reason: `${dir} is not a resolved path` };
      if (name !== "") {
        const next = await open(below(cur, name), DIR_FLAGS).catch((e: NodeJS.ErrnoException) => e);
        if (!("fd" in next)) {
          const why = next.code === "ELOOP" || next.code === "ENOTDIR" ? "is a symlink or not a directory now" : next.message;
          return { ok: false, reason: `${at === "/" ? "" : at}/${name} ${why}` };
        }
        await cur.close();
        cur = next;
        at = `${at === "/" ? "" : at}/${name}`;
      }
      const why = untrusted(await cur.stat(), trust);
      if (why !== undefined) return { ok: false, reason: `directory ${at} ${why}` };
    }
    handed = true;
    return { ok: true, dir: cur };
  } catch (e) {
    return { ok: false, reason: `cannot walk to ${dir}: ${(e as Error).message}` };
  } finally {
    if (!handed) await cur.close().catch(() => {});
  }
}

/** What lies at `name` in the held directory (not following a symlink), or undefined. */
export async function lstatBelow(dir: FileHandle, name: string): Promise<Stats | undefined> {
  return lstat(below(dir, name)).catch(() => undefined);
}

export interface Created {
  readonly dev: number;
  readonly ino: number;
}

/** Create `path` exclusively (never through a symlink), 0600, given to `owner`; its identity for removal. */
export async function createExclusive(path: string, trust: Trust, owner?: { uid: number; gid: number }): Promise<Created> {
  const w = await openTrustedDir(dirname(path), trust);
  if (!w.ok) throw new Error(w.reason);
  try {
    const fh = await open(
      below(w.dir, basename(path)),
      constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW,
      0o600,
    );
    try {
      const st = await fh.stat();
      if (owner !== undefined) {
        try {
          await fh.chown(owner.uid, owner.gid);
        } catch (e) {
          await unlink(below(w.dir, basename(path))).catch(() => {});
          throw new Error(`cannot give it to QEMU's user ${owner.uid}:${owner.gid}: ${(e as Error).message}`);
        }
      }
      return { dev: st.dev, ino: st.ino };
    } finally {
      await fh.close();
    }
  } finally {
    await w.dir.close();
  }
}

/**
 * Remove `path` through its parent's descriptor; only the inode we created
 * (`created`), or with none given, only a regular file. Anything else at the
 * name, or a directory on the way that is no longer trusted, is left alone.
 * True when removed or already gone.
 */
export async function removeSafely(path: string, trust: Trust, created?: Created): Promise<boolean> {
  const w = await openTrustedDir(dirname(path), trust);
  if (!w.ok) return false;
  try {
    const name = basename(path);
    const st = await lstatBelow(w.dir, name);
    if (st === undefined) return true;
    if (created !== undefined ? st.dev !== created.dev || st.ino !== created.ino : !st.isFile()) return false;
    // unlink never follows the last component; the directory is the one we hold
    await unlink(below(w.dir, name));
    return true;
  } catch {
    return false;
  } finally {
    await w.dir.close();
  }
}
