/**
 * One backup job on one domain: begin → inprogress → ready, or failed /
 * cancelled. Begin builds everything first (files, nodes), then starts every
 * disk's job in one transaction, then (pull) serves the exports; each step
 * sets a flag, and teardown undoes exactly what the flags say happened
 * (libvirt's qemuBackupBegin habit). The disks are one unit: when one disk's
 * job fails the others are cancelled and the whole backup fails, and a
 * checkpoint created with it is removed.
 *
 * Driven by QEMU's JOB_STATUS_CHANGE events; `query-jobs` is the truth about
 * a job's outcome (auto-dismiss is off, so a concluded job stays readable
 * until we dismiss it).
 */

import { existsSync } from "node:fs";
import { err, errAsync, okAsync, ResultAsync } from "neverthrow";
import type { CheckpointManager, PreparedCheckpoint } from "../checkpoints/manager.js";
import { type BackupDef, backupDefFormat } from "../conf/backup.js";
import type { Logger } from "../log.js";
import type { QmpClient } from "../qmp/client.js";
import { qmpErrorMessage } from "../qmp/errors.js";
import type { EventListener } from "../qmp/events.js";
import { crashPoint } from "../util/crash-point.js";
import { stillListening } from "../util/listening.js";
import type { BackupError } from "./errors.js";
import { imageCreate, imageRemove } from "./images.js";
import { backupTransaction, type DiskPlan, exportArgs, type PlanOptions, targetBlockdev } from "./plan.js";
import type { JobRecord, JobStore } from "./record.js";
import type { WritebackPump } from "./writeback.js";

export type JobState = "begin" | "inprogress" | "ready" | "failed" | "cancelled";
export type DiskJobState = "begin" | "running" | "complete" | "failed" | "cancelled";

export interface DiskProgress {
  readonly name: string;
  readonly state: DiskJobState;
  readonly bytesDone: number;
  readonly bytesTotal: number;
  readonly file: string;
  readonly exportName?: string | undefined;
  readonly exportBitmap?: string | undefined;
  readonly error?: string | undefined;
}

export interface JobInfo {
  readonly id: string;
  readonly domain: string;
  readonly mode: BackupDef["mode"];
  readonly state: JobState;
  /** True until torn down (a ready pull stays active until ended). */
  readonly active: boolean;
  readonly incremental: string | undefined;
  readonly checkpoint: string | undefined;
  readonly startedAt: string;
  readonly endedAt: string | undefined;
  readonly elapsedMs: number;
  readonly bytesDone: number;
  readonly bytesTotal: number;
  /** Bytes per second over the job so far. */
  readonly rate: number;
  readonly error: string | undefined;
  readonly nbd: string | undefined;
  /** Push: ready means written out to disk (false: ready once copied). */
  readonly durable: boolean | undefined;
  readonly disks: readonly DiskProgress[];
}

export type JobEventType = "started" | "progress" | "ready" | "failed" | "cancelled" | "ended";
export interface JobEvent {
  readonly type: JobEventType;
  readonly info: JobInfo;
}

export interface JobContext {
  readonly id: string;
  readonly domain: string;
  readonly client: QmpClient;
  readonly checkpoints: CheckpointManager;
  readonly def: BackupDef;
  readonly plans: readonly DiskPlan[];
  readonly planOpts: PlanOptions;
  readonly checkpoint: PreparedCheckpoint | undefined;
  readonly nbd: NbdServerPlan | undefined;
  /** Runs the transaction, with the guest frozen when asked. */
  readonly runTransaction: (tx: () => ResultAsync<void, BackupError>) => ResultAsync<void, BackupError>;
  readonly logger: Logger;
  readonly emit: (e: JobEvent) => void;
  /** Durable job record (undefined: not persisted, as in unit tests). */
  readonly store?: JobStore | undefined;
  /** The QMP connection dropped but QEMU still runs: the manager forgets this instance and adopts the job again at reconnect. */
  readonly onDetached?: ((job: BackupJob) => void) | undefined;
  /** Writes push targets out while they are copied, and at the end. */
  readonly writeback: WritebackPump;
}

export interface NbdServerPlan {
  readonly addr: { type: "unix"; data: { path: string } } | { type: "inet"; data: { host: string; port: string } };
  readonly tlsCreds?: { readonly id: string; readonly dir: string } | undefined;
  /** For display: nbd+unix:///?socket=… or nbd://host:port */
  readonly uri: string;
}

export interface JobFlags {
  txDone: boolean;
  tempBitmapsAdded: boolean;
  checkpointCommitted: boolean;
  nbdStarted: boolean;
  tlsAdded: boolean;
}

export interface DiskRuntime {
  readonly plan: DiskPlan;
  state: DiskJobState;
  fileCreated: boolean;
  nodeAdded: boolean;
  jobStarted: boolean;
  jobDismissed: boolean;
  exportAdded: boolean;
  bytesDone: number;
  bytesTotal: number;
  error: string | undefined;
}

const fail = (message: string): BackupError => ({ code: "job-failed", message });

export class BackupJob {
  private stateValue: JobState = "begin";
  private activeValue = true;
  private readonly disks: DiskRuntime[];
  private started: number = Date.now();
  private endedAt: number | undefined;
  private errorText: string | undefined;
  /** What has happened in QEMU, job-wide; teardown undoes exactly these. */
  private f: JobFlags = { txDone: false, tempBitmapsAdded: false, checkpointCommitted: false, nbdStarted: false, tlsAdded: false };
  private listener: EventListener<"JOB_STATUS_CHANGE"> | undefined;
  private others: EventListener<"BLOCK_EXPORT_DELETED" | "BLOCK_JOB_ERROR"> | undefined;
  private finishing: Promise<void> | undefined;
  private readonly waiters: (() => void)[] = [];
  /** Set when the daemon shuts down: QEMU keeps running the job; nothing is torn down. */
  private detached = false;
  private readonly log: Logger;
  /** Stops the background writeback of each target; each tells the first write error it saw. */
  private writebackStops: (() => Promise<string | undefined>)[] = [];

  constructor(private readonly ctx: JobContext) {
    this.log = ctx.logger.child({ domain: ctx.domain, job: ctx.id });
    this.disks = ctx.plans.map((plan) => ({
      plan,
      state: "begin",
      fileCreated: false,
      nodeAdded: false,
      jobStarted: false,
      jobDismissed: false,
      exportAdded: false,
      bytesDone: 0,
      bytesTotal: plan.virtualSize,
      error: undefined,
    }));
  }

  get state(): JobState {
    return this.stateValue;
  }

  get active(): boolean {
    return this.activeValue;
  }

  get mode(): BackupDef["mode"] {
    return this.ctx.def.mode;
  }

  /** The backup XML with every default filled in (backup-dumpxml). */
  xml(): string {
    return backupDefFormat(this.ctx.def);
  }

  info(): JobInfo {
    const now = this.endedAt ?? Date.now();
    const bytesDone = this.disks.reduce((a, d) => a + d.bytesDone, 0);
    const bytesTotal = this.disks.reduce((a, d) => a + d.bytesTotal, 0);
    const elapsedMs = now - this.started;
    const incs = [...new Set(this.disks.map((d) => d.plan.incremental?.checkpoint).filter((x) => x !== undefined))];
    return {
      id: this.ctx.id,
      domain: this.ctx.domain,
      mode: this.ctx.def.mode,
      state: this.stateValue,
      active: this.activeValue,
      incremental: incs.length === 0 ? undefined : incs.join(","),
      checkpoint: this.ctx.checkpoint?.def.name,
      startedAt: new Date(this.started).toISOString(),
      endedAt: this.endedAt === undefined ? undefined : new Date(this.endedAt).toISOString(),
      elapsedMs,
      bytesDone,
      bytesTotal,
      rate: elapsedMs > 0 ? Math.round((bytesDone * 1000) / elapsedMs) : 0,
      error: this.errorText,
      nbd: this.ctx.nbd?.uri,
      durable: this.ctx.def.mode === "push" ? this.ctx.planOpts.nonDurable !== true : undefined,
      disks: this.disks.map((d) => ({
        name: d.plan.disk,
        state: d.state,
        bytesDone: d.bytesDone,
        bytesTotal: d.bytesTotal,
        file: d.plan.file,
        exportName: d.plan.export?.name,
        exportBitmap: d.plan.export?.bitmap,
        error: d.error,
      })),
    };
  }

  /** Refresh per-disk progress from query-jobs (for domjobinfo and progress events). */
  refreshProgress(): ResultAsync<JobInfo, BackupError> {
    if (this.stateValue !== "inprogress") return okAsync(this.info());
    return this.ctx.client
      .execute("query-jobs")
      .map((jobs) => {
        for (const d of this.disks) {
          const j = jobs.find((x) => x.id === d.plan.jobId);
          if (j !== undefined && d.state === "running") {
            d.bytesDone = j["current-progress"];
            d.bytesTotal = j["total-progress"] || d.bytesTotal;
          }
        }
        return this.info();
      })
      .orElse(() => okAsync(this.info()));
  }

  /** Resolves when the job reaches ready (push: complete), failed or cancelled. */
  settled(): Promise<JobInfo> {
    if (this.stateValue === "ready" || this.stateValue === "failed" || this.stateValue === "cancelled") {
      return Promise.resolve(this.info());
    }
    return new Promise((r) => this.waiters.push(() => r(this.info())));
  }

  private setState(s: JobState, event: JobEventType): void {
    this.stateValue = s;
    if (this.activeValue) void this.persist();
    this.log.info({ state: s }, `backup ${event}`);
    this.ctx.emit({ type: event, info: this.info() });
    if (s === "ready" || s === "failed" || s === "cancelled") for (const w of this.waiters.splice(0)) w();
  }

  // ---------------------------------------------------------------- persistence

  record(): JobRecord {
    return {
      version: 1,
      id: this.ctx.id,
      domain: this.ctx.domain,
      startedAt: this.started,
      state: this.stateValue,
      error: this.errorText,
      def: this.ctx.def,
      plans: this.ctx.plans,
      planOpts: this.ctx.planOpts,
      checkpoint: this.ctx.checkpoint,
      nbd: this.ctx.nbd,
      flags: { ...this.f },
      disks: this.disks.map((d) => ({
        state: d.state,
        fileCreated: d.fileCreated,
        nodeAdded: d.nodeAdded,
        jobStarted: d.jobStarted,
        jobDismissed: d.jobDismissed,
        exportAdded: d.exportAdded,
        bytesDone: d.bytesDone,
        bytesTotal: d.bytesTotal,
        error: d.error,
      })),
    };
  }

  private persistChain: Promise<unknown> = Promise.resolve();

  /**
   * Write the job record (in order; each write atomic). Fails only when the
   * record cannot be made durable. `crashAfter` names the crash point reached
   * once it is written.
   */
  private persist(crashAfter?: string): ResultAsync<void, BackupError> {
    const store = this.ctx.store;
    if (store === undefined || this.detached) return okAsync(undefined);
    const rec = this.record();
    const p = this.persistChain.then(() => store.save(rec));
    this.persistChain = p;
    return new ResultAsync(p)
      .map(() => {
        if (crashAfter !== undefined) crashPoint(crashAfter);
      })
      .mapErr((e): BackupError => {
        this.log.error({ error: e.message }, "cannot persist the job record");
        return e;
      });
  }

  /** Restore runtime flags from a record (adoption after a daemon restart). */
  restoreFrom(rec: JobRecord): void {
    this.f = { ...rec.flags };
    this.stateValue = rec.state;
    this.errorText = rec.error;
    this.started = rec.startedAt;
    for (const [i, d] of this.disks.entries()) {
      const r = rec.disks[i];
      if (r === undefined) continue;
      Object.assign(d, { ...r });
    }
  }

  // ---------------------------------------------------------------- adoption

  /**
   * After a daemon restart or a reconnect: match the record with what QEMU
   * has now, record outcomes reached while we were away, and follow the job
   * again — or finish it: a job caught mid-begin, or whose QEMU jobs are gone
   * (QEMU restarted), fails and is cleaned up.
   */
  async adopt(): Promise<void> {
    const c = this.ctx.client;
    const [jobs, nodes, exports] = await Promise.all([
      c.execute("query-jobs"),
      c.execute("query-named-block-nodes", { flat: true }),
      c.execute("query-block-exports"),
    ]);
    if (jobs.isErr() || nodes.isErr() || exports.isErr()) {
      this.log.error("cannot read QEMU's state to adopt the job; retrying at the next connect");
      this.detach();
      this.ctx.onDetached?.(this);
      return;
    }
    const byId = new Map(jobs.value.map((j) => [j.id, j]));
    const nodeNames = new Set(nodes.value.map((n) => n["node-name"]));
    const exportIds = new Set(exports.value.map((e) => e.id));
    const startedBegin = this.stateValue === "begin";
    let vanished: string | undefined;
    for (const d of this.disks) {
      d.nodeAdded = nodeNames.has(d.plan.targetNode);
      d.exportAdded = d.plan.export !== undefined && exportIds.has(d.plan.export.id);
      const j = byId.get(d.plan.jobId);
      d.jobStarted = j !== undefined;
      d.jobDismissed = j === undefined;
      // paths were checked free and created with O_EXCL: whatever is there now is ours
      if (startedBegin && d.plan.createFile) d.fileCreated = existsSync(d.plan.file);
      if (j === undefined && d.state === "running") vanished ??= `disk '${d.plan.disk}': its QEMU job is gone (QEMU restarted?)`;
      if (this.ctx.def.mode === "pull" && d.state === "running" && !d.exportAdded)
        vanished ??= `disk '${d.plan.disk}': its NBD export is gone`;
    }
    const temp = new Set(nodes.value.flatMap((n) => (n["dirty-bitmaps"] ?? []).map((b) => `${n["node-name"]}/${b.name}`)));
    this.f.tempBitmapsAdded = this.disks.some((d) => d.plan.tempBitmap !== undefined && temp.has(`${d.plan.node}/${d.plan.tempBitmap}`));
    this.f.txDone = this.f.txDone || this.disks.some((d) => d.jobStarted);
    this.listen(c);
    this.log.warn({ state: this.stateValue }, "adopting the backup job after a restart");
    if (startedBegin || vanished !== undefined) {
      this.errorText = startedBegin ? "the daemon stopped while the backup was starting" : vanished;
      this.finishing = this.teardown("failed");
      await this.finishing;
      return;
    }
    for (const d of this.disks) {
      const j = byId.get(d.plan.jobId);
      if (j?.status === "concluded" && d.state === "running") await this.onConcluded(d);
    }
    // outcomes recorded before the crash whose teardown had not run yet
    if (this.finishing === undefined && this.disks.some((d) => d.state === "failed")) this.finishing = this.teardown("failed");
    if (this.finishing === undefined && this.ctx.def.mode === "push" && this.disks.every((d) => d.state === "complete")) {
      this.finishing = this.teardown("ready");
    }
    if (this.finishing !== undefined) {
      await this.finishing;
      return;
    }
    void this.watch();
    void this.watchOthers();
    if (this.ctx.def.mode === "push") this.startCopying();
    void this.persist();
  }

  // ---------------------------------------------------------------- begin

  begin(): ResultAsync<JobInfo, BackupError> {
    const { client, def } = this.ctx;
    this.listen(client);
    // the record goes to disk before each step acts, so a crash anywhere leaves a trail to clean up
    // (the names are crash points for the tests: record written, step not yet taken)
    const steps = this.persist("begin:files")
      .andThen(() => this.createFiles())
      .andThen(() => this.persist("begin:nodes"))
      .andThen(() => this.addNodes())
      .andThen(() => this.persist("begin:transaction"))
      .andThen(() => this.ctx.runTransaction(() => this.transaction()))
      .andThen(() => this.persist("begin:checkpoint"))
      .andThen(() => this.commitCheckpoint())
      .andThen(() => this.persist("begin:exports"))
      .andThen(() => (def.mode === "pull" ? this.startExports() : okAsync(undefined)));
    return new ResultAsync(
      (async () => {
        const r = await steps;
        if (r.isErr()) {
          this.errorText = r.error.message;
          await this.teardown("failed");
          return r.map(() => this.info());
        }
        for (const d of this.disks) d.state = "running";
        void this.watch();
        void this.watchOthers();
        if (def.mode === "push") this.startCopying();
        if (def.mode === "pull") {
          this.setState("inprogress", "started");
          this.setState("ready", "ready");
        } else {
          this.setState("inprogress", "started");
        }
        // what begin answers must be on disk first: a kill -9 right after the answer
        // must find a record of a started job (adopted on restart), not one mid-begin
        const saved = await this.persist("begin:answered");
        if (saved.isErr()) {
          this.errorText = `the started backup could not be recorded: ${saved.error.message}`;
          await this.teardown("failed");
          return err(saved.error);
        }
        return r.map(() => this.info());
      })(),
    );
  }

  /** All disks at once; settles only when every one has (so teardown sees every flag it must undo). */
  private static allSettled(rs: ResultAsync<void, BackupError>[]): ResultAsync<void, BackupError> {
    return ResultAsync.combineWithAllErrors(rs)
      .map(() => undefined)
      .mapErr((errors) => errors[0]!);
  }

  private createFiles(): ResultAsync<void, BackupError> {
    const todo = this.disks.filter((d) => d.plan.createFile);
    return BackupJob.allSettled(
      todo.map((d) =>
        imageCreate(this.ctx.client, {
          path: d.plan.file,
          format: d.plan.format,
          size: d.plan.virtualSize,
          clusterSize: d.plan.clusterSize,
          jobId: d.plan.createJobId,
          owner: this.ctx.planOpts.imageOwner,
        }).map(() => {
          d.fileCreated = true;
        }),
      ),
    );
  }

  /** Pipelined: QEMU answers in order, and a failure of one still lets the others settle first. */
  private addNodes(): ResultAsync<void, BackupError> {
    return BackupJob.allSettled(
      this.disks.map((d) =>
        this.ctx.client
          .execute("blockdev-add", targetBlockdev(d.plan, this.ctx.def.mode))
          .map(() => {
            d.nodeAdded = true;
          })
          .mapErr((e) => fail(`cannot open ${d.plan.file} for disk '${d.plan.disk}': ${qmpErrorMessage(e)}`)),
      ),
    );
  }

  private transaction(): ResultAsync<void, BackupError> {
    const actions = backupTransaction(this.ctx.plans, this.ctx.checkpoint?.actions ?? [], this.ctx.planOpts);
    return this.ctx.client
      .execute("transaction", { actions })
      .map(() => {
        this.f.txDone = true;
        this.f.tempBitmapsAdded = true;
        for (const d of this.disks) d.jobStarted = true;
      })
      .mapErr((e) => fail(`cannot start the backup: ${qmpErrorMessage(e)}`));
  }

  private commitCheckpoint(): ResultAsync<void, BackupError> {
    const cp = this.ctx.checkpoint;
    if (cp === undefined) return okAsync(undefined);
    return this.ctx.checkpoints
      .commit(cp.def)
      .map(() => {
        this.f.checkpointCommitted = true;
      })
      .orElse((e) =>
        // metadata could not be written: the bitmaps must not outlive the backup
        this.ctx.checkpoints
          .discard(this.ctx.client, cp)
          .orElse(() => okAsync(undefined))
          .andThen(() => errAsync(e)),
      );
  }

  private startExports(): ResultAsync<void, BackupError> {
    const nbd = this.ctx.nbd!;
    const c = this.ctx.client;
    const tls: ResultAsync<void, BackupError> =
      nbd.tlsCreds === undefined
        ? okAsync(undefined)
        : c
            .execute("object-add", {
              "qom-type": "tls-creds-x509",
              id: nbd.tlsCreds.id,
              dir: nbd.tlsCreds.dir,
              endpoint: "server",
              "verify-peer": false,
            })
            .map(() => {
              this.f.tlsAdded = true;
            })
            .mapErr((e) => fail(`cannot load TLS credentials: ${qmpErrorMessage(e)}`));
    let chain = tls.andThen(() =>
      c
        .execute("nbd-server-start", { addr: nbd.addr, ...(nbd.tlsCreds ? { "tls-creds": nbd.tlsCreds.id } : {}) })
        .map(() => {
          this.f.nbdStarted = true;
        })
        .mapErr((e) => fail(`cannot start the NBD server at ${nbd.uri}: ${qmpErrorMessage(e)}`)),
    );
    for (const d of this.disks) {
      chain = chain.andThen(() =>
        c
          .execute("block-export-add", exportArgs(d.plan))
          .map(() => {
            d.exportAdded = true;
          })
          .mapErr((e) => fail(`cannot export disk '${d.plan.disk}': ${qmpErrorMessage(e)}`)),
      );
    }
    return chain;
  }

  // ---------------------------------------------------------------- run

  /** Register for our jobs' and exports' events before anything can cause them. */
  private listen(c: QmpClient): void {
    const mine = (id: string) => this.disks.some((d) => d.plan.jobId === id || d.plan.export?.id === id);
    this.listener = c.listen(["JOB_STATUS_CHANGE"], (e) => mine(e.data.id));
    this.others = c.listen(["BLOCK_EXPORT_DELETED", "BLOCK_JOB_ERROR"], (e) =>
      mine(e.name === "BLOCK_JOB_ERROR" ? e.data.device : e.data.id),
    );
    this.offClose = c.onClose((info) => this.onDisconnect(info.message));
  }

  /** Unregisters the close handler (a connection outlives many jobs). */
  private offClose: () => void = () => {};

  /** Export removals we did not ask for fail a pull; job I/O errors are logged (the job's conclusion decides). */
  private async watchOthers(): Promise<void> {
    const l = this.others!;
    for (;;) {
      const e = await l.next();
      if (e === undefined || this.detached) return;
      if (e.name === "BLOCK_JOB_ERROR") {
        this.log.warn({ job: e.data.device, operation: e.data.operation, action: e.data.action }, "I/O error in a disk's backup job");
        continue;
      }
      const d = this.disks.find((x) => x.plan.export?.id === e.data.id);
      if (d === undefined || !d.exportAdded || this.finishing !== undefined) continue;
      d.exportAdded = false;
      d.state = "failed";
      d.error = "its NBD export was removed behind the daemon's back";
      this.errorText = `disk '${d.plan.disk}': ${d.error}`;
      this.finishing = this.teardown("failed");
      return;
    }
  }

  /** A push runs: progress events, and its targets written out as they fill. */
  private startCopying(): void {
    this.startProgressTimer();
    const pump = this.ctx.writeback;
    if (this.ctx.planOpts.nonDurable !== true) this.writebackStops = this.disks.map((d) => pump.add(d.plan.file));
  }

  /** Progress events once a second while a push runs (from query-jobs). */
  private startProgressTimer(): void {
    const timer = setInterval(() => {
      if (this.stateValue !== "inprogress" || this.finishing !== undefined) {
        clearInterval(timer);
        return;
      }
      void this.refreshProgress().map((info) => this.ctx.emit({ type: "progress", info }));
    }, 1000);
    timer.unref();
  }

  /** Change the bandwidth limit of every running disk job (bytes/s, 0 = unlimited). */
  setBandwidth(bytesPerSecond: number): ResultAsync<void, BackupError> {
    const running = this.disks.filter((d) => d.state === "running" && d.jobStarted);
    return ResultAsync.combine(
      running.map((d) =>
        this.ctx.client
          .execute("block-job-set-speed", { device: d.plan.jobId, speed: bytesPerSecond })
          .mapErr((e) => fail(`cannot set the bandwidth of disk '${d.plan.disk}': ${qmpErrorMessage(e)}`)),
      ),
    ).map(() => undefined);
  }

  private async watch(): Promise<void> {
    const l = this.listener!;
    for (;;) {
      const e = await l.next();
      // once teardown runs, it owns the jobs (cancelled jobs conclude too)
      if (e === undefined || this.detached || this.finishing !== undefined) return;
      if (e.data.status !== "concluded") continue;
      const d = this.disks.find((x) => x.plan.jobId === e.data.id);
      if (d === undefined || d.state !== "running") continue;
      await this.onConcluded(d);
      if (this.finishing !== undefined) return;
    }
  }

  private async onConcluded(d: DiskRuntime): Promise<void> {
    const jobs = await this.ctx.client.execute("query-jobs");
    const j = jobs.isOk() ? jobs.value.find((x) => x.id === d.plan.jobId) : undefined;
    if (j === undefined) {
      d.state = "failed";
      d.error = "job vanished from QEMU";
    } else if (j.error !== undefined) {
      d.state = "failed";
      d.error = j.error;
      d.bytesDone = j["current-progress"];
    } else {
      d.state = "complete";
      d.bytesDone = j["total-progress"];
      d.bytesTotal = j["total-progress"];
    }
    // record the outcome before dismissing: once dismissed, QEMU no longer knows it
    await this.persist("concluded:dismiss");
    const dismissed = await this.ctx.client.execute("job-dismiss", { id: d.plan.jobId });
    if (dismissed.isOk()) d.jobDismissed = true;
    if (d.state === "failed") {
      this.errorText ??= `disk '${d.plan.disk}': ${d.error}`;
      this.log.error({ disk: d.plan.disk, error: d.error }, "disk backup job failed; failing the whole backup");
      this.finishing ??= this.teardown("failed");
      return;
    }
    if (this.ctx.def.mode === "push" && this.disks.every((x) => x.state === "complete")) {
      this.finishing ??= this.teardown("ready");
    }
  }

  /** The daemon is stopping: leave QEMU's jobs, nodes and exports as they are (the next start adopts or cleans them). */
  detach(): void {
    this.detached = true;
    for (const stop of this.writebackStops.splice(0)) void stop();
    this.listener?.close();
    this.others?.close();
  }

  private onDisconnect(reason: string): void {
    if (!this.activeValue || this.detached) return;
    // a dead QEMU leaves its QMP socket refusing connections (asked more than once: see stillListening)
    void stillListening(this.ctx.client.address).then((alive) => {
      if (this.detached || !this.activeValue) return;
      if (alive && this.ctx.store !== undefined) {
        this.log.warn({ reason }, "QMP connection lost but QEMU still runs; the job is adopted again at reconnect");
        this.detach();
        this.ctx.onDetached?.(this);
        return;
      }
      this.failOnQemuGone(reason);
    });
  }

  private failOnQemuGone(reason: string): void {
    this.errorText = `QEMU went away: ${reason}`;
    // Nothing more can be asked of QEMU; what lives in QEMU died with it or is found at the next start.
    for (const d of this.disks) {
      d.nodeAdded = false;
      d.jobStarted = false;
      d.exportAdded = false;
      if (d.state === "running" || d.state === "begin") d.state = "failed";
    }
    this.f.nbdStarted = false;
    this.f.tlsAdded = false;
    this.f.tempBitmapsAdded = false;
    this.finishing ??= this.teardown("failed");
  }

  /** Pull: the caller is done; push: abort. */
  end(): Promise<JobInfo> {
    if (this.finishing === undefined) {
      if (this.ctx.def.mode === "pull" && this.stateValue === "ready") this.finishing = this.teardown("ready");
      else {
        this.errorText ??= "aborted by request";
        this.finishing = this.teardown("cancelled");
      }
    }
    return this.finishing.then(() => this.info());
  }

  // ---------------------------------------------------------------- teardown

  /**
   * Undo what the flags say happened, in reverse order. Best effort: each
   * step runs even when an earlier one failed, and failures are logged.
   */
  private async teardown(requested: "ready" | "failed" | "cancelled"): Promise<void> {
    let outcome = requested;
    const c = this.ctx.client;
    const step = async (what: string, r: ResultAsync<unknown, unknown>): Promise<string | undefined> => {
      const x = await r;
      if (x.isOk()) return undefined;
      const e = x.error as { code?: string; desc?: string; message?: string };
      const text = e.desc ?? e.message ?? e.code;
      this.log.warn({ step: what, error: text }, "teardown step failed");
      return text;
    };
    const pushReady = outcome === "ready" && this.ctx.def.mode === "push";
    const durable = pushReady && this.ctx.planOpts.nonDurable !== true;
    // a backup that did not succeed does not wait for a sync in flight (its files go anyway)
    const stopping = Promise.all(this.writebackStops.splice(0).map((stop) => stop()));
    const writebackErrors = pushReady ? await stopping : [];
    const connected = c.runstate === "running";
    if (connected) {
      for (const d of this.disks)
        if (d.exportAdded) await step("block-export-del", c.execute("block-export-del", { id: d.plan.export!.id, mode: "hard" }));
      if (this.f.nbdStarted) await step("nbd-server-stop", c.execute("nbd-server-stop"));
      if (this.f.tlsAdded) await step("object-del", c.execute("object-del", { id: this.ctx.nbd!.tlsCreds!.id }));
      await this.cancelJobs();
      for (const d of this.disks) {
        if (!d.nodeAdded) continue;
        // closing a target writes its qcow2 metadata out: until then the copy is not whole
        const error = await step("blockdev-del", c.execute("blockdev-del", { "node-name": d.plan.targetNode }));
        if (error === undefined) d.nodeAdded = false;
        else if (pushReady) this.errorText ??= `disk '${d.plan.disk}': cannot close the target: ${error}`;
      }
      if (this.f.tempBitmapsAdded) {
        for (const d of this.disks) {
          if (d.plan.tempBitmap !== undefined && d.plan.incremental !== undefined) {
            await step("bitmap-remove", c.execute("block-dirty-bitmap-remove", { node: d.plan.node, name: d.plan.tempBitmap }));
          }
        }
      }
    }
    this.listener?.close();
    this.others?.close();
    this.offClose();
    if (durable) {
      // Ready means on disk: the targets are written out (and their directory entries) before anyone is told.
      const i = writebackErrors.findIndex((e) => e !== undefined);
      if (i >= 0)
        this.errorText ??= `disk '${this.disks[i]!.plan.disk}': writing ${this.disks[i]!.plan.file} out failed: ${writebackErrors[i]}`;
      crashPoint("ready:sync");
      if (this.errorText === undefined) this.errorText = await this.ctx.writeback.syncFiles(this.disks.map((d) => d.plan.file));
    }
    if (pushReady && this.errorText !== undefined) {
      outcome = "failed";
      for (const d of this.disks) d.state = "failed";
      this.log.error({ error: this.errorText }, "the backup copy is complete but cannot be closed or made durable");
    }
    // Scratch files always go; targets only when the backup did not succeed.
    const removeFiles = this.ctx.def.mode === "pull" || outcome !== "ready";
    if (removeFiles) for (const d of this.disks) if (d.fileCreated) await imageRemove(d.plan.file);
    // A checkpoint created with a push that did not complete must not claim a backup exists.
    if (this.ctx.checkpoint !== undefined && outcome !== "ready") {
      if (this.f.checkpointCommitted) {
        await step(
          "checkpoint-delete",
          this.ctx.checkpoints.delete(connected ? c : undefined, this.ctx.checkpoint.def.name, { metadataOnly: !connected }),
        );
      } else if (this.f.txDone && connected) {
        await step("checkpoint-discard", this.ctx.checkpoints.discard(c, this.ctx.checkpoint));
      }
    }
    for (const d of this.disks) {
      if (d.state === "running" || d.state === "begin")
        d.state = outcome === "cancelled" ? "cancelled" : outcome === "ready" ? "complete" : "failed";
    }
    this.endedAt = Date.now();
    this.activeValue = false;
    if (this.ctx.store !== undefined && !this.detached) {
      await this.persistChain.catch(() => {});
      const store = this.ctx.store;
      crashPoint(`${outcome}:record`);
      await store.saveCompleted({ ...this.info(), active: false, state: outcome });
      await store.remove(this.ctx.domain);
    }
    const event: JobEventType = outcome === "ready" ? "ready" : outcome;
    if (outcome !== this.stateValue) this.setState(outcome, event);
    this.ctx.emit({ type: "ended", info: this.info() });
    if (outcome === "failed") this.log.error({ error: this.errorText }, "backup failed");
  }

  /** Cancel jobs still running and dismiss every concluded job of ours. */
  private async cancelJobs(): Promise<void> {
    const c = this.ctx.client;
    const mine = this.disks.filter((d) => d.jobStarted && !d.jobDismissed);
    if (mine.length === 0) return;
    const concluded = c.listen(["JOB_STATUS_CHANGE"], (e) => e.data.status === "concluded" && mine.some((d) => d.plan.jobId === e.data.id));
    const jobs = await c.execute("query-jobs");
    const live = jobs.isOk() ? jobs.value.filter((j) => mine.some((d) => d.plan.jobId === j.id)) : [];
    const waiting = new Set(live.filter((j) => j.status !== "concluded").map((j) => j.id));
    for (const id of waiting) {
      const r = await c.execute("job-cancel", { id });
      if (r.isErr()) this.log.warn({ job: id, error: qmpErrorMessage(r.error) }, "job-cancel failed");
      const d = mine.find((x) => x.plan.jobId === id);
      if (d !== undefined && d.state === "running") d.state = "cancelled";
    }
    const deadline = Date.now() + 30_000;
    while (waiting.size > 0 && Date.now() < deadline) {
      const e = await concluded.next(deadline - Date.now());
      if (e === undefined) break;
      waiting.delete(e.data.id);
    }
    concluded.close();
    for (const j of live) {
      const r = await c.execute("job-dismiss", { id: j.id });
      if (r.isOk()) {
        const d = mine.find((x) => x.plan.jobId === j.id);
        if (d !== undefined) d.jobDismissed = true;
      }
    }
  }
}
