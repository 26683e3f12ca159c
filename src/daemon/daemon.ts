/**
 * The running service: domain registry, job manager, metrics and the API
 * server on its unix socket, wired together; start, reload (SIGHUP) and stop
 * (SIGTERM). It holds its state directory's lock (state-lock.ts) from before
 * it reads anything there until it stops, and must never touch the
 * directory without it.
 */
import { execFileSync } from "node:child_process";
import { chmodSync, chownSync, existsSync, mkdirSync, readFileSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { errAsync, ResultAsync } from "neverthrow";
import { type ApiServer, buildApi } from "../api/server.js";
import { type DaemonConfig, parseOwner } from "../conf/config.js";
import { JobManager } from "../jobs/manager.js";
import { allowedDirsUntrusted } from "../jobs/paths.js";
import type { Logger } from "../log.js";
import { SetService } from "../sets/service.js";
import { listening } from "../util/listening.js";
import { type Domain, type DomainEvent, DomainRegistry } from "./domains.js";
import { Metrics } from "./metrics.js";
import { OfflineRunner } from "./offline.js";
import { StateLock } from "./state-lock.js";

function packageVersion(): string {
  try {
    const p = JSON.parse(readFileSync(join(import.meta.dirname, "..", "..", "package.json"), "utf8")) as { version?: string };
    return p.version ?? "unknown";
  } catch {
    return "unknown";
  }
}

/** A socket file nobody listens on is a leftover of an earlier run; one that answers means another daemon runs. */
async function socketFree(path: string): Promise<void> {
  if (!existsSync(path)) return;
  if (await listening({ path })) throw new Error(`another process is serving ${path}`);
  rmSync(path, { force: true });
}

function groupId(group: string): number {
  if (/^\d+$/.test(group)) return Number(group);
  const line = execFileSync("getent", ["group", group], { encoding: "utf8" });
  return Number(line.split(":")[2]);
}

export class Daemon {
  private readonly domainListeners = new Set<(e: DomainEvent) => void>();
  readonly domains: DomainRegistry;
  readonly jobs: JobManager;
  readonly metrics: Metrics;
  readonly offline: OfflineRunner;
  readonly sets: SetService;
  private api: ApiServer | undefined;

  private constructor(
    private config: DaemonConfig,
    private readonly log: Logger,
    private readonly lock: StateLock,
  ) {
    this.domains = new DomainRegistry(
      config.stateDir,
      log,
      (e) => {
        for (const fn of this.domainListeners) fn(e);
      },
      (d) => this.jobs.recover(d),
    );
    this.metrics = new Metrics({ stateDir: config.stateDir, logger: log, version: packageVersion() });
    this.jobs = new JobManager({
      stateDir: config.stateDir,
      logger: log,
      backupDir: config.backupDir,
      allowedDirs: config.allowDirs,
      tlsDir: config.tlsDir,
      allowPlainTcp: config.allowPlainTcp,
    });
    this.jobs.subscribe((e) => this.metrics.onJobEvent(e));
    this.offline = new OfflineRunner({ stateDir: config.stateDir, logger: log, jobs: this.jobs });
    this.sets = this.setService(config, log);
  }

  /** Backup sets run their backups and checkpoint deletions as the API's routes do: online, or offline through a storage daemon. */
  private setService(config: DaemonConfig, log: Logger): SetService {
    const domainOf = (name: string) => this.domains.get(name);
    const offlineFor = (d: Domain) => (d.client() === undefined && d.state === "offline" ? this.offline : undefined);
    return new SetService({
      logger: log,
      stateDir: config.stateDir,
      allowedDirs: config.allowDirs,
      domain: domainOf,
      qemuUsers: () => this.domains.list().flatMap((d) => (d.imageOwner !== undefined ? [d.imageOwner] : [])),
      begin: (sd, bx, cx, opts) => {
        const d = domainOf(sd.name);
        if (d === undefined) return errAsync({ code: "not-connected", message: `no domain named '${sd.name}'` });
        const off = offlineFor(d);
        return off === undefined ? this.jobs.begin(d, bx, cx, opts) : off.begin(d, bx, cx, opts);
      },
      activeJob: async (name) => {
        await this.jobs.recovered(name);
        return this.jobs.job(name)?.info();
      },
      completedJob: async (name) => {
        const r = await this.jobs.info(name, { completed: true });
        return r.isOk() ? r.value : undefined;
      },
      subscribe: (fn) => this.jobs.subscribe(fn),
      deleteCheckpoint: (sd, name) => {
        const d = domainOf(sd.name);
        if (d === undefined) return errAsync({ code: "not-connected", message: `no domain named '${sd.name}'` });
        return ResultAsync.fromSafePromise(this.jobs.recovered(d.name)).andThen(() => {
          if (this.jobs.busy(d.name)) return errAsync({ code: "busy" as const, message: `a backup is running on '${d.name}'` });
          const off = offlineFor(d);
          if (d.client() === undefined && off === undefined)
            return errAsync({ code: "not-connected" as const, message: `domain '${d.name}' is not connected to QEMU` });
          return off === undefined
            ? d.checkpoints.delete(d.client(), name, {})
            : off.withSession(d, (c) => d.checkpoints.delete(c, name, {}));
        });
      },
    });
  }

  static async start(config: DaemonConfig, log: Logger): Promise<Daemon> {
    mkdirSync(config.stateDir, { recursive: true, mode: 0o700 });
    chmodSync(config.stateDir, 0o700);
    // before anything in the state directory is read or written: one daemon per directory
    const lock = await StateLock.acquire(config.stateDir);
    if (lock.isErr()) throw new Error(lock.error.message);
    let d: Daemon | undefined;
    try {
      // refused before any domain connects: a daemon that cannot serve must not touch QEMU
      await socketFree(config.socket);
      mkdirSync(config.backupDir, { recursive: true, mode: 0o700 });
      d = new Daemon(config, log, lock.value);
      const daemon = d;
      for (const dc of config.domains) {
        const r = await daemon.domains.add(dc, "config");
        if (r.isErr()) log.error({ domain: dc.name, error: r.error.message }, "cannot add configured domain");
      }
      await daemon.domains.load();
      // storage daemons of offline backups a killed daemon left: their jobs adopted, or they are ended
      for (const dom of daemon.domains.list()) await daemon.offline.adoptLeftover(dom);
      if (config.allowPlainTcp) log.warn("plain-text NBD on non-loopback addresses is allowed by the configuration");
      const qemuUsers = config.domains.flatMap((dc) => (dc.qemuUser !== undefined ? [parseOwner(dc.qemuUser)] : []));
      for (const u of await allowedDirsUntrusted(config.allowDirs, qemuUsers))
        log.warn(
          { dir: u.dir, reason: u.reason },
          "allowed directory that others than root, the daemon and QEMU can change: backups there are refused",
        );
      await daemon.sets.start();
      await daemon.listen();
      return daemon;
    } catch (e) {
      // whoever starts next finds the directory free and no QEMU connection of ours left
      await d?.domains.stopAll();
      lock.value.release();
      throw e;
    }
  }

  get socketPath(): string {
    return this.config.socket;
  }

  private async listen(): Promise<void> {
    const path = this.config.socket;
    mkdirSync(dirname(path), { recursive: true, mode: 0o755 });
    // again: another daemon (on another state directory) may have bound it since start() looked
    await socketFree(path);
    const api = buildApi({
      domains: this.domains,
      jobs: this.jobs,
      metrics: this.metrics,
      logger: this.log,
      maxBodyBytes: this.config.maxBodyBytes,
      onDomainEvent: (fn) => {
        this.domainListeners.add(fn);
        return () => this.domainListeners.delete(fn);
      },
      version: packageVersion(),
      offline: this.offline,
      sets: this.sets,
    });
    // created with umask 0177 so the socket is never briefly world-accessible
    const old = process.umask(0o177);
    try {
      await api.listen({ path });
    } finally {
      process.umask(old);
    }
    chmodSync(path, this.config.socketMode);
    if (this.config.socketGroup !== undefined) chownSync(path, process.getuid?.() ?? 0, groupId(this.config.socketGroup));
    api.server.maxConnections = this.config.maxConnections;
    this.api = api;
    const kept = this.domains.kept().length;
    this.log.info({ socket: path, domains: this.domains.list().length, ...(kept > 0 ? { notLoaded: kept } : {}) }, "qbackupd listening");
    if (kept > 0)
      this.log.warn({ entries: kept }, "domains.json has entries not loaded (logged above); they are kept in the file as they are");
  }

  /** SIGHUP: add domains new to the configuration, drop those removed from it (unless a backup runs). */
  async reload(config: DaemonConfig): Promise<void> {
    const wanted = new Map(config.domains.map((d) => [d.name, d]));
    for (const d of this.domains.list()) {
      if (d.origin !== "config") continue;
      const w = wanted.get(d.name);
      if (w !== undefined && w.qmp === d.config.qmp && w.agent === d.config.agent) continue;
      if (this.jobs.job(d.name)?.active) {
        this.log.warn({ domain: d.name }, "reload: domain changed but a backup runs; keeping it as is");
        wanted.delete(d.name);
        continue;
      }
      await this.domains.remove(d.name);
    }
    for (const dc of wanted.values()) {
      if (this.domains.get(dc.name) !== undefined) continue;
      const r = await this.domains.add(dc, "config");
      if (r.isErr()) this.log.error({ domain: dc.name, error: r.error.message }, "reload: cannot add domain");
    }
    this.config = { ...this.config, domains: config.domains };
    this.log.info({ domains: this.domains.list().length }, "configuration reloaded");
  }

  /** SIGTERM: stop accepting requests, leave QEMU's jobs running, close connections. */
  async stop(): Promise<void> {
    this.jobs.detachAll();
    await this.sets.stop();
    await this.api?.close();
    await this.domains.stopAll();
    // the last outcomes are on disk before the next daemon may take the directory
    await this.metrics.flushed();
    rmSync(this.config.socket, { force: true });
    this.lock.release();
    this.log.info("qbackupd stopped");
  }
}
