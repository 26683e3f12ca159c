/**
 * `export`: a restore point served read-only over NBD, for instant access
 * without a restore (nbdfuse, `qemu-nbd --connect`, guestfish, booting a
 * copy with a writable overlay of its own). A qemu-storage-daemon opens the
 * point's top image read-only — its backing links bring in the rest of the
 * chain — and exports it on a unix socket until the export is ended. Each
 * export's process is recorded in <stateDir>/set-exports/, so a daemon that
 * was killed ends the ones it left at its next start (checked by the
 * process's command line, never a pid alone).
 */
import { type ChildProcess, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { readdirSync, readFileSync, unlinkSync } from "node:fs";
import { unlink } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import { errAsync, okAsync, ResultAsync } from "neverthrow";
import { checkSocketPath } from "../jobs/paths.js";
import { below, lstatBelow, openTrustedDir, trustFor } from "../jobs/safe-fs.js";
import type { Logger } from "../log.js";
import { ensureDir, removeFileDurable, writeFileAtomic } from "../util/atomic-file.js";
import { listening } from "../util/listening.js";
import type { SetError } from "./errors.js";
import type { Point } from "./manifest.js";
import type { SetDir } from "./store.js";

export interface SetExportInfo {
  readonly id: string;
  readonly set: string;
  readonly checkpoint: string;
  readonly disk: string;
  readonly socket: string;
  readonly uri: string;
  readonly startedAt: string;
}

interface Running {
  readonly info: SetExportInfo;
  readonly proc: ChildProcess;
  readonly release: () => void;
}

export function storageDaemonExportArgs(top: string, socket: string, name: string): string[] {
  return [
    "--blockdev",
    JSON.stringify({ driver: "qcow2", "node-name": "qbk-set", "read-only": true, file: { driver: "file", filename: top } }),
    "--nbd-server",
    JSON.stringify({ addr: { type: "unix", path: socket } }),
    "--export",
    JSON.stringify({ type: "nbd", id: "qbk-set-export", "node-name": "qbk-set", name, writable: false }),
  ];
}

/** The storage daemon leaves its socket behind: removed through the walked directory, and only while it is a socket. */
async function removeSocket(path: string): Promise<void> {
  const w = await openTrustedDir(dirname(path), trustFor());
  if (!w.ok) return;
  try {
    const st = await lstatBelow(w.dir, basename(path));
    if (st?.isSocket()) await unlink(below(w.dir, basename(path)));
  } catch {
    // gone already
  } finally {
    await w.dir.close();
  }
}

export class SetExports {
  private readonly running = new Map<string, Running>();
  private readonly dir: string;

  constructor(
    private readonly opts: {
      readonly stateDir: string;
      readonly logger: Logger;
      readonly binary?: string | undefined;
      readonly allowedDirs: readonly string[];
    },
  ) {
    this.dir = join(opts.stateDir, "set-exports");
  }

  list(): SetExportInfo[] {
    return [...this.running.values()].map((r) => r.info);
  }

  /** Serve `disk` of `point`; `release` gives the set back when the export ends (however it ends). */
  start(set: SetDir, point: Point, disk: string, socket: string, release: () => void): ResultAsync<SetExportInfo, SetError> {
    const d = point.disks.find((x) => x.name === disk);
    if (d === undefined) {
      release();
      return errAsync({ code: "unknown-disk", message: `restore point '${point.checkpoint}' has no disk '${disk}'` });
    }
    const id = randomBytes(4).toString("hex");
    if (Buffer.byteLength(socket) > 107) {
      release();
      return errAsync({ code: "path-refused", message: `NBD socket '${socket}' is longer than a unix socket path may be (107 bytes)` });
    }
    return checkSocketPath(socket, this.opts.allowedDirs)
      .andThen((path) => ensureDir(this.dir).map(() => path))
      .andThen((path) => ResultAsync.fromSafePromise(this.spawn(id, set, point, d.file, disk, path, release)))
      .andThen((r) => (typeof r === "string" ? errAsync<SetExportInfo, SetError>({ code: "image", message: r }) : okAsync(r)))
      .orElse((e) => {
        if (!this.running.has(id)) release();
        return errAsync(e);
      });
  }

  private async spawn(
    id: string,
    set: SetDir,
    point: Point,
    file: string,
    disk: string,
    socket: string,
    release: () => void,
  ): Promise<SetExportInfo | string> {
    const proc = spawn(this.opts.binary ?? "qemu-storage-daemon", storageDaemonExportArgs(set.path(file), socket, disk), {
      stdio: ["ignore", "ignore", "pipe"],
    });
    let stderr = "";
    proc.stderr?.on("data", (c: Buffer) => {
      stderr = (stderr + c.toString()).slice(-2000);
    });
    const exited = new Promise<void>((r) => proc.once("exit", () => r()));
    let gone = false;
    void exited.then(() => (gone = true));
    for (let i = 0; i < 100 && !gone; i++) {
      if (await listening({ path: socket }, 200)) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    if (gone || !(await listening({ path: socket }, 500))) {
      proc.kill("SIGKILL");
      return `qemu-storage-daemon did not serve ${socket}: ${stderr.trim().split("\n").slice(-2).join("; ") || "no answer"}`;
    }
    const info: SetExportInfo = {
      id,
      set: set.root,
      checkpoint: point.checkpoint,
      disk,
      socket,
      uri: `nbd+unix:///${disk}?socket=${socket}`,
      startedAt: new Date().toISOString(),
    };
    this.running.set(id, { info, proc, release });
    await writeFileAtomic(join(this.dir, `${id}.json`), JSON.stringify({ pid: proc.pid, socket }));
    void exited.then(async () => {
      this.running.delete(id);
      await removeSocket(socket);
      release();
      await removeFileDurable(join(this.dir, `${id}.json`));
      this.opts.logger.info({ export: id, socket }, "backup set export ended");
    });
    return info;
  }

  end(id: string): ResultAsync<SetExportInfo, SetError> {
    const r = this.running.get(id);
    if (r === undefined) return errAsync({ code: "not-found", message: `no backup set export '${id}'` });
    const gone = new Promise<void>((res) => {
      if (r.proc.exitCode !== null || r.proc.signalCode !== null) res();
      else r.proc.once("exit", () => res());
    });
    r.proc.kill("SIGTERM");
    const hard = setTimeout(() => r.proc.kill("SIGKILL"), 5000);
    return ResultAsync.fromSafePromise(gone.then(() => clearTimeout(hard))).map(() => r.info);
  }

  /** Daemon stop: the exports end with it (a reader sees the connection close). */
  async endAll(): Promise<void> {
    await Promise.all([...this.running.keys()].map((id) => this.end(id)));
  }

  /** Start: end the storage daemons of exports a killed daemon left. */
  cleanLeftovers(): void {
    let names: string[] = [];
    try {
      names = readdirSync(this.dir);
    } catch {
      return;
    }
    for (const n of names) {
      if (!n.endsWith(".json")) continue;
      try {
        const rec = JSON.parse(readFileSync(join(this.dir, n), "utf8")) as { pid?: unknown; socket?: unknown };
        if (typeof rec.pid === "number" && typeof rec.socket === "string") {
          let cmd = "";
          try {
            cmd = readFileSync(`/proc/${rec.pid}/cmdline`, "utf8");
          } catch {
            // gone
          }
          if (cmd.includes("qemu-storage-daemon") && cmd.includes(JSON.stringify({ addr: { type: "unix", path: rec.socket } }))) {
            process.kill(rec.pid, "SIGKILL");
            this.opts.logger.warn({ pid: rec.pid, socket: rec.socket }, "ended a backup set export a previous daemon left");
          }
        }
        unlinkSync(join(this.dir, n));
      } catch {
        // unreadable record: nothing to end
      }
    }
  }
}
