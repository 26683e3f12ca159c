/**
 * The job registry: at most one backup per domain. `begin` reserves the
 * domain, has the request prepared (prepare.ts: everything checked before
 * QEMU is touched), builds the job through the one context factory
 * (context.ts) and starts it; an abort that arrives while the request is
 * still being prepared marks the reservation, and nothing is started. Keeps
 * the last finished job's info per domain (domjobinfo --completed), fans job
 * events out to subscribers, and runs recovery (recovery.ts) at each connect.
 *
 * What this module must never do: talk to QEMU itself (jobs and recovery
 * do), or let two jobs of one domain exist at once.
 */
import { join } from "node:path";
import { errAsync, okAsync, ResultAsync } from "neverthrow";
import type { Logger } from "../log.js";
import type { QmpClient } from "../qmp/client.js";
import { type JobServices, jobContext } from "./context.js";
import type { BackupDomain, BeginOptions } from "./domain.js";
import type { BackupError } from "./errors.js";
import { BackupJob } from "./job.js";
import type { BackupJobInfo, JobEvent } from "./model.js";
import { BackupPreparer } from "./prepare.js";
import { JobStore } from "./record.js";
import { recoverDomain } from "./recovery.js";
import { WritebackPump } from "./writeback.js";

export type { BackupDomain, BeginOptions } from "./domain.js";

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

/** A begin between its reservation and its job: an abort only marks it. */
interface Reservation {
  aborted: boolean;
  readonly done: Promise<void>;
}

const noJob = (domain: string): BackupError => ({ code: "no-job", message: `no backup job is running on domain '${domain}'` });

export class JobManager {
  private readonly active = new Map<string, BackupJob>();
  /** Domains whose begin is being prepared (validation is async: reserve the slot first). */
  private readonly beginning = new Map<string, Reservation>();
  /** Domains whose recovery runs: a begin then would race the adoption of the record (or its cleanup of leftovers). */
  /** The whole recovery of a domain, while it runs (a begin without a recorded job waits for it). */
  private readonly recoveries = new Map<string, Promise<void>>();
  /** Until a recovery knows the recorded job (registered, or none): questions about the domain's job wait for it. */
  private readonly unknown = new Map<string, Promise<void>>();
  /** Domains kept busy until a person looks (an unreadable job record was set aside). */
  private readonly blocked = new Map<string, string>();
  private readonly completed = new Map<string, BackupJobInfo>();
  /**
   * The domain's latest begin was refused (no job was made): then a plain
   * wait with nothing running must not answer with the last finished job,
   * which is no answer to that begin. Cleared by the next job made.
   */
  private readonly refused = new Map<string, BackupError>();
  private readonly preparer: BackupPreparer;
  private readonly services: JobServices;
  private readonly subscribers = new Set<(e: JobEvent) => void>();
  private readonly log: Logger;

  private readonly store: JobStore | undefined;
  /** One for all jobs: it bounds how many fdatasync calls occupy the thread pool. */
  private readonly writeback: WritebackPump;

  constructor(readonly opts: JobManagerOptions) {
    this.log = opts.logger;
    this.writeback = opts.writeback ?? new WritebackPump();
    this.store = opts.stateDir === undefined ? undefined : new JobStore(join(opts.stateDir, "jobs"));
    this.preparer = new BackupPreparer({
      logger: opts.logger,
      backupDir: opts.backupDir,
      allowedDirs: opts.allowedDirs,
      tlsDir: opts.tlsDir,
      allowPlainTcp: opts.allowPlainTcp,
    });
    this.services = {
      logger: this.log,
      store: this.store,
      writeback: this.writeback,
      emit: (e) => this.emit(e),
      onDetached: (j) => this.forget(j),
    };
  }

  private forget(job: { info(): BackupJobInfo }): void {
    const d = job.info().domain;
    if (this.active.get(d) === job) this.active.delete(d);
  }

  /**
   * On every (re)connect of a domain: adopt the job its record describes, or
   * remove what a crashed daemon left in QEMU without a record.
   */
  async recover(domain: BackupDomain): Promise<void> {
    const client = domain.client();
    const store = this.store;
    if (client === undefined || store === undefined) return;
    // marked before the first await: a domain is connected (and takes requests) before its recovery has adopted the record
    // questions wait until the recorded job is known (registered, or found to be none), not for its undo to end
    let resolve: () => void = () => {};
    const pending = new Promise<void>((r) => (resolve = r));
    const known = () => {
      if (this.unknown.get(domain.name) === pending) this.unknown.delete(domain.name);
      resolve();
    };
    this.unknown.set(domain.name, pending);
    const whole = this.recoverNow(domain, client, store, known).finally(() => {
      known();
      if (this.recoveries.get(domain.name) === whole) this.recoveries.delete(domain.name);
    });
    this.recoveries.set(domain.name, whole);
    await whole;
  }

  /** Questions about a domain's job are answered once its recovery has adopted (or cleaned up) the recorded one. */
  private afterRecovery<T>(domain: string, f: () => ResultAsync<T, BackupError>): ResultAsync<T, BackupError> {
    const r = this.unknown.get(domain);
    if (r === undefined) return f();
    return ResultAsync.fromSafePromise(r).andThen(f);
  }

  private async recoverNow(domain: BackupDomain, client: QmpClient, store: JobStore, known: () => void): Promise<void> {
    if (!this.completed.has(domain.name)) {
      const c = await store.loadCompleted(domain.name);
      if (c !== undefined) this.completed.set(domain.name, c);
    }
    if (this.active.get(domain.name)?.active || this.beginning.has(domain.name)) return;
    const r = await recoverDomain(store, domain.name, client, {
      log: this.log,
      idle: !this.active.has(domain.name),
      adopt: async (rec) => {
        const job = new BackupJob(jobContext(this.services, domain, client, rec), "adopting");
        job.restoreFrom(rec);
        this.active.set(domain.name, job);
        known();
        await job.adopt();
        return job;
      },
    });
    if (r.kind === "blocked") this.blocked.set(domain.name, r.message);
    else this.blocked.delete(domain.name);
  }

  /** Still kept busy by a record set aside? A person removing it lifts the block. */
  private stillBlocked(domain: string): ResultAsync<void, BackupError> {
    const message = this.blocked.get(domain);
    if (message === undefined || this.store === undefined) return okAsync(undefined);
    const store = this.store;
    return ResultAsync.fromSafePromise(store.setAsideOf(domain)).andThen((left) => {
      if (left.length > 0) return errAsync<void, BackupError>({ code: "busy", message });
      this.blocked.delete(domain);
      this.log.warn({ domain }, "the set-aside job record was removed; backups are allowed again");
      return okAsync(undefined);
    });
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

  /**
   * A backup owns the domain: a job runs, a begin is being prepared, or recovery is adopting the recorded one.
   * Checkpoint changes and domain-remove are refused meanwhile (not only once the job exists).
   */
  busy(domain: string): boolean {
    return this.active.get(domain)?.active === true || this.beginning.has(domain) || this.recoveries.has(domain);
  }

  /**
   * The last finished job's record read from disk if not known yet: recovery
   * reads it at a connect, but a domain whose QEMU is not running (offline)
   * never connects, and its last backup may have ended while the daemon was down.
   */
  private withCompleted(domain: string): ResultAsync<void, BackupError> {
    const store = this.store;
    if (this.completed.has(domain) || store === undefined) return okAsync(undefined);
    return ResultAsync.fromSafePromise(
      store
        .loadCompleted(domain)
        .catch(() => undefined) // not JSON: as if none (the next finished job replaces it)
        .then((c) => {
          if (c !== undefined && !this.completed.has(domain)) this.completed.set(domain, c);
        }),
    );
  }

  /** Resolves once the domain's recovery (if one runs) is over: callers then ask busy() of the settled view. */
  async recovered(domain: string): Promise<void> {
    await this.recoveries.get(domain);
  }

  /** The running job's info; with `completed`, the last finished job's. */
  info(domain: string, opts: { completed?: boolean } = {}): ResultAsync<BackupJobInfo, BackupError> {
    return this.afterRecovery(domain, () => this.withCompleted(domain).andThen(() => this.infoNow(domain, opts)));
  }

  private infoNow(domain: string, opts: { completed?: boolean }): ResultAsync<BackupJobInfo, BackupError> {
    if (opts.completed) {
      const c = this.completed.get(domain);
      return c === undefined ? errAsync({ code: "no-job", message: `no finished backup job on domain '${domain}'` }) : okAsync(c);
    }
    const blocked = this.blocked.get(domain);
    if (blocked !== undefined) return errAsync({ code: "busy", message: blocked });
    const j = this.active.get(domain);
    if (j === undefined) return errAsync(noJob(domain));
    return j.refreshProgress();
  }

  xml(domain: string): ResultAsync<string, BackupError> {
    const j = this.active.get(domain);
    return j === undefined ? errAsync({ code: "no-job", message: `no backup job is running on domain '${domain}'` }) : okAsync(j.xml());
  }

  /**
   * End a pull backup, or abort a push (virDomainAbortJob). A begin still
   * being prepared is marked and answers once it has given up, having
   * started nothing; a begin under way is aborted by its own chain.
   */
  end(domain: string): ResultAsync<BackupJobInfo, BackupError> {
    return this.afterRecovery(domain, () => this.stillBlocked(domain)).andThen(() => {
      const j = this.active.get(domain);
      if (j !== undefined) return ResultAsync.fromSafePromise(j.end());
      const slot = this.beginning.get(domain);
      if (slot === undefined) return errAsync(noJob(domain));
      slot.aborted = true;
      return ResultAsync.fromSafePromise(slot.done).andThen(() => {
        const started = this.active.get(domain);
        if (started !== undefined) return ResultAsync.fromSafePromise(started.end());
        const info = notStarted(domain);
        this.completed.set(domain, info);
        return okAsync(info);
      });
    });
  }

  /** Change the running job's bandwidth limit (bytes/s per disk; 0 = unlimited). */
  setBandwidth(domain: string, bytesPerSecond: number): ResultAsync<void, BackupError> {
    return this.afterRecovery(domain, () => this.setBandwidthNow(domain, bytesPerSecond));
  }

  private setBandwidthNow(domain: string, bytesPerSecond: number): ResultAsync<void, BackupError> {
    const j = this.active.get(domain);
    if (j === undefined) return errAsync({ code: "no-job", message: `no backup job is running on domain '${domain}'` });
    return j.setBandwidth(bytesPerSecond);
  }

  /** Wait until the running job is ready (push: complete), failed or cancelled. */
  wait(domain: string, timeoutMs?: number): ResultAsync<BackupJobInfo, BackupError> {
    return this.afterRecovery(domain, () => this.withCompleted(domain).andThen(() => this.waitNow(domain, timeoutMs)));
  }

  private waitNow(domain: string, timeoutMs: number | undefined): ResultAsync<BackupJobInfo, BackupError> {
    const j = this.active.get(domain);
    if (j === undefined) {
      const refusal = this.refused.get(domain);
      const c = this.completed.get(domain);
      if (refusal !== undefined)
        return errAsync({
          code: "no-job",
          message: `no backup job on domain '${domain}': the last backup-begin was refused (${refusal.code}: ${refusal.message})${c === undefined ? "" : `; the last finished backup, job ${c.id}, ended before it`}`,
        });
      return c === undefined ? errAsync({ code: "no-job", message: `no backup job on domain '${domain}'` }) : okAsync(c);
    }
    const settled = j.settled();
    if (timeoutMs === undefined) return ResultAsync.fromSafePromise(settled);
    return ResultAsync.fromSafePromise(
      Promise.race([settled, new Promise<undefined>((r) => setTimeout(() => r(undefined), timeoutMs).unref())]),
    ).andThen((x) =>
      x === undefined
        ? errAsync<BackupJobInfo, BackupError>({
            code: "timeout",
            message: `the backup on '${domain}' did not settle within ${timeoutMs} ms`,
          })
        : okAsync(x),
    );
  }

  /** virDomainBackupBegin. */
  begin(
    domain: BackupDomain,
    backupXml: string | undefined,
    checkpointXml: string | undefined,
    opts: BeginOptions = {},
  ): ResultAsync<BackupJobInfo, BackupError> {
    const made = { job: false };
    return this.beginOrRefuse(domain, backupXml, checkpointXml, opts, made).orElse((e) => {
      // refused before a job was made (busy included); a job that failed to begin ends as a finished, failed job
      if (!made.job) this.refused.set(domain.name, e);
      return errAsync(e);
    });
  }

  private beginOrRefuse(
    domain: BackupDomain,
    backupXml: string | undefined,
    checkpointXml: string | undefined,
    opts: BeginOptions,
    made: { job: boolean },
  ): ResultAsync<BackupJobInfo, BackupError> {
    // right after a (re)connect: once the recorded job is known it is busy; without one, the begin waits
    // for the cleanup of leftovers to end instead of answering busy to a domain that reports connected
    const recovery = this.recoveries.get(domain.name);
    if (recovery !== undefined)
      return this.afterRecovery(domain.name, () =>
        this.active.get(domain.name)?.active
          ? errAsync<BackupJobInfo, BackupError>({ code: "busy", message: `a backup job is already running on domain '${domain.name}'` })
          : ResultAsync.fromSafePromise(recovery).andThen(() => this.beginOrRefuse(domain, backupXml, checkpointXml, opts, made)),
      );
    if (this.active.has(domain.name) || this.beginning.has(domain.name)) {
      return errAsync({ code: "busy", message: `a backup job is already running on domain '${domain.name}'` });
    }
    const client = domain.client();
    if (client === undefined || client.runstate !== "running") {
      return errAsync({ code: "not-connected", message: `domain '${domain.name}' is not connected to QEMU` });
    }
    let release: () => void = () => {};
    const slot: Reservation = { aborted: false, done: new Promise<void>((r) => (release = r)) };
    this.beginning.set(domain.name, slot);
    const run = this.stillBlocked(domain.name)
      .andThen(() => this.preparer.prepare(domain, client, backupXml, checkpointXml, opts))
      .andThen((prepared) => {
        // checked with no await since: an abort from here on reaches the job
        if (slot.aborted)
          return errAsync<BackupJobInfo, BackupError>({ code: "aborted", message: "the backup was aborted by request before it started" });
        const job = new BackupJob(jobContext(this.services, domain, client, prepared, { quiesce: opts.quiesce }));
        this.active.set(domain.name, job);
        made.job = true;
        this.refused.delete(domain.name);
        this.beginning.delete(domain.name);
        return job.begin().orElse((e) => {
          this.forget(job);
          return errAsync<BackupJobInfo, BackupError>(e);
        });
      });
    return new ResultAsync(
      (async () => {
        const x = await run;
        if (this.beginning.get(domain.name) === slot) this.beginning.delete(domain.name);
        release();
        return x;
      })(),
    );
  }
}

/** What an abort of a begin that never got to start anything answers. */
function notStarted(domain: string): BackupJobInfo {
  const now = new Date().toISOString();
  return {
    id: "",
    domain,
    mode: "push",
    state: "cancelled",
    active: false,
    incremental: undefined,
    checkpoint: undefined,
    startedAt: now,
    endedAt: now,
    elapsedMs: 0,
    bytesDone: 0,
    bytesTotal: 0,
    rate: 0,
    error: "aborted by request before it started: nothing was created",
    nbd: undefined,
    durable: undefined,
    disks: [],
  };
}
