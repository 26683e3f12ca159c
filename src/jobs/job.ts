/**
 * One backup job on one domain. Its phase (transitions.ts) changes only in
 * `transition()`, checked against the table; what exists in QEMU is in the
 * per-disk and job-wide flags (model.ts). Begin runs the steps of
 * begin-steps.ts in order, writing the record before each acts and checking
 * between steps whether an abort was asked for; an abort during begin only
 * marks the job, and begin itself then runs the undo. Every end — success,
 * failure, abort, a begin that failed — goes through `finish()`, which runs
 * at most once: undo in QEMU until QEMU confirms (undo.ts), then the files,
 * the checkpoint and the record (finish steps below).
 *
 * Driven by QEMU's JOB_STATUS_CHANGE events; `query-jobs` is the truth about
 * a job's outcome (auto-dismiss is off, so a concluded job stays readable
 * until we dismiss it).
 *
 * What this class must never do: unlink a file QEMU may still have open
 * (files go only after undo saw their nodes gone, or QEMU is dead), answer
 * "cancelled" or "ready" before that answer is true and recorded, or change
 * its phase outside transition().
 */
import { existsSync } from "node:fs";
import { setTimeout as sleep } from "node:timers/promises";
import { err, errAsync, ok, okAsync, type Result, ResultAsync } from "neverthrow";
import { backupDefFormat } from "../conf/backup.js";
import type { Logger } from "../log.js";
import type { QmpClient } from "../qmp/client.js";
import { qmpErrorMessage } from "../qmp/errors.js";
import type { EventListener } from "../qmp/events.js";
import type { JobInfo } from "../qmp/qapi.js";
import { crashPoint } from "../util/crash-point.js";
import { stillListening } from "../util/listening.js";
import { backupCommitCheckpoint, backupDiskAddNodes, backupDiskCreateFiles, backupStartExports, backupStartJobs } from "./begin-steps.js";
import type { BackupError } from "./errors.js";
import { finishRemoveFiles, finishRollBackCheckpoint, finishWriteOut } from "./finish.js";
import {
  type BackupJobInfo,
  type BeginStep,
  type DiskRuntime,
  type JobContext,
  type JobEventType,
  type JobFlags,
  type JobOutcome,
  type JobState,
  newDiskRuntime,
} from "./model.js";
import { type DiskPlan, isOwnName } from "./plan.js";
import { readQemuState } from "./qemu-state.js";
import { reconcileRecord } from "./reconcile.js";
import type { JobRecord } from "./record.js";
import { checkTransition, type JobPhase, reportedState } from "./transitions.js";
import { undoInQemu } from "./undo.js";

export type { BackupJobInfo, JobEvent, JobState, NbdServerPlan } from "./model.js";

/** QEMU's refusal of a command to a job that no longer runs (concluded and waiting to be dismissed, or gone). */
const JOB_ENDED = /in state '(concluded|null|pending|waiting|aborting)'|not found|cannot find/i;

/**
 * A disk's total as the progress bar and domjobinfo may show it: QEMU's
 * total-progress once it is final, else what was known before (0: not
 * known yet). A `top` copy (a full backup of an image without a backing
 * file) first scans the image for allocated clusters, and meanwhile QEMU's
 * total shrinks from the virtual size to the allocated size (block/backup.c
 * backup_run, before backup_loop); once anything has been copied the scan is
 * over (a guest write copied before the scan ends can show a total early). Other
 * modes set their total once, when the job starts.
 */
export function progressTotal(
  plan: Pick<DiskPlan, "sync">,
  job: Pick<JobInfo, "current-progress" | "total-progress">,
  known: number,
): number {
  if (plan.sync === "top" && job["current-progress"] === 0) return known;
  return job["total-progress"] || known;
}

const aborted = (): BackupError => ({ code: "aborted", message: "the backup was aborted by request while it was starting" });

export class BackupJob {
  private phaseValue: JobPhase;
  private stateValue: JobState = "begin";
  private outcome: JobOutcome | undefined;
  private abortRequested = false;
  /** QEMU is known dead: nothing in it is left to undo. */
  private qemuGone = false;
  private readonly disks: DiskRuntime[];
  private started: number = Date.now();
  private endedAt: number | undefined;
  private errorText: string | undefined;
  private step: BeginStep | undefined;
  /** What has happened in QEMU, job-wide; undo removes what QEMU still has of it. */
  private f: JobFlags = { txDone: false, tempBitmapsAdded: false, checkpointCommitted: false, nbdStarted: false, tlsAdded: false };
  private listener: EventListener<"JOB_STATUS_CHANGE"> | undefined;
  private others: EventListener<"BLOCK_EXPORT_DELETED" | "BLOCK_JOB_ERROR"> | undefined;
  private finishing: Promise<void> | undefined;
  /** Settles when the job leaves for good (ended or detached). */
  private readonly gone: Promise<void>;
  private resolveGone: () => void = () => {};
  private readonly waiters: (() => void)[] = [];
  private readonly log: Logger;
  /** Stops the background writeback of each target; each tells the first write error it saw. */
  private writebackStops: (() => Promise<string | undefined>)[] = [];
  private persistChain: Promise<unknown> = Promise.resolve();
  /** Unregisters the close handler (a connection outlives many jobs). */
  private offClose: () => void = () => {};

  constructor(
    private readonly ctx: JobContext,
    phase: "begin" | "adopting" = "begin",
  ) {
    this.phaseValue = phase;
    this.log = ctx.logger.child({ domain: ctx.domain, job: ctx.id });
    this.disks = ctx.plans.map(newDiskRuntime);
    this.gone = new Promise((r) => {
      this.resolveGone = r;
    });
  }

  get phase(): JobPhase {
    return this.phaseValue;
  }

  get state(): JobState {
    return this.stateValue;
  }

  /** Followed by this instance and not yet torn down (a ready pull stays active until ended). */
  get active(): boolean {
    return this.phaseValue !== "ended" && this.phaseValue !== "detached";
  }

  get mode(): JobContext["def"]["mode"] {
    return this.ctx.def.mode;
  }

  /** The backup XML with every default filled in (backup-dumpxml). */
  xml(): string {
    return backupDefFormat(this.ctx.def);
  }

  /**
   * The one place a job's phase changes. The reported state follows the
   * phase (transitions.ts); waiters and events hear of it here.
   */
  private transition(to: JobPhase): void {
    const from = this.phaseValue;
    checkTransition(from, to);
    this.phaseValue = to;
    const before = this.stateValue;
    this.stateValue = reportedState(to, before, this.outcome);
    this.log.debug({ from, to, state: this.stateValue }, "backup job transition");
    if (to === "detached") {
      for (const stop of this.writebackStops.splice(0)) void stop();
      this.closeListeners();
      this.resolveGone();
      return;
    }
    if (this.stateValue !== before || to === "ended") this.announce(before);
    if (to === "ended") this.resolveGone();
  }

  private announce(before: JobState): void {
    const s = this.stateValue;
    if (s !== before) {
      if (s === "inprogress") this.emit("started");
      else if (s === "ready" && this.ctx.def.mode === "pull" && this.phaseValue === "serving") {
        if (before === "begin") this.emit("started");
        this.emit("ready");
      } else if (s === "ready" || s === "failed" || s === "cancelled") this.emit(s);
      this.log.info({ state: s }, `backup ${s}`);
    }
    if (s === "ready" || s === "failed" || s === "cancelled") for (const w of this.waiters.splice(0)) w();
    if (this.phaseValue === "ended") {
      this.emit("ended");
      if (s === "failed") this.log.error({ error: this.errorText }, "backup failed");
    }
  }

  private emit(type: JobEventType): void {
    this.ctx.emit({ type, info: this.info() });
  }

  info(): BackupJobInfo {
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
      active: this.phaseValue !== "ended",
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
  refreshProgress(): ResultAsync<BackupJobInfo, BackupError> {
    if (this.phaseValue !== "running") return okAsync(this.info());
    return this.ctx.client
      .execute("query-jobs")
      .map((jobs) => {
        for (const d of this.disks) {
          const j = jobs.find((x) => x.id === d.plan.jobId);
          if (j !== undefined && d.state === "running") {
            d.bytesDone = j["current-progress"];
            d.bytesTotal = progressTotal(d.plan, j, d.bytesTotal);
          }
        }
        return this.info();
      })
      .orElse(() => okAsync(this.info()));
  }

  /** Resolves when the job reaches ready (push: complete), failed or cancelled — or the daemon stops following it. */
  settled(): Promise<BackupJobInfo> {
    const s = this.stateValue;
    if (s === "ready" || s === "failed" || s === "cancelled" || this.phaseValue === "detached") return Promise.resolve(this.info());
    return new Promise((r) => {
      this.waiters.push(() => r(this.info()));
      void this.gone.then(() => r(this.info()));
    });
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
      ...(this.step !== undefined ? { step: this.step } : {}),
      ...(this.outcome !== undefined ? { outcome: this.outcome } : {}),
    };
  }

  /**
   * Write the job record (in order; each write atomic). Fails only when the
   * record cannot be made durable. `crashAfter` names the crash point reached
   * once it is written.
   */
  private persist(crashAfter?: string): ResultAsync<void, BackupError> {
    const store = this.ctx.store;
    if (store === undefined || this.phaseValue === "detached") return okAsync(undefined);
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

  /** Restore runtime state from a record (adoption after a daemon restart). */
  restoreFrom(rec: JobRecord): void {
    this.f = { ...rec.flags };
    this.stateValue = rec.state;
    this.errorText = rec.error;
    this.started = rec.startedAt;
    this.step = rec.step;
    this.outcome = rec.outcome;
    for (const [i, d] of this.disks.entries()) {
      const r = rec.disks[i];
      if (r !== undefined) Object.assign(d, { ...r });
    }
  }

  // ---------------------------------------------------------------- adoption

  /**
   * After a daemon restart or a reconnect: reconcile the record with what
   * QEMU and the checkpoint store have now (reconcile.ts), then follow the
   * job again or finish it.
   */
  async adopt(): Promise<void> {
    const c = this.ctx.client;
    this.listen(c);
    let q = await readQemuState(c);
    // no answer is no conclusion: while the connection stays up there is no "next connect" to leave the job to
    for (let wait = 100; q.isErr() && c.runstate === "running" && this.phaseValue === "adopting"; wait = Math.min(2000, wait * 2)) {
      this.log.warn({ error: qmpErrorMessage(q.error) }, "cannot read QEMU's state to adopt the job yet; trying again");
      await sleep(wait);
      q = await readQemuState(c);
    }
    // the daemon may have stopped following the job meanwhile (detached): nothing here is ours to do
    if (this.phaseValue !== "adopting") return;
    if (q.isErr()) {
      this.log.error("the QMP connection went away while adopting the job; retrying at the next connect");
      this.detach();
      return;
    }
    const inBegin = this.stateValue === "begin";
    const r = reconcileRecord(this.record(), q.value, {
      checkpointInStore: this.ctx.checkpoint !== undefined && this.ctx.checkpoints.store.get(this.ctx.checkpoint.def.name) !== undefined,
      fileExists: this.disks.map((d) => inBegin && d.plan.createFile && existsSync(d.plan.file)),
      isOwn: (name) => isOwnName(name, this.ctx.domain),
    });
    this.f = { ...r.flags };
    for (const [i, d] of this.disks.entries()) Object.assign(d, { ...r.disks[i]! });
    this.log.warn({ state: this.stateValue, decision: r.decision.kind }, "adopting the backup job after a restart");
    if (r.decision.kind === "finish") {
      // an abort asked for while adoption read QEMU cancels a begin the crash interrupted; a recorded outcome stays
      const cancel = this.abortRequested && this.outcome === undefined && inBegin;
      this.errorText ??= cancel ? "aborted by request" : r.decision.reason;
      await this.finish(cancel ? "cancelled" : r.decision.outcome);
      return;
    }
    if (this.abortRequested) {
      await this.endAdopted();
      return;
    }
    for (const d of this.disks) {
      const j = q.value.jobs.find((x) => x.id === d.plan.jobId);
      if (j?.status === "concluded" && d.state === "running") await this.onConcluded(d);
    }
    // outcomes recorded before the crash whose finish had not run yet
    if (this.finishing === undefined && this.disks.some((d) => d.state === "failed")) void this.finish("failed");
    if (this.finishing === undefined && this.ctx.def.mode === "push" && this.disks.every((d) => d.state === "complete"))
      void this.finish("ready");
    if (this.finishing !== undefined) {
      await this.finishing;
      return;
    }
    if (this.phaseValue !== "adopting") return;
    if (this.abortRequested) {
      await this.endAdopted();
      return;
    }
    this.transition(this.ctx.def.mode === "pull" ? "serving" : "running");
    void this.watch();
    void this.watchOthers();
    if (this.ctx.def.mode === "push") this.startCopying();
    void this.persist();
  }

  /** An end asked for while adopting, once the flags come from QEMU: a pull is done, a push aborted. */
  private endAdopted(): Promise<void> {
    if (this.ctx.def.mode === "pull") return this.finish("ready");
    this.errorText ??= "aborted by request";
    return this.finish("cancelled");
  }

  // ---------------------------------------------------------------- begin

  /**
   * The steps in order, each recorded before it acts. Between steps: an
   * abort asked for meanwhile stops the chain (and the undo runs here, once);
   * a daemon that is stopping leaves the rest to the next start's recovery.
   */
  begin(): ResultAsync<BackupJobInfo, BackupError> {
    const { client, def } = this.ctx;
    this.listen(client);
    const steps: [BeginStep, () => ResultAsync<void, BackupError>][] = [
      ["files", () => backupDiskCreateFiles(this.ctx, this.disks)],
      ["nodes", () => backupDiskAddNodes(this.ctx, this.disks)],
      ["transaction", () => this.ctx.runTransaction(() => backupStartJobs(this.ctx, this.disks, this.f))],
      ["checkpoint", () => backupCommitCheckpoint(this.ctx, this.f)],
      ["exports", () => (def.mode === "pull" ? backupStartExports(this.ctx, this.disks, this.f) : okAsync(undefined))],
    ];
    return new ResultAsync(
      (async (): Promise<Result<BackupJobInfo, BackupError>> => {
        for (const [name, run] of steps) {
          const stop = this.beginInterrupted();
          if (stop !== undefined) return this.beginFailed(stop);
          this.step = name;
          // the record goes to disk before each step acts, so a crash anywhere leaves a trail to clean up
          // (the names are crash points for the tests: record written, step not yet taken)
          const saved = await this.persist(`begin:${name}`);
          if (saved.isErr()) return this.beginFailed(saved.error);
          const r = await run();
          if (r.isErr()) return this.beginFailed(r.error);
          // step done, not yet recorded: what recovery must find out from QEMU and the store
          crashPoint(`begin:${name}:done`);
        }
        if (def.mode === "pull") await this.sizeExports();
        // no await from this check to the transition: an abort that came during an await is seen here, else it
        // would wait on a job that goes on serving (a hang seen in abort-race when it came during sizeExports)
        const stop = this.beginInterrupted();
        if (stop !== undefined) return this.beginFailed(stop);
        this.step = undefined;
        for (const d of this.disks) d.state = "running";
        this.transition(def.mode === "pull" ? "serving" : "running");
        void this.watch();
        void this.watchOthers();
        if (def.mode === "push") this.startCopying();
        // what begin answers must be on disk first: a kill -9 right after the answer
        // must find a record of a started job (adopted on restart), not one mid-begin
        const saved = await this.persist("begin:answered");
        if (saved.isErr()) {
          this.errorText ??= `the started backup could not be recorded: ${saved.error.message}`;
          await this.finish("failed");
          return err(saved.error);
        }
        return ok(this.info());
      })(),
    );
  }

  /**
   * A pull's total is what its exports offer to read: for an incremental,
   * the bytes its exported bitmap marks (disabled since the transaction, so
   * the figure is final); for a full, the disk's size (as planned). QEMU
   * counts nothing an NBD client reads, so this is the pull's size in
   * domjobinfo and the metrics. Best effort: a failed read keeps the size.
   */
  private async sizeExports(): Promise<void> {
    const marked = this.disks.filter((d) => d.plan.export?.bitmap !== undefined);
    if (marked.length === 0) return;
    const nodes = await this.ctx.client.execute("query-named-block-nodes", { flat: true });
    if (nodes.isErr()) {
      this.log.warn({ error: qmpErrorMessage(nodes.error) }, "cannot read the exported bitmaps' sizes; the pull reports the disks' sizes");
      return;
    }
    for (const d of marked) {
      const node = nodes.value.find((n) => n["node-name"] === d.plan.node);
      const bitmap = node?.["dirty-bitmaps"]?.find((b) => b.name === d.plan.export?.bitmap);
      if (bitmap !== undefined) d.bytesTotal = bitmap.count;
    }
  }

  private beginInterrupted(): BackupError | undefined {
    if (this.abortRequested) return aborted();
    if (this.phaseValue === "detached") return { code: "not-connected", message: "the daemon stopped while the backup was starting" };
    return undefined;
  }

  private async beginFailed(e: BackupError): Promise<Result<BackupJobInfo, BackupError>> {
    // a stopping daemon leaves QEMU as it is: the record says what the next start undoes
    if (this.phaseValue === "detached") return err(e);
    const abort = this.abortRequested || e.code === "aborted";
    this.errorText ??= abort ? "aborted by request" : e.message;
    await this.finish(abort ? "cancelled" : "failed");
    return err(abort ? aborted() : e);
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

  private closeListeners(): void {
    this.listener?.close();
    this.others?.close();
    this.offClose();
  }

  /** Export removals we did not ask for fail a pull; job I/O errors are logged (the job's conclusion decides). */
  private async watchOthers(): Promise<void> {
    const l = this.others!;
    for (;;) {
      const e = await l.next();
      if (e === undefined || !this.following()) return;
      if (e.name === "BLOCK_JOB_ERROR") {
        this.log.warn({ job: e.data.device, operation: e.data.operation, action: e.data.action }, "I/O error in a disk's backup job");
        continue;
      }
      const d = this.disks.find((x) => x.plan.export?.id === e.data.id);
      if (d === undefined || !d.exportAdded) continue;
      d.exportAdded = false;
      d.state = "failed";
      d.error = "its NBD export was removed behind the daemon's back";
      this.errorText = `disk '${d.plan.disk}': ${d.error}`;
      void this.finish("failed");
      return;
    }
  }

  /** Running or serving, and no finish under way: QEMU's events are ours to act on. */
  private following(): boolean {
    return (
      (this.phaseValue === "running" || this.phaseValue === "serving" || this.phaseValue === "adopting") && this.finishing === undefined
    );
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
      if (this.phaseValue !== "running" || this.finishing !== undefined) {
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
          // a job that has just ended copies nothing more: nothing to throttle (its end is told by its own events)
          .orElse((e) => (e.code === "command" && JOB_ENDED.test(e.desc) ? okAsync(undefined) : errAsync(e)))
          .mapErr(
            (e): BackupError => ({
              code: "job-failed",
              message: `cannot set the bandwidth of disk '${d.plan.disk}': ${qmpErrorMessage(e)}`,
            }),
          ),
      ),
    ).map(() => undefined);
  }

  private async watch(): Promise<void> {
    const l = this.listener!;
    for (;;) {
      const e = await l.next();
      // once finish runs, undo owns the jobs (cancelled jobs conclude too)
      if (e === undefined || !this.following()) return;
      if (e.data.status !== "concluded") continue;
      const d = this.disks.find((x) => x.plan.jobId === e.data.id);
      if (d === undefined || d.state !== "running") continue;
      await this.onConcluded(d);
      if (this.finishing !== undefined) return;
    }
  }

  private async onConcluded(d: DiskRuntime): Promise<void> {
    const c = this.ctx.client;
    let jobs = await c.execute("query-jobs");
    // a concluded job sends no further event: no answer is asked again while the connection stays up
    for (let wait = 100; jobs.isErr() && c.runstate === "running" && this.following(); wait = Math.min(2000, wait * 2)) {
      this.log.warn({ error: qmpErrorMessage(jobs.error) }, "cannot read the concluded job's outcome yet; trying again");
      await sleep(wait);
      jobs = await c.execute("query-jobs");
    }
    if (jobs.isErr()) return; // the connection went away (adoption at reconnect decides), or a finish took over
    const j = jobs.value.find((x) => x.id === d.plan.jobId);
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
    if (!this.following()) return;
    const dismissed = await this.ctx.client.execute("job-dismiss", { id: d.plan.jobId });
    if (dismissed.isOk()) d.jobDismissed = true;
    if (d.state === "failed") {
      this.errorText ??= `disk '${d.plan.disk}': ${d.error}`;
      this.log.error({ disk: d.plan.disk, error: d.error }, "disk backup job failed; failing the whole backup");
      void this.finish("failed");
      return;
    }
    if (this.ctx.def.mode === "push" && this.disks.every((x) => x.state === "complete")) void this.finish("ready");
  }

  /** The daemon is stopping: leave QEMU's jobs, nodes and exports as they are (the next start adopts or cleans them). */
  detach(): void {
    if (!this.active) return;
    this.transition("detached");
    this.ctx.onDetached?.(this);
  }

  private onDisconnect(reason: string): void {
    if (!this.active) return;
    // a dead QEMU leaves its QMP socket refusing connections (asked more than once: see stillListening)
    void stillListening(this.ctx.client.address).then((alive) => {
      if (!this.active) return;
      if (!alive) {
        this.qemuGone = true;
        this.errorText ??= `QEMU went away: ${reason}`;
      }
      // begin and finish see the connection gone in their own steps and decide there
      if (this.phaseValue === "begin" || this.phaseValue === "finishing") return;
      if (alive && this.ctx.store !== undefined) {
        this.log.warn({ reason }, "QMP connection lost but QEMU still runs; the job is adopted again at reconnect");
        this.detach();
        return;
      }
      this.qemuGone = true;
      void this.finish("failed");
    });
  }

  /** Pull: the caller is done; push: abort. During begin or adoption, an end only marks the job: begin or adopt ends it. */
  end(): Promise<BackupJobInfo> {
    // adopting: the flags are the record's until adoption has re-derived them from QEMU; it ends the job then
    if (this.phaseValue === "begin" || this.phaseValue === "adopting") {
      this.abortRequested = true;
      return this.gone.then(() => this.info());
    }
    if (this.finishing === undefined && this.active) {
      if (this.phaseValue === "serving") void this.finish("ready");
      else {
        this.abortRequested = true;
        this.errorText ??= "aborted by request";
        void this.finish("cancelled");
      }
    }
    return (this.finishing ?? Promise.resolve()).then(() => this.gone).then(() => this.info());
  }

  // ---------------------------------------------------------------- finish

  /** The one way a job ends; runs at most once (later calls share it). */
  private finish(requested: JobOutcome): Promise<void> {
    if (this.finishing !== undefined) return this.finishing;
    this.outcome = requested;
    this.transition("finishing");
    this.finishing = this.runFinish(requested);
    return this.finishing;
  }

  private async runFinish(requested: JobOutcome): Promise<void> {
    let outcome = requested;
    const mode = this.ctx.def.mode;
    // the outcome is recorded first: a restart finishes this undo, it never re-decides it
    await this.persist();
    const pushReady = outcome === "ready" && mode === "push";
    // a backup that did not succeed does not wait for a sync in flight (its files go anyway)
    const stopping = Promise.all(this.writebackStops.splice(0).map((stop) => stop()));
    const writebackErrors = pushReady ? await stopping : [];
    let stuck = await this.undo(outcome);
    if (stuck === undefined) return;
    // "cancelled" means nothing of the job is left: what QEMU refused to give up makes it a failure, with the reason
    if (outcome === "cancelled" && stuck.length > 0) {
      outcome = "failed";
      this.outcome = outcome;
      this.errorText = `aborted by request, but QEMU refused to give up: ${stuck.join("; ")}`;
      await this.persist();
    }
    const closeFailed = stuck.find((s) => s.startsWith("blockdev-del"));
    if (pushReady && closeFailed !== undefined) this.errorText ??= `cannot close the target: ${closeFailed}`;
    // Ready means on disk: the targets are written out (and their directory entries) before anyone is told.
    if (pushReady && this.ctx.planOpts.nonDurable !== true && this.errorText === undefined)
      this.errorText = await finishWriteOut(this.ctx, this.disks, writebackErrors);
    if (pushReady && this.errorText !== undefined) {
      outcome = "failed";
      this.outcome = outcome;
      for (const d of this.disks) d.state = "failed";
      this.log.error({ error: this.errorText }, "the backup copy is complete but cannot be closed or made durable");
      await this.persist();
      // now the checkpoint's bitmaps go too
      const again = await this.undo(outcome);
      if (again === undefined) return;
      stuck = [...stuck, ...again];
    }
    await finishRemoveFiles(this.ctx, this.disks, outcome, stuck, this.log);
    if (await finishRollBackCheckpoint(this.ctx, outcome, this.f.checkpointCommitted, this.log)) this.f.checkpointCommitted = false;
    // the checkpoints' evidence (dirty counts, recording state) as it stands once our temporary bitmaps are gone
    if (!this.qemuGone && this.ctx.client.runstate === "running") {
      const seen = await this.ctx.checkpoints.recordAfterBackup(this.ctx.client);
      if (seen.isErr()) this.log.warn({ error: seen.error.message }, "cannot record the checkpoints' bitmaps after the backup");
    }
    for (const d of this.disks) {
      if (d.state === "running" || d.state === "begin")
        d.state = outcome === "cancelled" ? "cancelled" : outcome === "ready" ? "complete" : "failed";
    }
    this.endedAt = Date.now();
    this.closeListeners();
    if (this.ctx.store !== undefined && this.phaseValue !== "detached") {
      await this.persistChain.catch(() => {});
      const store = this.ctx.store;
      crashPoint(`${outcome}:record`);
      const info = { ...this.info(), active: false, state: outcome as JobState };
      await store.saveCompleted(info);
      await store.remove(this.ctx.domain);
    }
    if (this.phaseValue === "finishing") this.transition("ended");
  }

  /**
   * Undo in QEMU until QEMU confirms. Undefined when the job detached
   * instead (the connection went away and QEMU still runs: the next connect
   * finishes it from the record); otherwise what QEMU refused to give up.
   */
  private async undo(outcome: JobOutcome): Promise<readonly string[] | undefined> {
    if (this.qemuGone) return this.forgetQemu();
    const cp = this.ctx.checkpoint;
    const dropCheckpoint = cp !== undefined && outcome !== "ready" && this.f.txDone;
    const r = await undoInQemu(this.ctx.client, this.disks, this.f, this.ctx.nbd, this.log, {
      tempBitmaps: this.f.tempBitmapsAdded,
      checkpointBitmaps: dropCheckpoint ? cp.actions.map((a) => a.data as { node: string; name: string }) : [],
    });
    if (r.kind === "done") return r.stuck;
    const alive = this.qemuGone ? false : await stillListening(this.ctx.client.address);
    if (alive && this.ctx.store !== undefined) {
      this.log.warn("QMP connection lost during the undo but QEMU still runs; it is finished at reconnect");
      if (this.phaseValue === "finishing") this.transition("detached");
      this.ctx.onDetached?.(this);
      return undefined;
    }
    this.qemuGone = true;
    return this.forgetQemu();
  }

  /** QEMU is dead: what lived in it died with it. */
  private forgetQemu(): readonly string[] {
    for (const d of this.disks) {
      d.nodeAdded = false;
      d.jobStarted = false;
      d.exportAdded = false;
    }
    this.f.nbdStarted = false;
    this.f.tlsAdded = false;
    this.f.tempBitmapsAdded = false;
    return [];
  }
}
