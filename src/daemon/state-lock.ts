/**
 * One daemon per state directory. The daemon holds an exclusive flock(2) on
 * <stateDir>/lock for its whole life; a second daemon on the same directory
 * cannot get it and refuses to start, naming the holder's PID, which the
 * holder writes into the file. Two daemons on one directory would each keep
 * their own idea of the checkpoints and write over each other's files (a
 * second root checkpoint beside the first's, `.current` rewritten).
 *
 * flock and not a PID file: the kernel drops the lock when the holder's last
 * descriptor of it closes, so a kill -9, an OOM kill or a crash never leaves
 * a stale lock behind, and a PID reused by another process never blocks a
 * start. The PID in the file only names the holder in the refusal.
 *
 * Node has no flock in core, and fs-ext (the package that binds it) always
 * builds with node-gyp at install, with no prebuilt binary: the container's
 * build stage (node:24-bookworm-slim) has no compiler for it. So flock(1)
 * from util-linux (installed on every Debian, Essential) makes the call on a
 * descriptor we open and lend it as its fd 3: a flock belongs to the open
 * file description, which stays ours, locked, after flock(1) exits. Node
 * opens files close-on-exec, so no process the daemon starts later inherits
 * the descriptor and outlives us holding the lock.
 *
 * Must never: close the descriptor while the daemon runs (that is the
 * unlock), nor write the file before holding the lock.
 */
import { spawnSync } from "node:child_process";
import { closeSync, constants, ftruncateSync, openSync, readFileSync, writeSync } from "node:fs";
import { join } from "node:path";
import { err, ok, type Result } from "neverthrow";
import { type IoError, ioError } from "../util/atomic-file.js";

export const LOCK_FILE = "lock";

/** flock(1)'s exit status when the lock is held elsewhere (asked for with --conflict-exit-code). */
const CONFLICT = 75;

export type StateLockError =
  | { readonly code: "locked"; readonly message: string; readonly pid: number | undefined }
  | IoError
  /** flock(1) could not be run or failed for another reason than a held lock. */
  | { readonly code: "internal"; readonly message: string };

export class StateLock {
  private constructor(
    readonly path: string,
    private fd: number | undefined,
  ) {}

  /** Take the state directory's lock, or say who holds it. */
  static async acquire(stateDir: string): Promise<Result<StateLock, StateLockError>> {
    const path = join(stateDir, LOCK_FILE);
    let fd: number;
    try {
      // no O_TRUNC: the file holds the holder's PID until we hold the lock
      fd = openSync(path, constants.O_RDWR | constants.O_CREAT, 0o600);
    } catch (e) {
      return err(ioError(`cannot open the state directory's lock ${path}`, e));
    }
    const r = spawnSync("flock", ["--exclusive", "--nonblock", "--conflict-exit-code", String(CONFLICT), "3"], {
      stdio: ["ignore", "ignore", "pipe", fd],
      encoding: "utf8",
    });
    if (r.status === 0) {
      try {
        ftruncateSync(fd, 0);
        writeSync(fd, `${process.pid}\n`, 0);
      } catch (e) {
        closeSync(fd);
        return err(ioError(`cannot write ${path}`, e));
      }
      return ok(new StateLock(path, fd));
    }
    closeSync(fd);
    if (r.error !== undefined)
      return err({ code: "internal", message: `cannot lock ${path}: cannot run flock (util-linux): ${r.error.message}` });
    if (r.status !== CONFLICT)
      return err({
        code: "internal",
        message: `cannot lock ${path}: flock ${r.signal !== null ? `killed by ${r.signal}` : `exited ${r.status}`}: ${r.stderr.trim()}`,
      });
    const pid = await holderPid(path);
    return err({
      code: "locked",
      pid,
      message: `state directory ${stateDir} is in use by another qbackupd (PID ${pid ?? "unknown"}); one daemon per state directory`,
    });
  }

  /** At stop: the next daemon may start. */
  release(): void {
    if (this.fd === undefined) return;
    closeSync(this.fd);
    this.fd = undefined;
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    // EPERM: it exists, as another user
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
}

/**
 * The PID the holder wrote. Between taking the lock and writing its PID the
 * file is empty or still names an earlier, dead holder: look again a few
 * times before giving up on naming it.
 */
async function holderPid(path: string): Promise<number | undefined> {
  let seen: number | undefined;
  for (let i = 0; i < 10; i++) {
    try {
      const text = readFileSync(path, "utf8").trim();
      seen = /^\d+$/.test(text) ? Number(text) : undefined;
    } catch {
      seen = undefined;
    }
    if (seen !== undefined && alive(seen)) return seen;
    await new Promise((r) => setTimeout(r, 50));
  }
  return seen;
}
