/**
 * The job manager: at most one backup per domain. `begin` validates the
 * whole request before touching QEMU (domain connected, not busy, disks,
 * checkpoints valid, paths allowed and free, server sane), then hands a
 * plan to a BackupJob. Keeps the last finished job's info per domain
 * (domjobinfo --completed) and fans job events out to subscribers.
 */
import { randomBytes } from "node:crypto";
import { chown } from "node:fs/promises";
import { join } from "node:path";
import { errAsync, okAsync, ResultAsync } from "neverthrow";
import { withFrozenGuest } from "../agent/quiesce.js";
import { fromAgent, fromQmp } from "../checkpoints/errors.js";
import type { CheckpointManager, PreparedCheckpoint } from "../checkpoints/manager.js";
import { type BackupDef, type BackupDiskDef, backupDefAlign, backupDefParse } from "../conf/backup.js";
import { type CheckpointDef, checkpointDefParse } from "../conf/checkpoint.js";
import type { Logger } from "../log.js";
import { formatVersion } from "../qmp/capabilities.js";
import type { QmpClient } from "../qmp/client.js";
import { type DiskInfo, discoverDisks } from "../qmp/disks.js";
import type { QmpError } from "../qmp/errors.js";
import { iothreadVerdict } from "../qmp/iothread-hazards.js";
import { disksInIothreads, disksWithFuseExports, type IothreadDisk } from "../qmp/iothreads.js";
import { ensureDir, type IoError, ioError } from "../util/atomic-file.js";
import type { BackupError } from "./errors.js";
import { BackupJob, type JobEvent, type JobInfo, type NbdServerPlan } from "./job.js";
import { checkBackupPath, checkSocketPath } from "./paths.js";
import { type DiskPlan, isOwnName, ownNames, type PlanOptions, planDisk } from "./plan.js";
import { freeTcpPort } from "./ports.js";
import { JobStore } from "./record.js";
import { WritebackPump } from "./writeback.js";

/** What the job manager needs of a domain. */
export interface BackupDomain {
  readonly name: string;
  /** The current QMP connection, if any. */
  client(): QmpClient | undefined;
  readonly checkpoints: CheckpointManager;
  readonly agentPath?: string | undefined;
  /** blockdev-backup x-perf available (from the capability probe). */
  readonly backupPerf: boolean;
  /** QEMU's user, when the files we create must be given to it (QEMU runs as another user than the daemon). */
  readonly imageOwner?: { readonly uid: number; readonly gid: number } | undefined;
}

export interface JobManagerOptions {
  readonly logger: Logger;
  /** Generated target/scratch files go to <backupDir>/<domain>/. */
  readonly backupDir: string;
  /** Targets and scratch files must lie under one of these. */
  readonly allowedDirs: readonly string[];
  /** Directory with x509 server credentials for NBD over TLS (ca-cert.pem, server-cert.pem, server-key.pem). */
  readonly tlsDir?: string | undefined;
  /** Allow plain-text NBD on a non-loopback address. */
  readonly allowPlainTcp?: boolean;
  /** Where job records live (<stateDir>/jobs); without it jobs are not persisted. */
  readonly stateDir?: string | undefined;
  /** Writes push targets out (tests pass one with injected failures). */
  readonly writeback?: WritebackPump | undefined;
}

export interface BeginOptions {
  /** Use caller-created target files as they are (libvirt's REUSE_EXTERNAL). */
  readonly reuseExternal?: boolean;
  /** Freeze guest filesystems around the transaction. */
  readonly quiesce?: boolean;
  /** Bytes per second per disk. */
  readonly bandwidth?: number;
  /**
   * Push: false reports ready as soon as the copy is complete, leaving the
   * targets to the kernel's writeback (a host crash soon after can lose them).
   * For targets read and shipped elsewhere at once. Default true.
   */
  readonly durable?: boolean;
}

/** The domain's directory of generated files belongs to QEMU's user when that is not ours (it must create nothing there, but reach the files). */
function giveDir(dir: string, owner: BackupDomain["imageOwner"]): ResultAsync<void, IoError> {
  if (owner === undefined) return okAsync(undefined);
  return ResultAsync.fromPromise(chown(dir, owner.uid, owner.gid), (e) =>
    ioError(`cannot give ${dir} to QEMU's user ${owner.uid}:${owner.gid}`, e),
  );
}

function planOptions(mode: BackupDef["mode"], domain: BackupDomain, opts: BeginOptions): PlanOptions {
  return {
    mode,
    reuse: opts.reuseExternal === true,
    bandwidth: opts.bandwidth,
    backupPerf: domain.backupPerf,
    ...(opts.durable === false ? { nonDurable: true } : {}),
    ...(domain.imageOwner !== undefined ? { imageOwner: { ...domain.imageOwner } } : {}),
  };
}

/**
 * Refuse, before QEMU is touched, a backup step that aborts this QEMU
 * version with a disk in an iothread, as tried on that version
 * (qmp/iothread-hazards.ts). A push counts disks a FUSE export serves
 * separately: 7.2 runs the push but the export's next write aborts.
 */
function refuseIothreadHazards(client: QmpClient, mode: BackupDef["mode"], disks: readonly DiskInfo[]): ResultAsync<void, BackupError> {
  const v = client.version.qemu;
  const plain = iothreadVerdict(v, mode);
  const fuse = iothreadVerdict(v, "push-with-fuse-export");
  if (plain.safe && (mode === "pull" || fuse.safe)) return okAsync(undefined);
  const fused = mode === "push" && plain.safe ? disksWithFuseExports(client, disks) : okAsync<DiskInfo[], QmpError>([...disks]);
  const reason = mode === "push" && plain.safe ? fuse.reason : plain.reason;
  return fused
    .andThen((c) => (c.length === 0 ? okAsync<IothreadDisk[], QmpError>([]) : disksInIothreads(client, c)))
    .mapErr((e): BackupError => fromQmp("cannot tell which disks run in iothreads", e))
    .andThen((found) => {
      if (found.length === 0) return okAsync<void, BackupError>(undefined);
      const which = found.map((d) => `'${d.disk}' (${d.iothread ?? "maybe: QEMU has iothreads and this device does not say"})`);
      const advice = mode === "pull" && iothreadVerdict(v, "push").safe ? " Use a push backup." : "";
      return errAsync<void, BackupError>({
        code: "unsupported",
        message: `${mode} backups of disks in an iothread are refused on QEMU ${formatVersion(v)}: ${reason}. In an iothread: ${which.join(", ")}.${advice}`,
      });
    });
}

const LOOPBACK = new Set(["localhost", "127.0.0.1", "::1", "ip6-localhost"]);

export class JobManager {
  private readonly active = new Map<string, BackupJob>();
  /** Domains whose begin is under way (validation is async: reserve the slot first). */
  private readonly beginning = new Set<string>();
  private readonly completed = new Map<string, JobInfo>();
  private readonly subscribers = new Set<(e: JobEvent) => void>();
  private readonly log: Logger;

  private readonly store: JobStore | undefined;
  /** One for all jobs: it bounds how many fdatasync calls occupy the thread pool. */
  private readonly writeback: WritebackPump;

  constructor(private readonly opts: JobManagerOptions) {
    this.log = opts.logger;
    this.writeback = opts.writeback ?? new WritebackPump();
    this.store = opts.stateDir === undefined ? undefined : new JobStore(join(opts.stateDir, "jobs"));
  }

  private forget(job: BackupJob): void {
    const d = job.info().domain;
    if (this.active.get(d) === job) this.active.delete(d);
  }

  /**
   * On every (re)connect of a domain: adopt the job its record describes, or
   * remove what a crashed daemon left in QEMU without a record.
   */
  async recover(domain: BackupDomain): Promise<void> {
    const client = domain.client();
    if (client === undefined || this.store === undefined) return;
    if (!this.completed.has(domain.name)) {
      const c = await this.store.loadCompleted(domain.name);
      if (c !== undefined) this.completed.set(domain.name, c);
    }
    if (this.active.get(domain.name)?.active) return;
    const rec = await this.store.load(domain.name);
    if (rec.isErr()) {
      this.log.error({ domain: domain.name, error: rec.error.message }, "cannot read the job record; leaving QEMU as it is");
      return;
    }
    if (rec.value === undefined) {
      await this.cleanLeftovers(domain.name, client, new Set());
      return;
    }
    const r = rec.value;
    const job = new BackupJob({
      id: r.id,
      domain: domain.name,
      client,
      checkpoints: domain.checkpoints,
      def: r.def,
      plans: r.plans,
      planOpts: r.planOpts,
      checkpoint: r.checkpoint,
      nbd: r.nbd,
      logger: this.log,
      emit: (e) => this.emit(e),
      runTransaction: (tx) => tx(),
      store: this.store,
      onDetached: (j) => this.forget(j),
      writeback: this.writeback,
    });
    job.restoreFrom(r);
    this.active.set(domain.name, job);
    await job.adopt();
    // anything else named like ours is older debris
    const claimed = new Set(job.active ? r.plans.flatMap((p) => [p.jobId, p.targetNode, ...(p.export ? [p.export.id] : [])]) : []);
    await this.cleanLeftovers(domain.name, client, claimed);
  }

  /**
   * Nodes, jobs and exports named like this domain's but claimed by no job
   * record: a crash mid-begin without a record, or older leftovers. Another
   * domain's (another registration of the same QEMU) carry another tag.
   */
  private async cleanLeftovers(domain: string, client: QmpClient, claimed: ReadonlySet<string>): Promise<void> {
    const cleaned: string[] = [];
    const jobs = await client.execute("query-jobs");
    for (const j of jobs.isOk() ? jobs.value : []) {
      if (!isOwnName(j.id, domain) || claimed.has(j.id)) continue;
      if (j.status !== "concluded") {
        const l = client.listen(["JOB_STATUS_CHANGE"], (e) => e.data.id === j.id && e.data.status === "concluded");
        await client.execute("job-cancel", { id: j.id });
        await l.next(10_000);
        l.close();
      }
      await client.execute("job-dismiss", { id: j.id });
      cleaned.push(`job ${j.id}`);
    }
    const exports = await client.execute("query-block-exports");
    for (const e of exports.isOk() ? exports.value : []) {
      if (!isOwnName(e.id, domain) || claimed.has(e.id)) continue;
      await client.execute("block-export-del", { id: e.id, mode: "hard" });
      cleaned.push(`export ${e.id}`);
    }
    const nodes = await client.execute("query-named-block-nodes", { flat: true });
    for (const n of nodes.isOk() ? nodes.value : []) {
      const name = n["node-name"];
      if (name === undefined || !isOwnName(name, domain) || claimed.has(name)) continue;
      const r = await client.execute("blockdev-del", { "node-name": name });
      if (r.isOk()) cleaned.push(`node ${name}`);
    }
    if (cleaned.length > 0) this.log.warn({ domain, cleaned }, "removed leftovers of an interrupted backup");
  }

  subscribe(fn: (e: JobEvent) => void): () => void {
    this.subscribers.add(fn);
    return () => this.subscribers.delete(fn);
  }

  private emit(e: JobEvent): void {
    if (!e.info.active) this.completed.set(e.info.domain, e.info);
    if (e.type === "ended" && this.active.get(e.info.domain)?.info().id === e.info.id) this.active.delete(e.info.domain);
    for (const fn of this.subscribers) {
      try {
        fn(e);
      } catch (err) {
        this.log.error({ err }, "job event subscriber threw");
      }
    }
  }

  /** Daemon shutdown: stop following every job without touching QEMU. */
  detachAll(): void {
    for (const j of this.active.values()) j.detach();
  }

  job(domain: string): BackupJob | undefined {
    return this.active.get(domain);
  }

  /** The running job's info; with `completed`, the last finished job's. */
  info(domain: string, opts: { completed?: boolean } = {}): ResultAsync<JobInfo, BackupError> {
    if (opts.completed) {
      const c = this.completed.get(domain);
      return c === undefined ? errAsync({ code: "no-job", message: `no finished backup job on domain '${domain}'` }) : okAsync(c);
    }
    const j = this.active.get(domain);
    if (j === undefined) return errAsync({ code: "no-job", message: `no backup job is running on domain '${domain}'` });
    return j.refreshProgress();
  }

  xml(domain: string): ResultAsync<string, BackupError> {
    const j = this.active.get(domain);
    return j === undefined ? errAsync({ code: "no-job", message: `no backup job is running on domain '${domain}'` }) : okAsync(j.xml());
  }

  /** End a pull backup, or abort a push (virDomainAbortJob). */
  end(domain: string): ResultAsync<JobInfo, BackupError> {
    const j = this.active.get(domain);
    if (j === undefined) return errAsync({ code: "no-job", message: `no backup job is running on domain '${domain}'` });
    return ResultAsync.fromSafePromise(j.end());
  }

  /** Change the running job's bandwidth limit (bytes/s per disk; 0 = unlimited). */
  setBandwidth(domain: string, bytesPerSecond: number): ResultAsync<void, BackupError> {
    const j = this.active.get(domain);
    if (j === undefined) return errAsync({ code: "no-job", message: `no backup job is running on domain '${domain}'` });
    return j.setBandwidth(bytesPerSecond);
  }

  /** Wait until the running job is ready (push: complete), failed or cancelled. */
  wait(domain: string, timeoutMs?: number): ResultAsync<JobInfo, BackupError> {
    const j = this.active.get(domain);
    if (j === undefined) {
      const c = this.completed.get(domain);
      return c === undefined ? errAsync({ code: "no-job", message: `no backup job on domain '${domain}'` }) : okAsync(c);
    }
    const settled = j.settled();
    if (timeoutMs === undefined) return ResultAsync.fromSafePromise(settled);
    return ResultAsync.fromSafePromise(
      Promise.race([settled, new Promise<undefined>((r) => setTimeout(() => r(undefined), timeoutMs).unref())]),
    ).andThen((x) =>
      x === undefined
        ? errAsync<JobInfo, BackupError>({ code: "timeout", message: `the backup on '${domain}' did not settle within ${timeoutMs} ms` })
        : okAsync(x),
    );
  }

  /** virDomainBackupBegin. */
  begin(
    domain: BackupDomain,
    backupXml: string | undefined,
    checkpointXml: string | undefined,
    opts: BeginOptions = {},
  ): ResultAsync<JobInfo, BackupError> {
    if (this.active.has(domain.name) || this.beginning.has(domain.name)) {
      return errAsync({ code: "busy", message: `a backup job is already running on domain '${domain.name}'` });
    }
    const client = domain.client();
    if (client === undefined || client.runstate !== "running") {
      return errAsync({ code: "not-connected", message: `domain '${domain.name}' is not connected to QEMU` });
    }
    this.beginning.add(domain.name);
    const release = () => this.beginning.delete(domain.name);
    const r = this.prepare(domain, client, backupXml, checkpointXml, opts).andThen((job) => {
      this.active.set(domain.name, job);
      release();
      return job.begin().orElse((e) => {
        this.active.delete(domain.name);
        return errAsync(e);
      });
    });
    return new ResultAsync(
      (async () => {
        const x = await r;
        release();
        return x;
      })(),
    );
  }

  private prepare(
    domain: BackupDomain,
    client: QmpClient,
    backupXml: string | undefined,
    checkpointXml: string | undefined,
    opts: BeginOptions,
  ): ResultAsync<BackupJob, BackupError> {
    const parsed =
      backupXml === undefined || backupXml.trim() === ""
        ? okAsync<BackupDef, BackupError>({ mode: "push" })
        : backupDefParse(backupXml).asyncAndThen((d) => okAsync(d));
    const cpDef: ResultAsync<CheckpointDef | undefined, BackupError> =
      checkpointXml === undefined || checkpointXml.trim() === ""
        ? okAsync(undefined)
        : checkpointDefParse(checkpointXml).asyncAndThen((d) => okAsync(d));
    const id = randomBytes(4).toString("hex");
    const stamp = new Date().toISOString().replace(/[-:]/g, "").replace(/\..*$/, "");
    const domainDir = join(this.opts.backupDir, domain.name);
    return parsed.andThen((def) => {
      const planOpts = planOptions(def.mode, domain, opts);
      return cpDef.andThen((cp) =>
        ensureDir(domainDir)
          .andThen(() => giveDir(domainDir, domain.imageOwner))
          .andThen(() =>
            discoverDisks(client)
              .mapErr((e): BackupError => ({ code: "qmp", message: `cannot list disks of '${domain.name}'`, cause: e }))
              .andThen((disks) => {
                const suffix = def.mode === "push" ? "qcow2" : "scratch.qcow2";
                const aligned = backupDefAlign(
                  def,
                  disks.map((d) => d.name),
                  { defaultFile: (disk) => join(domainDir, `${disk}.${stamp}.${id}.${suffix}`) },
                );
                if (aligned.isErr()) return errAsync<BackupJob, BackupError>(aligned.error);
                return this.validate(domain, client, id, aligned.value, disks, planOpts).andThen((plans) =>
                  (cp === undefined
                    ? okAsync<PreparedCheckpoint | undefined, BackupError>(undefined)
                    : domain.checkpoints.prepare(cp, disks)
                  ).andThen((prepared) =>
                    this.serverPlan(domain, aligned.value).map((nbd) =>
                      this.build(domain, client, id, aligned.value, plans, prepared, nbd, planOpts, opts),
                    ),
                  ),
                );
              }),
          ),
      );
    });
  }

  private validate(
    domain: BackupDomain,
    client: QmpClient,
    jobId: string,
    def: BackupDef,
    disks: readonly DiskInfo[],
    planOpts: PlanOptions,
  ): ResultAsync<DiskPlan[], BackupError> {
    const selected = (def.disks ?? []).filter((d): d is BackupDiskDef => d.backup);
    for (const d of selected) {
      if (d.store?.extra.some((x) => x.name === "encryption"))
        return errAsync({ code: "unsupported", message: `disk '${d.name}': encrypted backup images are not supported` });
      if (d.type === "block")
        return errAsync({ code: "unsupported", message: `disk '${d.name}': block device targets are not supported; use a file` });
    }
    if (def.server?.transport === "fd")
      return errAsync({ code: "unsupported", message: "NBD over a passed file descriptor (transport='fd') is not supported" });
    // every checkpoint an incremental starts from is checked against QEMU now
    const cpNames = [...new Set(selected.map((d) => d.incremental).filter((x): x is string => x !== undefined))];
    const checks = cpNames.map((n) => domain.checkpoints.requireValid(client, n));
    const sources = selected.map((d) => disks.find((x) => x.name === d.name)!);
    const iothreadsOk = refuseIothreadHazards(client, def.mode, sources);
    return iothreadsOk
      .andThen(() => ResultAsync.combine(checks))
      .andThen((cps) => {
        const checkpoints = new Map(cps.map((c) => [c.name, c]));
        const pathChecks = selected.map((d) =>
          checkBackupPath(
            d.store!.file!,
            this.opts.allowedDirs,
            planOpts.reuse,
            def.mode === "push" ? `target of disk '${d.name}'` : `scratch of disk '${d.name}'`,
            planOpts.imageOwner,
          ),
        );
        return ResultAsync.combine(pathChecks).andThen((paths) => {
          const plans: DiskPlan[] = [];
          const seen = new Set<string>();
          for (const [i, d] of selected.entries()) {
            const p = paths[i]!;
            if (seen.has(p.path))
              return errAsync<never, BackupError>({ code: "path-refused", message: `two disks would write to ${p.path}` });
            seen.add(p.path);
            const source = disks.find((x) => x.name === d.name)!;
            if (d.backupmode === "incremental" && source.format !== "qcow2") {
              return errAsync<never, BackupError>({
                code: "unsupported-disk",
                message: `disk '${d.name}' is ${source.format}: incremental backups need qcow2 bitmaps`,
              });
            }
            const withPath: BackupDiskDef = { ...d, store: { ...d.store!, file: p.path } };
            const plan = planDisk(ownNames(i, domain.name, jobId), withPath, source, checkpoints, planOpts, p.exists);
            if (typeof plan === "string") return errAsync<never, BackupError>({ code: "xml-invalid", message: plan });
            plans.push(plan);
          }
          return okAsync(plans);
        });
      });
  }

  private serverPlan(domain: BackupDomain, def: BackupDef): ResultAsync<NbdServerPlan | undefined, BackupError> {
    if (def.mode !== "pull") return okAsync(undefined);
    const s = def.server ?? { transport: "tcp" as const, name: "localhost" };
    const tlsCreds = s.tls ? this.tlsCreds(domain) : undefined;
    if (s.tls && tlsCreds === undefined)
      return errAsync({ code: "unsupported", message: "tls='yes' needs an x509 credentials directory (tlsDir) in the configuration" });
    if (s.transport === "unix") {
      return checkSocketPath(s.socket, this.opts.allowedDirs, domain.imageOwner).map(
        (path): NbdServerPlan => ({ addr: { type: "unix", data: { path } }, tlsCreds, uri: `nbd+unix:///?socket=${path}` }),
      );
    }
    if (s.transport !== "tcp") return errAsync({ code: "unsupported", message: "unsupported NBD transport" });
    if (!LOOPBACK.has(s.name) && !s.tls && !this.opts.allowPlainTcp) {
      return errAsync({
        code: "path-refused",
        message: `NBD on ${s.name} (not loopback) without TLS is refused; use tls='yes' or allow plain TCP in the configuration`,
      });
    }
    if (!LOOPBACK.has(s.name) && !s.tls)
      this.log.warn({ domain: domain.name, host: s.name }, "serving NBD in plain text on a non-loopback address, as configured");
    const port =
      s.port !== undefined
        ? okAsync(s.port)
        : ResultAsync.fromPromise(
            freeTcpPort(s.name),
            (e): BackupError => ({ code: "unsupported", message: `no free TCP port on ${s.name}: ${(e as Error).message}` }),
          );
    return port.map((p) => ({
      addr: { type: "inet" as const, data: { host: s.name, port: String(p) } },
      tlsCreds,
      uri: `nbd://${s.name}:${p}`,
    }));
  }

  private tlsCreds(domain: BackupDomain): NbdServerPlan["tlsCreds"] {
    return this.opts.tlsDir === undefined ? undefined : { id: `qbk-tls-${domain.name}`.slice(0, 60), dir: this.opts.tlsDir };
  }

  private build(
    domain: BackupDomain,
    client: QmpClient,
    id: string,
    def: BackupDef,
    plans: DiskPlan[],
    checkpoint: PreparedCheckpoint | undefined,
    nbd: NbdServerPlan | undefined,
    planOpts: PlanOptions,
    opts: BeginOptions,
  ): BackupJob {
    // what backup-dumpxml shows: every default filled in (libvirt fills these at job start)
    const filled: BackupDef = {
      ...def,
      ...(nbd !== undefined && def.server?.transport !== "unix"
        ? {
            server: {
              transport: "tcp",
              name: (nbd.addr as { data: { host: string } }).data.host,
              port: Number((nbd.addr as { data: { port: string } }).data.port),
              ...(def.server?.tls ? { tls: true } : {}),
            },
          }
        : {}),
      disks: (def.disks ?? []).map((d) => {
        const p = plans.find((x) => x.disk === d.name);
        if (p === undefined) return d;
        return {
          ...d,
          ...(def.mode === "pull" ? { exportname: p.export!.name, ...(p.export!.bitmap ? { exportbitmap: p.export!.bitmap } : {}) } : {}),
          driver: p.format,
          store: { ...d.store!, file: p.file },
        };
      }),
    };
    const log = this.log;
    return new BackupJob({
      id,
      domain: domain.name,
      client,
      checkpoints: domain.checkpoints,
      def: filled,
      plans,
      planOpts,
      checkpoint,
      nbd,
      logger: log,
      emit: (e) => this.emit(e),
      store: this.store,
      onDetached: (j) => this.forget(j),
      writeback: this.writeback,
      runTransaction: (tx) =>
        opts.quiesce
          ? withFrozenGuest(domain.agentPath, log, tx).mapErr(
              (e): BackupError => (e.stage === "freeze" ? fromAgent("cannot quiesce the guest", e.error) : e.error),
            )
          : tx(),
    });
  }
}
