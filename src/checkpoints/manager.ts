/**
 * Checkpoint operations of one domain, on top of the store and a QMP client:
 * create (bitmaps added in one transaction, optionally with the guest
 * frozen), redefine, delete, reconcile with QEMU, and XML with sizes.
 *
 * Bitmap scheme (libvirt's since 6.x): every checkpoint's bitmap stays
 * active from creation on, so "changes since X" is exactly bitmap X on each
 * disk. Deleting any checkpoint is then just removing its bitmaps: no other
 * checkpoint's bitmap depends on it, so every incremental from every
 * remaining checkpoint stays exact. The cost is one bit set per active bitmap
 * per guest write; docs/checkpoints.md has the reasoning.
 *
 * Every look at QEMU's bitmaps (create, reconcile, requireValid, redefine)
 * is also recorded as evidence (evidence.ts), so that a bitmap removed and
 * re-added, cleared or disabled behind our back stays invalid after it
 * looks healthy again. Evidence updates run one at a time, in order; none
 * is ever cleared except by deleting its checkpoint.
 */
import { errAsync, okAsync, ResultAsync } from "neverthrow";
import { withFrozenGuest } from "../agent/quiesce.js";
import {
  type CheckpointDef,
  type CheckpointDefFull,
  checkpointDefAlign,
  checkpointDefFormat,
  checkpointDefParse,
  type DomainDiskSummary,
} from "../conf/checkpoint.js";
import type { Logger } from "../log.js";
import type { QmpClient } from "../qmp/client.js";
import { type DiskInfo, discoverDisks } from "../qmp/disks.js";
import { qmpErrorMessage } from "../qmp/errors.js";
import type { TransactionAction } from "../qmp/qapi.js";
import { type CheckpointError, fromAgent, fromQmp } from "./errors.js";
import {
  type EvidenceBook,
  evidenceBorn,
  evidenceDefined,
  evidenceDrop,
  evidenceLoad,
  evidenceObserve,
  evidenceSave,
  evidenceTaintLacking,
  liveMarker,
} from "./evidence.js";
import type { CheckpointStore } from "./store.js";
import { type CheckpointMap, descendants, topological } from "./tree.js";
import { type Assessment, assessCheckpoints, checkpointProblems, evidenceProblems } from "./validity.js";
import { verifySubsets } from "./verify.js";

export interface CheckpointManagerOptions {
  readonly logger: Logger;
  /** The domain's guest agent socket, for quiesce. */
  readonly agentPath?: string | undefined;
  /** Unix seconds; injectable for tests. */
  readonly now?: () => number;
}

export interface CreateOptions {
  readonly quiesce?: boolean;
}

export interface DeleteOptions {
  /** Delete the checkpoint and all its descendants. */
  readonly children?: boolean;
  /** Delete only the descendants, keep the checkpoint. */
  readonly childrenOnly?: boolean;
  /** Remove metadata only; bitmaps stay in QEMU. */
  readonly metadataOnly?: boolean;
}

export interface PreparedCheckpoint {
  readonly def: CheckpointDefFull;
  /** block-dirty-bitmap-add actions to put in the caller's transaction. */
  readonly actions: TransactionAction[];
}

/** Run states in which QEMU's bitmaps are not the guest's (incoming migration, handed over, loading or saving a VM state). */
const MIGRATION_STATES = new Set(["inmigrate", "finish-migrate", "postmigrate", "restore-vm", "save-vm"]);

/** The run state when it is one of MIGRATION_STATES; undefined otherwise, or when QEMU has no run state (qemu-storage-daemon). */
function migrationState(client: QmpClient): ResultAsync<string | undefined, CheckpointError> {
  return client
    .execute("query-status")
    .map((s) => (MIGRATION_STATES.has(s.status) ? s.status : undefined))
    .orElse(() => okAsync(undefined));
}

/** A claimed bitmap looks missing or not recording: the only cases where an inactive node matters. */
function looksSuspicious(disks: readonly DiskInfo[], defs: CheckpointMap): boolean {
  const byName = new Map(disks.map((d) => [d.name, d]));
  for (const def of defs.values()) {
    for (const d of def.disks) {
      const disk = byName.get(d.name);
      if (d.checkpoint !== "bitmap" || disk === undefined) continue;
      const b = disk.bitmaps.find((x) => x.name === d.bitmap);
      if (b === undefined || !b.recording) return true;
    }
  }
  return false;
}

/**
 * Nodes QEMU holds inactive (an incoming migration's images before the guest
 * runs there; QEMU 10 keeps them so until `cont`, and shows `active: false`):
 * their bitmaps are not loaded yet. If QEMU cannot say, every node counts as
 * inactive for this check.
 */
function inactiveNodes(client: QmpClient, disks: readonly DiskInfo[]): ResultAsync<Set<string>, CheckpointError> {
  return client
    .execute("query-named-block-nodes", { flat: true })
    .map((nodes) => new Set(nodes.filter((n) => (n as { active?: boolean }).active === false).map((n) => n["node-name"] ?? "")))
    .orElse(() => okAsync(new Set(disks.map((d) => d.nodeName))));
}

export function diskSummaries(disks: readonly DiskInfo[]): DomainDiskSummary[] {
  return disks.map((d) => ({ name: d.name, format: d.format, readOnly: d.readOnly }));
}

export class CheckpointManager {
  private assessment: Assessment | undefined;
  private readonly log: Logger;
  private readonly now: () => number;
  /** The evidence as last recorded; undefined until first loaded. */
  private book: EvidenceBook | undefined;
  /** Evidence updates, one after the other (load, change, durable write). */
  private queue: Promise<unknown> = Promise.resolve();
  /**
   * Bumped for a name whenever its checkpoint is created, redefined or
   * deleted: a QEMU view taken before the bump says nothing about the new
   * state and is not recorded for that name.
   */
  private readonly tokens = new Map<string, number>();
  private tokenClock = 0;
  /** Evidence generation at prepare(), per checkpoint name, until commit. */
  private readonly preparedAt = new Map<string, number>();

  constructor(
    readonly store: CheckpointStore,
    private readonly opts: CheckpointManagerOptions,
  ) {
    this.log = opts.logger.child({ domain: store.domain });
    this.now = opts.now ?? (() => Math.floor(Date.now() / 1000));
  }

  /** The last reconcile's view: problems per checkpoint and unclaimed bitmaps. */
  get lastAssessment(): Assessment | undefined {
    return this.assessment;
  }

  private setProblems(name: string, problems: string[] | undefined): void {
    if (this.assessment === undefined) return;
    const m = new Map(this.assessment.problems);
    if (problems === undefined) m.delete(name);
    else m.set(name, problems);
    this.assessment = { ...this.assessment, problems: m };
  }

  /** Problems of a checkpoint as of the last reconcile (undefined: not reconciled yet, and no evidence against it). */
  problemsOf(name: string): readonly string[] | undefined {
    const p = this.assessment?.problems.get(name);
    if (p !== undefined) return p;
    const def = this.store.get(name);
    if (def === undefined || this.book === undefined) return undefined;
    const e = evidenceProblems(def, this.book);
    return e.length > 0 ? e : undefined;
  }

  /** The evidence recorded so far (loaded on first use). */
  evidence(): ResultAsync<EvidenceBook, CheckpointError> {
    return this.updateEvidence((b) => b);
  }

  private bump(names: Iterable<string>): void {
    for (const n of names) this.tokens.set(n, ++this.tokenClock);
  }

  /**
   * Apply `change` to the evidence, in turn with every other change, and
   * write it durably when it changed. The change is kept in memory even if
   * the write fails (what was seen stays known until the daemon stops); the
   * write's error is returned.
   */
  private updateEvidence(change: (b: EvidenceBook) => EvidenceBook): ResultAsync<EvidenceBook, CheckpointError> {
    const run = async (): Promise<EvidenceBook> => {
      if (this.book === undefined) {
        const loaded = await evidenceLoad(this.store.dir, this.log);
        if (loaded.isErr()) throw loaded.error;
        this.book = loaded.value;
      }
      const before = this.book;
      const after = change(before);
      if (after === before) return before;
      this.book = after;
      const saved = await evidenceSave(this.store.dir, after);
      if (saved.isErr()) {
        this.log.error({ error: saved.error.message }, "cannot record bitmap evidence");
        throw saved.error;
      }
      return after;
    };
    const p = this.queue.then(run, run);
    this.queue = p.catch(() => undefined);
    return ResultAsync.fromPromise(p, (e) => e as CheckpointError);
  }

  /** Record one QEMU view as evidence; `tokens` is a copy of this.tokens taken before QEMU was asked. */
  private recordView(
    disks: readonly DiskInfo[],
    tokens: ReadonlyMap<string, number>,
    inactive: ReadonlySet<string> = new Set(),
  ): ResultAsync<EvidenceBook, CheckpointError> {
    return this.updateEvidence((book) => {
      const skip = new Set<string>();
      for (const [n, v] of this.tokens) if (tokens.get(n) !== v) skip.add(n);
      const obs = evidenceObserve(book, this.store.all, disks, this.now(), skip, inactive);
      for (const f of obs.found)
        this.log.error({ checkpoint: f.checkpoint, disk: f.disk, reason: f.reason }, "checkpoint bitmap changed behind our back: invalid");
      return obs.book;
    });
  }

  /**
   * Ask QEMU for its bitmaps and record what it shows — except while it is
   * migrating or loading a VM state: an incoming QEMU shows no bitmaps until
   * it takes over, and an outgoing one drops them when it hands over, which
   * says nothing about tampering. Asked before and after the bitmaps, so a
   * migration that starts or ends in between is noticed.
   */
  private look(client: QmpClient): ResultAsync<{ disks: DiskInfo[]; book: EvidenceBook }, CheckpointError> {
    const tokens = new Map(this.tokens);
    const disksNow = () => discoverDisks(client).mapErr((e) => fromQmp("cannot list disks and bitmaps", e));
    return migrationState(client).andThen((before) =>
      disksNow()
        .andThen((first) =>
          // A bitmap that looks missing may sit on a node not yet active. Nodes active now stay so (only a
          // migration, seen by the run state, makes them inactive), but may have been inactive at the first
          // look: look again, and learn nothing about the nodes still inactive.
          looksSuspicious(first, this.store.all)
            ? inactiveNodes(client, first).andThen((inactive) => disksNow().map((disks) => ({ disks, inactive })))
            : okAsync({ disks: first, inactive: new Set<string>() }),
        )
        .andThen(({ disks, inactive }) =>
          migrationState(client).andThen((after) => {
            const state = before ?? after;
            if (state === undefined) return this.recordView(disks, tokens, inactive).map((book) => ({ disks, book }));
            this.log.info({ state }, "QEMU is migrating or loading a VM state: its bitmaps are not recorded as evidence");
            return this.evidence().map((book) => ({ disks, book }));
          }),
        ),
    );
  }

  /**
   * Compare the store with QEMU's bitmaps (on connect, and whenever asked).
   * `inUse` lists "disk/bitmap" pairs a job of ours holds busy.
   */
  reconcile(client: QmpClient, inUse: ReadonlySet<string> = new Set()): ResultAsync<Assessment, CheckpointError> {
    return this.look(client).map(({ disks, book }) => {
      const a = assessCheckpoints(this.store.all, disks, inUse, book);
      // every listing reconciles: log what is new since the last view, not the same again each time
      const before = this.assessment;
      for (const [name, problems] of a.problems) {
        const was = before?.problems.get(name);
        if (problems.length > 0 && (was === undefined || was.join("\n") !== problems.join("\n")))
          this.log.warn({ checkpoint: name, problems }, "checkpoint is invalid");
      }
      const seen = new Set(before?.unclaimed.map((u) => `${u.disk}/${u.bitmap}`));
      for (const u of a.unclaimed)
        if (!seen.has(`${u.disk}/${u.bitmap}`))
          this.log.info({ disk: u.disk, bitmap: u.bitmap, persistent: u.persistent }, "bitmap not claimed by any checkpoint");
      this.assessment = a;
      return a;
    });
  }

  /**
   * Record the bitmaps' state after a backup ended (completed, failed or
   * cancelled): the job calls this once its own temporary bitmaps are gone,
   * so the next check compares against the counts as they were then.
   */
  recordAfterBackup(client: QmpClient): ResultAsync<Assessment, CheckpointError> {
    return this.reconcile(client);
  }

  /**
   * Look a checkpoint up and check it against QEMU *now*: the base of an
   * incremental is never trusted from a cached view. With `only`, just those
   * disks' bitmaps must hold (an incremental of some disks: a raw disk's
   * volatile bitmap gone with a QEMU restart does not stop one of the qcow2
   * disks); what is found wrong on the others is still recorded.
   */
  requireValid(
    client: QmpClient,
    name: string,
    inUse: ReadonlySet<string> = new Set(),
    only?: ReadonlySet<string>,
  ): ResultAsync<CheckpointDefFull, CheckpointError> {
    const def = this.store.get(name);
    if (def === undefined)
      return errAsync({ code: "not-found", message: `checkpoint '${name}' does not exist in domain '${this.store.domain}'` });
    return this.look(client).andThen(({ disks, book }) => {
      // this look is the freshest view: listings show what it found (taints of other checkpoints too)
      if (this.assessment !== undefined) {
        const problems = new Map<string, readonly string[]>();
        for (const c of this.store.all.values()) problems.set(c.name, checkpointProblems(c, disks, inUse, book));
        this.assessment = { ...this.assessment, problems };
      }
      const refuse = (problems: string[]) =>
        errAsync<never, CheckpointError>({
          code: "checkpoint-invalid",
          message: `checkpoint '${name}' cannot be used: ${problems.join("; ")}`,
          problems,
        });
      const problems = checkpointProblems(def, disks, inUse, book, only);
      if (problems.length > 0) return refuse(problems);
      // the counts say nothing against it: compare the bits with those of newer checkpoints
      return verifySubsets(client, def, this.store.all, disks, book)
        .orElse((e) => {
          this.log.warn({ checkpoint: name, error: qmpErrorMessage(e) }, "cannot compare the checkpoint's bitmaps with newer ones");
          return okAsync([]);
        })
        .andThen((findings) => {
          if (findings.length === 0) return okAsync(def);
          for (const f of findings)
            this.log.error(
              { checkpoint: name, disk: f.disk, lacking: f.lacking, newer: f.newer },
              "checkpoint bitmap missed guest writes: invalid",
            );
          const now = this.now();
          return this.updateEvidence((b) => findings.reduce((acc, f) => evidenceTaintLacking(acc, name, f, now), b))
            .orElse(() => okAsync(undefined)) // kept in memory all the same
            .andThen(() => {
              this.setProblems(name, checkpointProblems(def, disks, inUse, this.book));
              const p = checkpointProblems(def, disks, inUse, this.book, only);
              return p.length === 0 ? okAsync(def) : refuse(p);
            });
        });
    });
  }

  /** Align a definition with the domain and build its bitmap-add actions (for create, and for backups that create one). */
  prepare(def: CheckpointDef, disks: readonly DiskInfo[]): ResultAsync<PreparedCheckpoint, CheckpointError> {
    const aligned = checkpointDefAlign(def, diskSummaries(disks), {
      now: this.now(),
      ...(this.store.current ? { parent: this.store.current } : {}),
    });
    if (aligned.isErr()) return errAsync(aligned.error);
    const full = aligned.value;
    if (this.store.get(full.name) !== undefined) {
      return errAsync({ code: "duplicate", message: `checkpoint '${full.name}' already exists in domain '${this.store.domain}'` });
    }
    const nodes = new Map(disks.map((d) => [d.name, d]));
    const actions: TransactionAction[] = [];
    for (const d of full.disks) {
      if (d.checkpoint !== "bitmap" || d.bitmap === undefined) continue;
      const disk = nodes.get(d.name)!;
      if (disk.bitmaps.some((b) => b.name === d.bitmap)) {
        return errAsync({
          code: "duplicate",
          message: `disk '${d.name}' already has a bitmap named '${d.bitmap}' (not ours: see unclaimed bitmaps)`,
        });
      }
      // a raw disk has nowhere to store a bitmap: QEMU keeps it in memory (volatile, marked so in the checkpoint)
      actions.push({ type: "block-dirty-bitmap-add", data: { node: disk.nodeName, name: d.bitmap, persistent: d.volatile !== true } });
      // and its live marker (evidence.ts): empty, recording nothing, the largest granularity (a few bytes of memory)
      if (d.volatile === true)
        actions.push({
          type: "block-dirty-bitmap-add",
          data: { node: disk.nodeName, name: liveMarker(full, d.name), persistent: false, disabled: true, granularity: 2 ** 31 },
        });
    }
    // bitmaps first seen up to this generation exist before this checkpoint's are added
    return this.evidence().map((book) => {
      this.preparedAt.set(full.name, book.gen);
      return { def: full, actions };
    });
  }

  /** After QEMU created the bitmaps: persist and make current. On failure the caller discards the bitmaps. */
  commit(def: CheckpointDefFull): ResultAsync<CheckpointDefFull, CheckpointError> {
    const previous = this.store.current;
    const gen = this.preparedAt.get(def.name);
    this.preparedAt.delete(def.name);
    this.bump([def.name]);
    return this.store
      .save(def)
      .andThen(() =>
        this.store.setCurrent(def.name).orElse((e) =>
          // keep metadata and pointer in step: without the pointer, drop the metadata too
          this.store
            .remove(def.name)
            .andThen(() => errAsync(e))
            .orElse(() => errAsync(e)),
        ),
      )
      .map(() => {
        this.log.info({ checkpoint: def.name, parent: previous }, "checkpoint created");
        // QEMU just created its bitmaps: valid until the next reconcile says otherwise
        this.setProblems(def.name, []);
        return def;
      })
      .andThen((d) =>
        this.updateEvidence((b) => (gen === undefined ? evidenceDefined(evidenceDrop(b, [d.name]), d.name) : evidenceBorn(b, d.name, gen)))
          .orElse(() => okAsync(undefined))
          .map(() => d),
      );
  }

  /** Remove a prepared checkpoint's bitmaps from QEMU (rollback). */
  discard(client: QmpClient, prepared: PreparedCheckpoint): ResultAsync<void, CheckpointError> {
    const actions: TransactionAction[] = prepared.actions.map((a) => ({
      type: "block-dirty-bitmap-remove",
      data: { node: (a.data as { node: string }).node, name: (a.data as { name: string }).name },
    }));
    this.preparedAt.delete(prepared.def.name);
    if (actions.length === 0) return okAsync(undefined);
    return client
      .execute("transaction", { actions })
      .map(() => undefined)
      .mapErr((e) => fromQmp(`cannot roll back bitmaps of checkpoint '${prepared.def.name}'`, e));
  }

  /** virDomainCheckpointCreateXML: bitmaps in one transaction (guest frozen on request), then metadata. */
  create(client: QmpClient, xml: string | undefined, opts: CreateOptions = {}): ResultAsync<CheckpointDefFull, CheckpointError> {
    const parsed =
      xml === undefined ? okAsync<CheckpointDef, CheckpointError>({}) : checkpointDefParse(xml).asyncAndThen((d) => okAsync(d));
    return parsed.andThen((def) =>
      discoverDisks(client)
        .mapErr((e) => fromQmp("cannot list disks", e))
        .andThen((disks) => this.prepare(def, disks))
        .andThen((prepared) => {
          const run = (): ResultAsync<void, CheckpointError> =>
            client
              .execute("transaction", { actions: prepared.actions })
              .map(() => undefined)
              .mapErr((e) => fromQmp(`cannot create bitmaps for checkpoint '${prepared.def.name}'`, e));
          const created = opts.quiesce
            ? withFrozenGuest(this.opts.agentPath, this.log, run).mapErr((e) =>
                e.stage === "freeze" ? fromAgent("cannot quiesce the guest", e.error) : e.error,
              )
            : run();
          return created.andThen(() =>
            this.commit(prepared.def).orElse((e) =>
              this.discard(client, prepared)
                .orElse((rollback) => {
                  this.log.error({ checkpoint: prepared.def.name, error: rollback.message }, "rollback of bitmaps failed");
                  return okAsync(undefined);
                })
                .andThen(() => errAsync(e)),
            ),
          );
        })
        .andThen((created) =>
          // the first sighting of the new bitmaps: the baseline later checks compare with
          this.look(client)
            .map(() => created)
            .orElse(() => okAsync(created)),
        ),
    );
  }

  /** Restore metadata from XML (after a reinstall): no bitmaps are created; those named must exist in QEMU. */
  redefine(client: QmpClient, xml: string): ResultAsync<CheckpointDefFull, CheckpointError> {
    const parsed = checkpointDefParse(xml, { redefine: true });
    if (parsed.isErr()) return errAsync(parsed.error);
    const def = parsed.value;
    const name = def.name!;
    if (def.parent !== undefined && this.store.get(def.parent) === undefined) {
      return errAsync({
        code: "not-found",
        message: `parent checkpoint '${def.parent}' of '${name}' does not exist: redefine parents first`,
      });
    }
    if (def.disks === undefined) return errAsync({ code: "xml-invalid", message: `redefining checkpoint '${name}' needs its <disks>` });
    const tokens = new Map(this.tokens);
    return discoverDisks(client)
      .mapErr((e) => fromQmp("cannot list disks", e))
      .andThen((disks) => {
        const byName = new Map(disks.map((d) => [d.name, d]));
        const missing: { disk: string; bitmap: string }[] = [];
        const full: CheckpointDefFull = {
          ...def,
          name,
          creationTime: def.creationTime ?? this.now(),
          disks: def.disks!.map((d) => (d.checkpoint === "bitmap" ? { ...d, bitmap: d.bitmap ?? name } : d)),
        };
        for (const d of full.disks) {
          if (!byName.has(d.name))
            return errAsync<never, CheckpointError>({
              code: "unknown-disk",
              message: `checkpoint '${name}' names disk '${d.name}', which the domain does not have`,
            });
          if (d.checkpoint === "bitmap" && !byName.get(d.name)!.bitmaps.some((b) => b.name === d.bitmap))
            missing.push({ disk: d.name, bitmap: d.bitmap! });
        }
        if (missing.length > 0) {
          return errAsync<never, CheckpointError>({
            code: "bitmap-missing",
            message: `cannot redefine checkpoint '${name}': missing in QEMU: ${missing.map((m) => `bitmap '${m.bitmap}' on disk '${m.disk}'`).join(", ")}`,
            missing,
          });
        }
        const existing = this.store.get(name);
        if (existing !== undefined && JSON.stringify(existing.disks) !== JSON.stringify(full.disks)) {
          return errAsync<never, CheckpointError>({
            code: "duplicate",
            message: `checkpoint '${name}' exists with other disks; delete it (--metadata) first`,
          });
        }
        const current = this.store.current;
        const becomesCurrent = current === undefined || current === full.parent;
        // the same definition again keeps its evidence; a new one starts without history
        if (existing === undefined) this.bump([name]);
        // this view is the one the redefinition was checked against: it is the new checkpoint's first sighting
        const token = this.tokens.get(name);
        if (token !== undefined) tokens.set(name, token);
        return this.store
          .save(full)
          .andThen(() => (becomesCurrent ? this.store.setCurrent(name) : okAsync(undefined)))
          .andThen(() =>
            this.updateEvidence((b) => (existing === undefined ? evidenceDefined(evidenceDrop(b, [name]), name) : b))
              .andThen(() => this.recordView(disks, tokens))
              .orElse(() => okAsync(undefined)),
          )
          .map(() => full);
      });
  }

  /** virDomainCheckpointDelete with its flags (children, children-only, metadata-only). */
  delete(client: QmpClient | undefined, name: string, opts: DeleteOptions = {}): ResultAsync<string[], CheckpointError> {
    const def = this.store.get(name);
    if (def === undefined)
      return errAsync({ code: "not-found", message: `checkpoint '${name}' does not exist in domain '${this.store.domain}'` });
    const below = opts.children || opts.childrenOnly ? descendants(this.store.all, name, true) : [];
    const targets = opts.childrenOnly ? below : [def, ...below];
    const doomed = new Set(targets.map((t) => t.name));
    this.bump(doomed);
    const removeBitmaps: ResultAsync<void, CheckpointError> = opts.metadataOnly
      ? okAsync(undefined)
      : client === undefined
        ? errAsync({
            code: "qmp",
            message: "the domain is not connected; use --metadata to remove metadata only",
            cause: { code: "state", state: "idle", message: "not connected" },
          })
        : discoverDisks(client)
            .mapErr((e) => fromQmp("cannot list disks", e))
            .andThen((disks) => {
              const actions: TransactionAction[] = [];
              for (const t of targets) {
                for (const d of t.disks) {
                  const disk = disks.find((x) => x.name === d.name);
                  if (d.bitmap === undefined || disk === undefined) continue;
                  // on the disk's node, or on a layer below since an external snapshot (still ours: removed with it,
                  // unless QEMU holds that layer read-only, as it does backing layers: then QEMU refuses any change
                  // to it, and the bitmap stays, recording nothing); a bitmap already gone is not removed again;
                  // a volatile one's live marker goes with it
                  const names = [d.bitmap, ...(d.volatile === true ? [liveMarker(t, d.name)] : [])];
                  for (const n of names) {
                    const has = (bitmaps: readonly { name: string }[]) => bitmaps.some((b) => b.name === n);
                    const below = has(disk.bitmaps) ? undefined : disk.below.find((l) => has(l.bitmaps));
                    if (below?.readOnly === true) {
                      this.log.warn(
                        { checkpoint: t.name, disk: d.name, node: below.nodeName, bitmap: n },
                        "the checkpoint's bitmap stays on a read-only backing layer (qemu-img bitmap --remove takes it off once the image is not in use)",
                      );
                      continue;
                    }
                    const node = below?.nodeName ?? (has(disk.bitmaps) ? disk.nodeName : undefined);
                    if (node !== undefined) actions.push({ type: "block-dirty-bitmap-remove", data: { node, name: n } });
                  }
                }
              }
              if (actions.length === 0) return okAsync(undefined);
              return client
                .execute("transaction", { actions })
                .map(() => undefined)
                .mapErr((e) => fromQmp(`cannot remove bitmaps of checkpoint '${name}'`, e));
            });
    return removeBitmaps.andThen(() => this.dropMetadata(targets, doomed));
  }

  /** Remove metadata leaves-first, re-parenting survivors and moving `current` to the nearest survivor. */
  private dropMetadata(targets: readonly CheckpointDefFull[], doomed: ReadonlySet<string>): ResultAsync<string[], CheckpointError> {
    const survivorAncestor = (n: string | undefined): string | undefined => {
      let cur = n;
      while (cur !== undefined && doomed.has(cur)) cur = this.store.get(cur)?.parent;
      return cur;
    };
    const order = topological(this.store.all)
      .filter((c) => doomed.has(c.name))
      .reverse();
    const current = this.store.current;
    const newCurrent = current !== undefined && doomed.has(current) ? survivorAncestor(current) : current;
    let chain: ResultAsync<void, CheckpointError> = okAsync(undefined);
    // survivors whose parent goes away get the nearest surviving ancestor
    for (const c of this.store.all.values()) {
      if (doomed.has(c.name) || c.parent === undefined || !doomed.has(c.parent)) continue;
      const parent = survivorAncestor(c.parent);
      const { parent: _old, ...rest } = c;
      const updated: CheckpointDefFull = parent === undefined ? rest : { ...rest, parent };
      chain = chain.andThen(() => this.store.save(updated));
    }
    chain = chain.andThen(() => this.store.setCurrent(newCurrent));
    for (const c of order) chain = chain.andThen(() => this.store.remove(c.name));
    return chain
      .map(() => {
        for (const c of order) this.setProblems(c.name, undefined);
        this.log.info({ deleted: order.map((c) => c.name), current: newCurrent }, "checkpoints deleted");
        return targets.map((t) => t.name);
      })
      .andThen((names) =>
        // a failed write leaves stale entries, which the next check drops (their checkpoints are gone)
        this.updateEvidence((b) => evidenceDrop(b, names))
          .orElse(() => okAsync(undefined))
          .map(() => names),
      );
  }

  /** The checkpoint's XML; with `size`, each disk's bytes changed since it (from QEMU's bitmap counts). */
  xml(client: QmpClient | undefined, name: string, opts: { size?: boolean } = {}): ResultAsync<string, CheckpointError> {
    const def = this.store.get(name);
    if (def === undefined)
      return errAsync({ code: "not-found", message: `checkpoint '${name}' does not exist in domain '${this.store.domain}'` });
    if (!opts.size) return okAsync(checkpointDefFormat(def));
    if (client === undefined)
      return errAsync({
        code: "qmp",
        message: "sizes need a connected domain",
        cause: { code: "state", state: "idle", message: "not connected" },
      });
    return this.sizes(client, def).map((withSizes) => checkpointDefFormat(withSizes, { size: true }));
  }

  sizes(client: QmpClient, def: CheckpointDefFull): ResultAsync<CheckpointDefFull, CheckpointError> {
    return discoverDisks(client)
      .mapErr((e) => fromQmp("cannot list bitmaps", e))
      .map((disks) => ({
        ...def,
        disks: def.disks.map((d) => {
          const b = disks.find((x) => x.name === d.name)?.bitmaps.find((x) => x.name === d.bitmap);
          return d.checkpoint === "bitmap" && b !== undefined ? { ...d, size: b.count } : d;
        }),
      }));
  }
}
