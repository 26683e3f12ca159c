/**
 * Backups of a domain whose QEMU is not running. A qemu-storage-daemon,
 * started for the operation, opens the images the domain's disks last had
 * (disk-memory.ts), one format node per disk named after the disk (so
 * discovery names its disks as the VM's devices named them), with QEMU's
 * image locking on; the operation runs over its QMP exactly as over the VM's,
 * and the storage daemon ends afterwards: a push once its job has ended, a
 * pull once it is ended, a checkpoint operation at once.
 *
 * Locking decides whether an image is free: an image another process holds
 * (the VM, started meanwhile; a qemu-nbd serving it) makes the storage
 * daemon fail to open it, and the operation is refused as busy with QEMU's
 * own words. Locking is never turned off. The other way round, a VM started
 * while an offline operation holds its images fails on the lock; offline
 * operations are kept short for that reason (docs/offline.md).
 *
 * The storage daemon's QMP socket and pid file are
 * `<stateDir>/offline/<hash of the domain>.{qmp,pid}`: a daemon killed during
 * an offline backup finds it there at its next start and adopts the job
 * (recovery works on any QMP client), then ends it like its own.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, readFileSync, rmSync, statSync } from "node:fs";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { errAsync, okAsync, ResultAsync } from "neverthrow";
import type { CheckpointError } from "../checkpoints/errors.js";
import type { CheckpointManager } from "../checkpoints/manager.js";
import type { BackupDomain, BeginOptions, JobManager } from "../jobs/manager.js";
import type { BackupJobInfo } from "../jobs/model.js";
import type { Logger } from "../log.js";
import { probeCapabilities } from "../qmp/capabilities.js";
import { QmpClient } from "../qmp/client.js";
import { discoverDisks } from "../qmp/disks.js";
import { qmpErrorMessage } from "../qmp/errors.js";
import { ensureDir } from "../util/atomic-file.js";
import type { RememberedDisk } from "./disk-memory.js";

/** What the offline layer needs of a domain. */
export interface OfflineCapable {
  readonly name: string;
  readonly checkpoints: CheckpointManager;
  /** The disks as last seen while QEMU ran (undefined: never seen). */
  rememberedDisks(): readonly RememberedDisk[] | undefined;
  /** Disks of that sighting a storage daemon cannot open by themselves. */
  unopenableDisks(): readonly string[];
}

export type OfflineError = { readonly code: "busy"; readonly message: string } | { readonly code: "unsupported"; readonly message: string };

/** QEMU's node names: a letter, then letters, digits, '-', '.', '_'; under 32 bytes. */
const NODE_NAME = /^[A-Za-z][A-Za-z0-9._-]{0,30}$/;
const START_TIMEOUT_MS = 15_000;
const STOP_TIMEOUT_MS = 10_000;

/** A running storage daemon and the QMP connection to it. */
export interface OfflineSession {
  readonly client: QmpClient;
  /** The domain as the job layer sees it, over this storage daemon. */
  readonly domain: BackupDomain;
  stop(): Promise<void>;
}

/** The storage daemon's command line for these disks. */
export function storageDaemonArgs(disks: readonly RememberedDisk[], qmpPath: string, pidPath: string): string[] {
  const args: string[] = [];
  for (const [i, d] of disks.entries()) {
    let block = false;
    try {
      block = statSync(d.file).isBlockDevice();
    } catch {
      // a missing file fails in the storage daemon, which says so
    }
    const file = { driver: block ? "host_device" : "file", "node-name": `qbf${i}`, filename: d.file, locking: "on" };
    args.push("--blockdev", JSON.stringify(file));
    args.push("--blockdev", JSON.stringify({ driver: d.format, "node-name": d.name, file: `qbf${i}`, "read-only": d.readOnly }));
  }
  args.push("--chardev", `socket,id=qbkm,path=${qmpPath},server=on,wait=off`, "--monitor", "chardev=qbkm", "--pidfile", pidPath);
  return args;
}

export class OfflineRunner {
  /** Domains with a storage daemon, from its start until it ended: one at a time (its socket path is the domain's). */
  private readonly sessions = new Set<string>();

  constructor(
    private readonly opts: { readonly stateDir: string; readonly logger: Logger; readonly jobs: JobManager; readonly binary?: string },
  ) {}

  private paths(domain: string): { qmp: string; pid: string } {
    const h = createHash("sha256").update(domain).digest("hex").slice(0, 16);
    const dir = join(this.opts.stateDir, "offline");
    return { qmp: join(dir, `${h}.qmp`), pid: join(dir, `${h}.pid`) };
  }

  /** Is an offline operation (a storage daemon) under way for the domain? */
  active(domain: string): boolean {
    return this.sessions.has(domain);
  }

  /** virDomainBackupBegin on a domain whose QEMU is not running. */
  begin(d: OfflineCapable, backupXml: string | undefined, checkpointXml: string | undefined, opts: BeginOptions) {
    if (opts.quiesce === true)
      return errAsync<BackupJobInfo, OfflineError>({
        code: "unsupported",
        message: `domain '${d.name}' is not running: there is no guest to quiesce`,
      });
    return this.start(d).andThen((s) =>
      this.opts.jobs
        .begin(s.domain, backupXml, checkpointXml, opts)
        .map((info) => {
          this.stopWhenEnded(d.name, s, info.id);
          return info;
        })
        .orElse((e) => ResultAsync.fromSafePromise(s.stop()).andThen(() => errAsync(e))),
    );
  }

  /** A checkpoint operation on a domain whose QEMU is not running: a storage daemon for its duration. */
  withSession<T>(d: OfflineCapable, fn: (client: QmpClient) => ResultAsync<T, CheckpointError>) {
    return this.start(d).andThen((s) =>
      ResultAsync.fromSafePromise(
        (async () => {
          // the checkpoints are checked against what this storage daemon shows before anything else
          await d.checkpoints.reconcile(s.client);
          const r = await fn(s.client);
          await s.stop();
          return r;
        })(),
      ).andThen((r) => r),
    );
  }

  /**
   * At start: a storage daemon a killed daemon left behind is adopted (its
   * job recovered from the record, then ended as ours), or ended.
   */
  async adoptLeftover(d: OfflineCapable): Promise<void> {
    const { qmp } = this.paths(d.name);
    if (!existsSync(qmp)) return;
    const c = await QmpClient.connect({ path: qmp }, { logger: this.opts.logger });
    let s: OfflineSession;
    if (c.isOk()) {
      this.opts.logger.warn({ domain: d.name }, "found the storage daemon of an offline backup left by a previous daemon: adopting it");
      this.sessions.add(d.name);
      s = await this.sessionOn(d, c.value, undefined);
    } else {
      // nobody answers. One still running (stopped, stuck) would hold the images' locks for good once its files
      // are gone, and no later start would find it: ended here
      if (await this.killLeftover(d.name))
        this.opts.logger.error({ domain: d.name, error: qmpErrorMessage(c.error) }, "a leftover storage daemon did not answer: killed it");
      this.removeFiles(d.name);
      // a job it ran is recorded still: finished against a fresh storage daemon, which has none of its nodes
      // or jobs (as after a QEMU restart), so it ends failed and its files go, not overwritten by the next begin
      const fresh = await this.start(d);
      if (fresh.isErr()) {
        this.opts.logger.warn({ domain: d.name, error: fresh.error.message }, "cannot open the images to finish a leftover offline job");
        return;
      }
      s = fresh.value;
    }
    await this.opts.jobs.recover(s.domain);
    const job = this.opts.jobs.job(d.name);
    if (job?.active === true) this.stopWhenEnded(d.name, s, job.info().id);
    else await s.stop();
  }

  private stopWhenEnded(domain: string, s: OfflineSession, jobId: string): void {
    const off = this.opts.jobs.subscribe((e) => {
      if (e.type !== "ended" || e.info.domain !== domain || e.info.id !== jobId) return;
      off();
      void s.stop();
    });
  }

  private start(d: OfflineCapable): ResultAsync<OfflineSession, OfflineError> {
    const unopenable = d.unopenableDisks();
    if (unopenable.length > 0)
      return errAsync({
        code: "unsupported",
        message: `domain '${d.name}' cannot be backed up offline: QEMU last had disk(s) ${unopenable.map((n) => `'${n}'`).join(", ")} opened in a way the image file alone does not give (a json: filename, a chain QEMU was given, another format); a backup of the others would leave them out`,
      });
    const disks = d.rememberedDisks();
    if (disks === undefined || disks.length === 0)
      return errAsync({
        code: "unsupported",
        message: `domain '${d.name}' is not connected to QEMU, and its disks are not known (qbackupd never saw it run; register them with domain-add --disk)`,
      });
    const bad = disks.find((x) => !NODE_NAME.test(x.name));
    if (bad !== undefined)
      return errAsync({
        code: "unsupported",
        message: `disk '${bad.name}' cannot be opened offline: a storage daemon names it by a node name, at most 31 characters starting with a letter`,
      });
    if (this.sessions.has(d.name))
      return errAsync({ code: "busy", message: `an offline operation (a storage daemon) is under way on domain '${d.name}'` });
    this.sessions.add(d.name);
    const { qmp, pid } = this.paths(d.name);
    return ensureDir(join(this.opts.stateDir, "offline"))
      .mapErr((e): OfflineError => ({ code: "unsupported", message: e.message }))
      .andThen(() => ResultAsync.fromSafePromise(this.spawn(d, disks, qmp, pid)))
      .andThen((r) => (typeof r === "string" ? errAsync<OfflineSession, OfflineError>({ code: "busy", message: r }) : okAsync(r)))
      .andThen((s) => this.sameChains(d.name, disks, s))
      .orElse((e) => {
        this.sessions.delete(d.name);
        return errAsync(e);
      });
  }

  /**
   * The storage daemon opened each image with the backing chain its header
   * names; QEMU may have had another (an overlay put on top with
   * blockdev-snapshot names no backing file): what it opened would be other
   * data than the guest's disk, and a backup of it silently wrong. Refused
   * unless every disk's chain is the one QEMU had.
   */
  private sameChains(domain: string, disks: readonly RememberedDisk[], s: OfflineSession): ResultAsync<OfflineSession, OfflineError> {
    return ResultAsync.fromSafePromise(discoverDisks(s.client)).andThen((seen) => {
      const wrong = seen.isErr()
        ? `cannot list the storage daemon's disks: ${qmpErrorMessage(seen.error)}`
        : disks.flatMap((m) => {
            const got = seen.value.find((x) => x.name === m.name);
            const chain = got === undefined ? [] : [got.file, ...got.below.map((l) => l.file)];
            // registered by hand: no chain was seen, the headers' is taken
            if (m.chain === undefined) return [];
            const want = [m.file, ...m.chain];
            return chain.join("\n") === want.join("\n")
              ? []
              : [`disk '${m.name}': QEMU had ${want.join(" over ")}, the image files now give ${chain.join(" over ") || "nothing"}`];
          })[0];
      if (wrong === undefined) return okAsync(s);
      return ResultAsync.fromSafePromise(s.stop()).andThen(() =>
        errAsync<OfflineSession, OfflineError>({
          code: "unsupported",
          message: `domain '${domain}' cannot be backed up offline: its images are not the disks QEMU last ran with (${wrong}); start the VM once so its disks are seen again`,
        }),
      );
    });
  }

  private async spawn(d: OfflineCapable, disks: readonly RememberedDisk[], qmp: string, pid: string): Promise<OfflineSession | string> {
    rmSync(qmp, { force: true });
    rmSync(pid, { force: true });
    const proc = spawn(this.opts.binary ?? "qemu-storage-daemon", storageDaemonArgs(disks, qmp, pid), {
      stdio: ["ignore", "ignore", "pipe"],
    });
    let stderr = "";
    proc.stderr?.setEncoding("utf8").on("data", (x: string) => {
      if (stderr.length < 8192) stderr += x;
    });
    const exited = new Promise<void>((r) => {
      proc.once("exit", () => r());
      proc.once("error", (e) => {
        stderr += e.message;
        r();
      });
    });
    let gone = false;
    void exited.then(() => {
      gone = true;
    });
    const deadline = Date.now() + START_TIMEOUT_MS;
    for (;;) {
      if (gone) {
        this.removeFiles(d.name);
        const why = stderr.trim().split("\n").at(-1) ?? "it exited";
        return /lock/i.test(stderr)
          ? `domain '${d.name}' is not running, but an image of it is in use by another process (QEMU's image lock): ${why}`
          : `cannot open the images of domain '${d.name}' offline: ${why}`;
      }
      if (existsSync(qmp)) {
        const c = await QmpClient.connect({ path: qmp }, { logger: this.opts.logger });
        if (c.isOk()) return this.sessionOn(d, c.value, proc);
      }
      if (Date.now() > deadline) {
        proc.kill("SIGKILL");
        await exited;
        this.removeFiles(d.name);
        return `the storage daemon for domain '${d.name}' did not start within ${START_TIMEOUT_MS} ms`;
      }
      await sleep(20);
    }
  }

  private async sessionOn(d: OfflineCapable, client: QmpClient, proc: ChildProcess | undefined): Promise<OfflineSession> {
    const caps = await probeCapabilities(client, new Map());
    const domain: BackupDomain = {
      name: d.name,
      client: () => client,
      checkpoints: d.checkpoints,
      backupPerf: caps.isOk() && caps.value.backupPerf,
    };
    let stopped: Promise<void> | undefined;
    const stop = (): Promise<void> => {
      stopped ??= this.stopDaemon(d.name, client, proc);
      return stopped;
    };
    return { client, domain, stop };
  }

  /** quit over QMP (QEMU writes persistent bitmaps into the images as it closes them); killed only if that fails. */
  private async stopDaemon(domain: string, client: QmpClient, proc: ChildProcess | undefined): Promise<void> {
    const closed = new Promise<void>((r) => client.onClose(() => r()));
    const q = await client.execute("quit");
    if (q.isErr()) this.opts.logger.warn({ domain, error: qmpErrorMessage(q.error) }, "storage daemon: quit not answered");
    const done = await Promise.race([closed.then(() => true), sleep(STOP_TIMEOUT_MS).then(() => false)]);
    if (!done) {
      this.opts.logger.error({ domain }, "storage daemon did not end after quit: killing it");
      if (proc !== undefined) proc.kill("SIGKILL");
      else this.killByPidFile(domain);
    }
    if (proc !== undefined && proc.exitCode === null && proc.signalCode === null)
      await Promise.race([new Promise<void>((r) => proc.once("exit", () => r())), sleep(STOP_TIMEOUT_MS)]);
    client.close();
    this.removeFiles(domain);
    this.sessions.delete(domain);
    this.opts.logger.info({ domain }, "storage daemon ended");
  }

  /** The pid in the domain's pid file, if that process is a storage daemon of ours (its command line names our socket: not a reused pid). */
  private ourPid(domain: string): number | undefined {
    const { qmp, pid } = this.paths(domain);
    try {
      const n = Number(readFileSync(pid, "utf8").trim());
      if (!Number.isInteger(n) || n <= 1) return undefined;
      return readFileSync(`/proc/${n}/cmdline`, "utf8").includes(qmp) ? n : undefined;
    } catch {
      // no pid file or no such process
      return undefined;
    }
  }

  private killByPidFile(domain: string): void {
    const pid = this.ourPid(domain);
    if (pid !== undefined) process.kill(pid, "SIGKILL");
  }

  /** Kill the domain's storage daemon found by its pid file and wait for it to be gone (a zombie's command line is empty); whether there was one. */
  private async killLeftover(domain: string): Promise<boolean> {
    const pid = this.ourPid(domain);
    if (pid === undefined) return false;
    process.kill(pid, "SIGKILL");
    for (const deadline = Date.now() + STOP_TIMEOUT_MS; this.ourPid(domain) !== undefined && Date.now() < deadline; ) await sleep(20);
    return true;
  }

  private removeFiles(domain: string): void {
    const { qmp, pid } = this.paths(domain);
    rmSync(qmp, { force: true });
    rmSync(pid, { force: true });
  }
}
