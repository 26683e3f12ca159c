/**
 * The domains the daemon serves: from the configuration file and registered
 * at run time (persisted in <stateDir>/domains.json, see domains-file.ts). Each keeps its QMP
 * connection up through a supervisor (reconnect with backoff); on every
 * connect it probes QEMU and reconciles its checkpoints. One domain's QEMU
 * going away never affects another.
 */
import { statSync } from "node:fs";
import { join } from "node:path";
import { errAsync, okAsync, ResultAsync } from "neverthrow";
import { CheckpointManager } from "../checkpoints/manager.js";
import { CheckpointStore } from "../checkpoints/store.js";
import type { DomainConfig } from "../conf/config.js";
import { parseDomainConfig, parseOwner } from "../conf/config.js";
import type { BackupDomain } from "../jobs/manager.js";
import { domainTag } from "../jobs/plan.js";
import type { Logger } from "../log.js";
import { type CapabilityCache, probeCapabilities, type QemuCapabilities } from "../qmp/capabilities.js";
import type { QmpClient } from "../qmp/client.js";
import { discoverDisks } from "../qmp/disks.js";
import { qmpErrorMessage } from "../qmp/errors.js";
import { parseAddress } from "../qmp/protocol.js";
import { QmpSupervisor } from "../qmp/reconnect.js";
import { crashPoint } from "../util/crash-point.js";
import { DiskMemory, type RememberedDisk } from "./disk-memory.js";
import { DomainsFile, type DomainsFileEntry } from "./domains-file.js";
import type { DomainError } from "./errors.js";
import { claimQemu, releaseQemu } from "./ownership.js";

/** How often a connected domain's disks are looked at again for the disk memory. */
const DISK_WATCH_MS = 3000;

/** Shared by all domains: one schema parse per QEMU build. */
const capabilityCache: CapabilityCache = new Map();

/** offline: not connected (the last attempt failed), its disks known: backups run through a storage daemon (offline.ts). */
export type DomainState = "connecting" | "connected" | "unsupported" | "offline";

export interface DomainEvent {
  readonly domain: string;
  readonly type: "connected" | "disconnected" | "unsupported";
  readonly message?: string;
}

export class Domain implements BackupDomain {
  private conn: QmpClient | undefined;
  private capsValue: QemuCapabilities | undefined;
  private stateValue: DomainState = "connecting";
  private lastError: string | undefined;
  /** Keeps the QMP connection up; none for a domain registered without QMP (backed up offline only). */
  private readonly supervisor: QmpSupervisor | undefined;
  /** Callers of settled(), told at the next connect outcome. */
  private readonly settleWaiters = new Set<() => void>();
  readonly agentPath: string | undefined;
  /** Who QEMU runs as, when not the daemon's user (read at each connect). */
  private owner: { uid: number; gid: number } | undefined;

  constructor(
    readonly config: DomainConfig,
    readonly origin: "config" | "api",
    readonly checkpoints: CheckpointManager,
    private readonly log: Logger,
    private readonly onEvent: (e: DomainEvent) => void,
    /** Runs on every connect before the domain is usable (job adoption, leftover cleanup). */
    private readonly onConnect: (d: Domain) => Promise<void>,
    /** What the disks were when QEMU was last seen running. */
    readonly memory: DiskMemory,
    /** The other domain registered here whose ownership-marker tag this is (see ownership.ts). */
    private readonly registeredAs: (tag: string) => string | undefined = () => undefined,
  ) {
    this.agentPath = config.agent;
    this.supervisor =
      config.qmp === undefined
        ? undefined
        : new QmpSupervisor(
            parseAddress(config.qmp),
            {
              // a throw past the QMP checks (a bug) must fail this domain, not end the daemon with an unhandled rejection
              connected: (c) => void this.onConnected(c).catch((e: unknown) => this.onConnectThrew(e)),
              disconnected: (i) => this.onDisconnected(i.message),
              failed: (m) => this.onConnectFailed(m),
            },
            { logger: log, commandTimeoutMs: 60_000 },
            { initialDelayMs: 200, maxDelayMs: 10_000 },
          );
  }

  get name(): string {
    return this.config.name;
  }

  get state(): DomainState {
    const known = this.memory.disks !== undefined;
    if (this.supervisor === undefined) return known ? "offline" : "connecting";
    if (this.stateValue === "connecting" && this.lastError !== undefined && known) return "offline";
    return this.stateValue;
  }

  rememberedDisks(): readonly RememberedDisk[] | undefined {
    return this.memory.disks;
  }

  unopenableDisks(): readonly string[] {
    return this.memory.unopenable;
  }

  get caps(): QemuCapabilities | undefined {
    return this.capsValue;
  }

  get backupPerf(): boolean {
    return this.capsValue?.backupPerf ?? false;
  }

  get imageOwner(): { uid: number; gid: number } | undefined {
    return this.owner;
  }

  /**
   * QEMU must be able to open the files we create for it. Its user is the
   * configured qemuUser, else the owner of the QMP socket it created; only
   * one neither root nor the daemon's own user needs the files handed over.
   */
  private findOwner(): { uid: number; gid: number } | undefined {
    let o: { uid: number; gid: number } | undefined;
    if (this.config.qemuUser !== undefined) o = parseOwner(this.config.qemuUser);
    else if (this.config.qmp !== undefined) {
      const a = parseAddress(this.config.qmp);
      if ("path" in a) {
        try {
          const st = statSync(a.path);
          o = { uid: st.uid, gid: st.gid };
        } catch {
          o = undefined;
        }
      }
    }
    // root opens whatever we create, and so do we
    return o === undefined || o.uid === 0 || o.uid === process.getuid?.() ? undefined : o;
  }

  get error(): string | undefined {
    return this.lastError;
  }

  /** The connection, once probed and usable. */
  client(): QmpClient | undefined {
    return this.stateValue === "connected" ? this.conn : undefined;
  }

  start(): void {
    this.supervisor?.start();
  }

  /**
   * Resolves at the first outcome of connecting from now on: connected and
   * usable (jobs adopted, checkpoints reconciled), refused as unsupported,
   * or a failed attempt (its reason in `error`); or after `timeoutMs`. At
   * once when already connected. `state` and `error` then say which.
   */
  settled(timeoutMs: number): Promise<void> {
    if (this.stateValue === "connected" && this.ready) return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.settleWaiters.delete(done);
        resolve();
      };
      const timer = setTimeout(done, timeoutMs);
      this.settleWaiters.add(done);
    });
  }

  /** Connected and through onConnect (adoption, cleanup) and reconciliation. */
  private ready = false;

  private settle(): void {
    for (const w of [...this.settleWaiters]) w();
  }

  private onConnectFailed(message: string): void {
    this.lastError = message;
    this.settle();
  }

  stop(): Promise<void> {
    clearInterval(this.diskWatch);
    return this.supervisor?.stop() ?? Promise.resolve();
  }

  /** domain-remove: leave QEMU unmarked, then disconnect. */
  async release(): Promise<void> {
    const c = this.client();
    if (c !== undefined) await releaseQemu(c, this.name);
    await this.stop();
  }

  private async onConnected(c: QmpClient): Promise<void> {
    this.conn = c;
    const caps = await probeCapabilities(c, capabilityCache);
    if (caps.isErr()) {
      this.stateValue = "unsupported";
      this.lastError = qmpErrorMessage(caps.error);
      this.log.error({ domain: this.name, error: this.lastError }, "QEMU refused");
      this.onEvent({ domain: this.name, type: "unsupported", message: this.lastError });
      this.settle();
      return;
    }
    this.capsValue = caps.value;
    // before anything is cleaned up or adopted: is this QEMU another domain's?
    const claim = await claimQemu(c, this.name, (tag) => this.registeredAs(tag));
    if (claim.isErr()) {
      this.stateValue = "unsupported";
      this.lastError = claim.error.code === "qmp" ? `${claim.error.message}: ${qmpErrorMessage(claim.error.cause)}` : claim.error.message;
      this.log.error({ domain: this.name, error: this.lastError }, "QEMU refused");
      this.onEvent({ domain: this.name, type: "unsupported", message: this.lastError });
      this.settle();
      return;
    }
    if (claim.value.takenOver.length > 0)
      this.log.warn({ domain: this.name, markers: claim.value.takenOver }, "took over a QEMU marked by a domain no longer registered");
    this.owner = this.findOwner();
    if (this.owner !== undefined)
      this.log.info(
        { domain: this.name, uid: this.owner.uid, gid: this.owner.gid },
        "QEMU runs as another user: backup files are given to it",
      );
    this.stateValue = "connected";
    this.lastError = undefined;
    this.log.info({ domain: this.name, qemu: caps.value.package }, "domain connected");
    await this.onConnect(this);
    await this.checkpoints.reconcile(c);
    await this.rememberDisks(c);
    this.watchDisks(c);
    this.ready = this.conn === c;
    this.onEvent({ domain: this.name, type: "connected" });
    this.settle();
  }

  private diskWatch: NodeJS.Timeout | undefined;

  /**
   * Look again every few seconds while connected: another tool may change
   * the graph (an external snapshot, a mirror's pivot) with no QMP event,
   * and an offline backup opens what was last seen. A change in the last
   * seconds before QEMU went away stays unseen; offline.ts then refuses,
   * as the images no longer give the chain remembered, where it can tell.
   */
  private watchDisks(c: QmpClient): void {
    clearInterval(this.diskWatch);
    let looking = false;
    this.diskWatch = setInterval(() => {
      if (this.conn !== c || looking) return;
      looking = true;
      void this.rememberDisks(c).finally(() => {
        looking = false;
      });
    }, DISK_WATCH_MS);
    this.diskWatch.unref();
  }

  /** Keep the disks as this QEMU has them, for backups while it is not running (a failure only costs that). */
  private async rememberDisks(c: QmpClient): Promise<void> {
    const disks = await discoverDisks(c);
    if (disks.isErr()) {
      this.log.warn({ domain: this.name, error: qmpErrorMessage(disks.error) }, "cannot list the disks to remember them");
      return;
    }
    const kept = await this.memory.remember(disks.value);
    if (kept.isErr()) this.log.warn({ domain: this.name, error: kept.error.message }, "cannot keep the disk memory");
  }

  /** Like an unsupported QEMU: the domain stays unusable until its QEMU reconnects; no redial loop on a bug that repeats. */
  private onConnectThrew(e: unknown): void {
    this.stateValue = "unsupported";
    this.ready = false;
    this.lastError = `internal error while connecting: ${e instanceof Error ? e.message : String(e)}`;
    this.log.error({ domain: this.name, err: e }, "domain connect failed with an internal error");
    this.onEvent({ domain: this.name, type: "unsupported", message: this.lastError });
    this.settle();
  }

  private onDisconnected(message: string): void {
    clearInterval(this.diskWatch);
    this.conn = undefined;
    this.ready = false;
    this.stateValue = "connecting";
    this.lastError = message;
    this.log.warn({ domain: this.name, reason: message }, "domain disconnected; reconnecting");
    this.onEvent({ domain: this.name, type: "disconnected", message });
  }
}

/** An entry of domains.json not loaded, and why: kept in the file as it was. */
export interface KeptEntry {
  readonly index: number;
  readonly name: string | undefined;
  readonly reason: string;
}

/**
 * The registered domains, and domains.json for those registered through the
 * API. Every change is decided in memory, written, and made only once the
 * write succeeded: a failed write (a full disk) changes nothing. Changes run
 * one at a time, each writing the file from the one before.
 */
export class DomainRegistry {
  private readonly domains = new Map<string, Domain>();
  private readonly file: DomainsFile;
  /** domains.json as last read or written, in its order. */
  private entries: readonly DomainsFileEntry[] = [];
  /** The last change queued: the next one runs after it. */
  private tail: Promise<unknown> = Promise.resolve();

  constructor(
    private readonly stateDir: string,
    private readonly log: Logger,
    private readonly onEvent: (e: DomainEvent) => void,
    private readonly onConnect: (d: Domain) => Promise<void> = async () => {},
  ) {
    this.file = new DomainsFile(join(stateDir, "domains.json"), log);
  }

  list(): Domain[] {
    return [...this.domains.values()].sort((a, b) => (a.name < b.name ? -1 : 1));
  }

  get(name: string): Domain | undefined {
    return this.domains.get(name);
  }

  /** Entries of domains.json not loaded at start, kept in the file as they were. */
  kept(): KeptEntry[] {
    return this.entries.flatMap((e, index) => (e.kind === "kept" ? [{ index, name: e.name, reason: e.reason }] : []));
  }

  /**
   * At start, after the configured domains: register the domains in
   * domains.json. Writes nothing (a crash here leaves the file whole); an
   * entry that cannot be loaded is logged and kept for the next write.
   */
  async load(): Promise<void> {
    await this.serial(() =>
      ResultAsync.fromSafePromise(
        (async () => {
          const entries: DomainsFileEntry[] = [];
          const named = new Set<string>();
          for (const [i, raw] of (await this.file.read()).entries()) {
            const rawName = typeof raw === "object" && raw !== null ? (raw as { name?: unknown }).name : undefined;
            const name = typeof rawName === "string" ? rawName : undefined;
            const keep = (reason: string) => {
              entries.push({ kind: "kept", raw, name, reason });
              this.log.error(
                { file: this.file.path, entry: i, domain: name ?? null, reason },
                "domains.json: entry not loaded; it is kept in the file as it is",
              );
            };
            const c = parseDomainConfig(raw, `domains.json[${i}]`);
            if (c.isErr()) keep(c.error.message);
            else if (named.has(c.value.name)) keep(`an earlier entry is named '${c.value.name}'`);
            else if (this.domains.has(c.value.name)) keep(`the configuration file has a domain named '${c.value.name}'`);
            else {
              named.add(c.value.name);
              const d = await this.prepare(c.value, "api");
              if (d.isErr()) keep(d.error.message);
              else {
                this.enlist(d.value);
                entries.push({ kind: "domain", config: c.value });
                crashPoint("start:domain-registered");
              }
            }
          }
          this.entries = entries;
        })(),
      ),
    );
  }

  add(config: DomainConfig, origin: "config" | "api"): ResultAsync<Domain, DomainError> {
    return this.serial(() => {
      if (this.domains.has(config.name))
        return errAsync<Domain, DomainError>({ code: "duplicate", message: `domain '${config.name}' is already registered` });
      const kept = this.kept().find((k) => k.name === config.name);
      if (kept !== undefined)
        return errAsync<Domain, DomainError>({
          code: "duplicate",
          message: `domains.json keeps an entry named '${config.name}' that was not loaded (${kept.reason}); edit or remove it there first`,
        });
      return this.prepare(config, origin).andThen((d) => {
        if (origin === "config") return okAsync<Domain, DomainError>(this.enlist(d));
        const next = [...this.entries, { kind: "domain" as const, config }];
        return this.file.write(next).map(() => {
          this.entries = next;
          return this.enlist(d);
        });
      });
    });
  }

  remove(name: string): ResultAsync<void, DomainError> {
    return this.serial(() => {
      const d = this.domains.get(name);
      if (d === undefined) return errAsync<Domain, DomainError>({ code: "unknown-domain", message: `no domain named '${name}'` });
      if (d.origin === "config") {
        this.domains.delete(name);
        return okAsync<Domain, DomainError>(d);
      }
      const next = this.entries.filter((e) => !(e.kind === "domain" && e.config.name === name));
      return this.file.write(next).map(() => {
        this.entries = next;
        this.domains.delete(name);
        return d;
      });
    }).andThen((d) =>
      // leaving QEMU unmarked waits on QEMU: outside the queue, once the domain is gone from the registry
      ResultAsync.fromSafePromise(d.release()),
    );
  }

  async stopAll(): Promise<void> {
    await Promise.all([...this.domains.values()].map((d) => d.stop()));
  }

  /** Run `fn` once every change queued before it is done. */
  private serial<T>(fn: () => ResultAsync<T, DomainError>): ResultAsync<T, DomainError> {
    const run = this.tail.then(() => fn());
    this.tail = run.catch(() => undefined);
    return new ResultAsync(run);
  }

  /** The domain with its checkpoint store open, neither registered nor started. */
  private prepare(config: DomainConfig, origin: "config" | "api"): ResultAsync<Domain, DomainError> {
    return CheckpointStore.open(this.stateDir, config.name, this.log).andThen((store) =>
      ResultAsync.fromSafePromise(DiskMemory.open(this.stateDir, config.name, this.log, config.disks)).map((memory) => {
        const checkpoints = new CheckpointManager(store, { logger: this.log, agentPath: config.agent });
        return new Domain(
          config,
          origin,
          checkpoints,
          this.log,
          this.onEvent,
          this.onConnect,
          memory,
          (tag) => [...this.domains.values()].find((o) => o.name !== config.name && domainTag(o.name) === tag)?.name,
        );
      }),
    );
  }

  private enlist(d: Domain): Domain {
    this.domains.set(d.name, d);
    d.start();
    return d;
  }
}
