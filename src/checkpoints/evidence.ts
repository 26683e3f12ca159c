/**
 * Bitmap evidence: what qbackupd has seen of each checkpoint's bitmaps, so
 * that a bitmap changed behind its back (removed and re-added, cleared,
 * disabled for a while) is still caught at a later check, when QEMU's
 * present view of the bitmap looks healthy again.
 *
 * At every check (checkpoint create, reconcile on connect and on listing,
 * requireValid before an incremental, after a backup) the manager hands the
 * bitmaps QEMU reports to `evidenceObserve`, which compares them with what
 * was seen before and marks a checkpoint's disk **tainted**, for good, when:
 *
 * - the bitmap is missing from the node it was seen on (a bitmap of that
 *   name added later records only from then on);
 * - it is inconsistent, or not persistent (ours are created persistent, and
 *   no QMP command changes that: it was recreated), or persistent where the
 *   checkpoint made it volatile (a raw disk's);
 * - a volatile bitmap is missing, on whatever node (it cannot come back);
 * - a volatile bitmap is there without its live marker (`liveMarker`): a
 *   bitmap of that name was added in another QEMU process or after the disk
 *   was re-attached (fixed node names make it look the same), and it records
 *   only from then on;
 * - its granularity changed (recreated);
 * - the disk shrank (block_resize): QEMU drops the bits beyond the new end,
 *   and a later grow adds clean bits over what now reads as zeros, so an
 *   incremental would bring back the full backup's old data there; the count
 *   falls only if a bit beyond the new end was set;
 * - its dirty count fell (cleared, or removed and re-added): in this
 *   daemon's scheme a checkpoint's bitmap records from its creation on and
 *   nothing of ours ever clears or merges into it, so its count never falls;
 * - it is not recording (every write while it was disabled is missing);
 * - it has fewer dirty bytes than the bitmap of a checkpoint created after
 *   it was first seen, on the same disk, at the same granularity: each
 *   write the newer bitmap recorded hit the older one too, so the newer
 *   one is a subset of it; a newer count above the older one means the
 *   older missed writes.
 *
 * Before an incremental, verify.ts compares the bits themselves with the
 * newer checkpoints' (evidenceTaintLacking records what it finds).
 *
 * What this cannot see (docs/checkpoints.md has the list): any change that
 * happens and is undone between two checks and leaves the counts in order —
 * a remove and re-add, or a clear, followed by enough writes to push the
 * count back above the last value seen, or a disable/write/enable while
 * other writes keep the count growing, on a disk where no newer checkpoint
 * witnesses the writes.
 *
 * The file `<stateDir>/checkpoint/<domain>/.bitmaps.json` is written
 * atomically and durably (like the checkpoint metadata beside it) whenever
 * what it records changes. This module never talks to QEMU, and nothing here
 * ever clears a taint: only deleting the checkpoint drops its evidence.
 */
import { createHash } from "node:crypto";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { ResultAsync } from "neverthrow";
import type { CheckpointDefFull } from "../conf/checkpoint.js";
import type { Logger } from "../log.js";
import type { DirtyBitmap, DiskInfo } from "../qmp/disks.js";
import { type IoError, ioError, writeFileAtomic } from "../util/atomic-file.js";
import type { CheckpointMap } from "./tree.js";

export const EVIDENCE_FILE = ".bitmaps.json";

/** Why a volatile bitmap that is not there can never come back. */
export const VOLATILE_GONE =
  "it was volatile (the disk is raw: QEMU keeps its bitmap in memory only), so it did not outlive the QEMU process or the disk's attachment (QEMU restarted, or the disk was re-attached); a new full backup with a new checkpoint starts again";

/**
 * The live marker of a checkpoint's volatile bitmap on one disk: an empty,
 * disabled, volatile bitmap added in the same transaction. A volatile bitmap
 * of the checkpoint's name shows nothing else that tells it from one added
 * later (in a new QEMU process, or on a re-attached node of the same name)
 * before qbackupd looked: it is the checkpoint's only while the marker is
 * beside it. Named from the checkpoint's name, creation time and disk, so
 * that nothing has to be stored (a redefine brings it back) and nobody adds
 * one by chance.
 */
export function liveMarker(def: Pick<CheckpointDefFull, "name" | "creationTime">, disk: string): string {
  const h = createHash("sha256").update(`${def.name}\0${def.creationTime}\0${disk}`).digest("hex");
  return `${LIVE_PREFIX}${h.slice(0, 40)}`;
}
export const LIVE_PREFIX = "qbk-live-";

/** Why a volatile bitmap whose live marker is gone is not the checkpoint's. */
export const LIVE_MARKER_GONE =
  "its live marker (a bitmap qbackupd adds beside it) is not there, so it is not the bitmap the checkpoint created: one added again under the checkpoint's name (in another QEMU process, or after the disk was re-attached) records only from then on (or the checkpoint is older than live markers); a new full backup with a new checkpoint starts again";

/** Why a checkpoint's bitmap on one disk can never be trusted again. */
export interface BitmapTaint {
  readonly reason: string;
  /** Unix seconds of the check that found it. */
  readonly at: number;
}

/** The bitmap as QEMU reported it at a check. */
export interface BitmapSighting {
  readonly granularity: number;
  readonly persistent: boolean;
  readonly recording: boolean;
  /** Dirty bytes. */
  readonly count: number;
  /** The node the disk's bitmaps were on (its format node); absent in files from before it was recorded. */
  readonly node?: string;
  /** The disk's virtual size in bytes; absent in files from before it was recorded. */
  readonly size?: number;
  /** Unix seconds of the first check that saw these values (unchanged checks do not rewrite the file). */
  readonly at: number;
}

export interface DiskEvidence {
  readonly bitmap: string;
  readonly seen?: BitmapSighting;
  /** Generation of the check that first saw this bitmap (see EvidenceBook.gen). */
  readonly firstSeenGen?: number;
  readonly taint?: BitmapTaint;
}

export interface CheckpointEvidence {
  /**
   * The evidence generation when the checkpoint was prepared: every bitmap
   * first seen at a generation ≤ this existed before this checkpoint's
   * bitmaps were added, so it must hold every write they hold. Absent for
   * checkpoints not created by this daemon (redefined, or from before
   * evidence was kept): they are never the newer side of a comparison.
   */
  readonly bornAfterGen?: number;
  readonly disks: Readonly<Record<string, DiskEvidence>>;
}

export interface EvidenceBook {
  readonly version: 1;
  /** Incremented by each check that sees a bitmap for the first time. */
  readonly gen: number;
  readonly checkpoints: Readonly<Record<string, CheckpointEvidence>>;
}

export const emptyBook = (): EvidenceBook => ({ version: 1, gen: 0, checkpoints: {} });

export interface Observation {
  readonly book: EvidenceBook;
  /** Taints found by this check. */
  readonly found: readonly { checkpoint: string; disk: string; reason: string }[];
}

function iso(unix: number): string {
  return new Date(unix * 1000).toISOString().replace(/\.000Z$/, "Z");
}

function sightingTaint(
  b: DirtyBitmap,
  prev: BitmapSighting | undefined,
  now: number,
  volatile: boolean,
  marked: boolean,
  size: number,
): string | undefined {
  const behind = "behind qbackupd's back";
  if (volatile && !marked) return `it was not the checkpoint's at ${iso(now)}: ${LIVE_MARKER_GONE}`;
  if (prev?.size !== undefined && size < prev.size)
    return `the disk shrank from ${prev.size} to ${size} bytes between ${iso(prev.at)} and ${iso(now)}: the bitmap lost its bits beyond the new end, and what reads there after a grow (zeros) is in no bitmap, so an incremental would bring back the old data`;
  if (b.inconsistent) return `it was marked inconsistent at ${iso(now)} (QEMU did not shut down cleanly)`;
  if (!b.persistent && !volatile)
    return `it was not persistent at ${iso(now)}: qbackupd creates them persistent, so it was removed and re-added ${behind}`;
  if (b.persistent && volatile)
    return `it was persistent at ${iso(now)}: qbackupd created it volatile (a raw disk's), so it was removed and re-added ${behind}`;
  if (prev !== undefined && b.granularity !== prev.granularity)
    return `its granularity changed from ${prev.granularity} to ${b.granularity} bytes between ${iso(prev.at)} and ${iso(now)}: it was removed and re-added ${behind}`;
  if (prev !== undefined && b.count < prev.count)
    return `its dirty count fell from ${prev.count} to ${b.count} bytes between ${iso(prev.at)} and ${iso(now)}: it was cleared, or removed and re-added, ${behind}`;
  if (!b.recording)
    return `it was not recording at ${iso(now)}: it was disabled ${behind}, and guest writes while it was disabled are missing from it`;
  return undefined;
}

/**
 * Compare QEMU's bitmaps with the evidence and return the updated evidence
 * (the same object when nothing changed, so the caller writes only changes).
 * `skip` names checkpoints whose evidence changed while QEMU was being
 * queried (created or deleted meanwhile): this view of them is stale.
 * `inactive` names nodes QEMU holds inactive (incoming migration): their
 * bitmaps are not loaded, so nothing is learnt about them.
 */
export function evidenceObserve(
  book: EvidenceBook,
  defs: CheckpointMap,
  disks: readonly DiskInfo[],
  now: number,
  skip: ReadonlySet<string> = new Set(),
  inactive: ReadonlySet<string> = new Set(),
): Observation {
  const byDisk = new Map(
    disks.filter((d) => !inactive.has(d.nodeName)).map((d) => [d.name, { disk: d, bitmaps: new Map(d.bitmaps.map((b) => [b.name, b])) }]),
  );
  const gen = book.gen + 1;
  let sawNew = false;
  let changed = false;
  const found: { checkpoint: string; disk: string; reason: string }[] = [];
  const out: Record<string, CheckpointEvidence> = {};
  for (const [name, ev] of Object.entries(book.checkpoints)) {
    // evidence of checkpoints no longer in the store is dropped (unless it changed under this check)
    if (defs.has(name) || skip.has(name)) out[name] = ev;
    else changed = true;
  }
  for (const def of defs.values()) {
    if (skip.has(def.name)) continue;
    const ev: CheckpointEvidence = out[def.name] ?? { disks: {} };
    let evDisks: Record<string, DiskEvidence> | undefined;
    const set = (disk: string, de: DiskEvidence): void => {
      evDisks ??= { ...ev.disks };
      evDisks[disk] = de;
    };
    if (out[def.name] === undefined) changed = true;
    for (const d of def.disks) {
      if (d.checkpoint !== "bitmap" || d.bitmap === undefined) continue;
      // a disk gone from the domain is reported by validity as it is; it may come back with its image
      const disk = byDisk.get(d.name);
      if (disk === undefined) continue;
      let de = ev.disks[d.name];
      if (de !== undefined && de.bitmap !== d.bitmap) de = undefined;
      const base: DiskEvidence = de ?? { bitmap: d.bitmap };
      const taint = (reason: string): BitmapTaint => {
        found.push({ checkpoint: def.name, disk: d.name, reason });
        return { reason, at: now };
      };
      const b = disk.bitmaps.get(d.bitmap);
      if (b === undefined) {
        // On another node than where it was seen, the disk's graph changed (an external snapshot puts an
        // overlay without bitmaps on top; a commit brings the base and its bitmaps back, which then also
        // hold every committed write): validity reports it missing for now, but that is no proof of tampering.
        // A volatile bitmap missing is gone for good, wherever it was: QEMU lost it (restart, re-attach), and one
        // of that name seen later is not ours (node names of a new QEMU process may differ, so the node says nothing).
        const sameNode = base.seen?.node === undefined || base.seen.node === disk.disk.nodeName;
        if (base.taint === undefined && d.volatile === true)
          set(d.name, { ...base, taint: taint(`it was gone at ${iso(now)}: ${VOLATILE_GONE}`) });
        else if (base.taint === undefined && sameNode)
          set(d.name, {
            ...base,
            taint: taint(
              `it was missing at ${iso(now)}: removed behind qbackupd's back (a bitmap of that name added later records only from then on)`,
            ),
          });
        continue;
      }
      const prev = base.seen;
      const marked = d.volatile !== true || disk.bitmaps.has(liveMarker(def, d.name));
      const size = disk.disk.virtualSize;
      const reason = base.taint === undefined ? sightingTaint(b, prev, now, d.volatile === true, marked, size) : undefined;
      const node = disk.disk.nodeName;
      const same =
        prev !== undefined &&
        prev.granularity === b.granularity &&
        prev.persistent === b.persistent &&
        prev.recording === b.recording &&
        prev.count === b.count &&
        prev.node === node &&
        prev.size === size;
      if (same && de !== undefined && base.firstSeenGen !== undefined && reason === undefined) continue;
      let firstSeenGen = base.firstSeenGen;
      if (firstSeenGen === undefined) {
        firstSeenGen = gen;
        sawNew = true;
      }
      set(d.name, {
        ...base,
        seen: same
          ? prev
          : { granularity: b.granularity, persistent: b.persistent, recording: b.recording, count: b.count, node, size, at: now },
        firstSeenGen,
        ...(reason !== undefined ? { taint: taint(reason) } : {}),
      });
    }
    if (evDisks !== undefined) {
      out[def.name] = { ...ev, disks: evDisks };
      changed = true;
    } else out[def.name] = ev;
  }
  if (crossCheck(out, defs, byDisk, now, found, skip)) changed = true;
  if (!changed) return { book, found };
  return { book: { version: 1, gen: sawNew ? gen : book.gen, checkpoints: out }, found };
}

/**
 * The newer-is-a-subset rule. For checkpoints A and B on one disk, where A's
 * bitmap was seen before B was prepared (A.firstSeenGen ≤ B.bornAfterGen),
 * both present, recording and of the same granularity: every write B
 * recorded also set A's bits, so count(A) ≥ count(B). Otherwise A missed
 * writes. (B having more than it should — bits merged into it by someone —
 * would also break the rule; an over-full bitmap loses no data, but A is
 * then refused wrongly; docs/checkpoints.md says so.) Both counts come from
 * one query: QEMU reads every bitmap of a node under the lock a write holds
 * while it sets its bits in all of them (block/dirty-bitmap.c), so the
 * counts are one consistent snapshot. A is never its own witness: its
 * first sighting comes after its own preparation (firstSeenGen >
 * bornAfterGen). Returns whether anything was tainted.
 */
function crossCheck(
  out: Record<string, CheckpointEvidence>,
  defs: CheckpointMap,
  byDisk: ReadonlyMap<string, { bitmaps: ReadonlyMap<string, DirtyBitmap> }>,
  now: number,
  found: { checkpoint: string; disk: string; reason: string }[],
  skip: ReadonlySet<string>,
): boolean {
  interface Entry {
    readonly name: string;
    readonly b: DirtyBitmap;
    readonly firstSeenGen: number | undefined;
    readonly bornAfterGen: number | undefined;
  }
  // disk → granularity → entries
  const groups = new Map<string, Map<number, Entry[]>>();
  for (const def of defs.values()) {
    if (skip.has(def.name)) continue;
    const ev = out[def.name];
    if (ev === undefined) continue;
    for (const d of def.disks) {
      if (d.checkpoint !== "bitmap" || d.bitmap === undefined) continue;
      const b = byDisk.get(d.name)?.bitmaps.get(d.bitmap);
      const de = ev.disks[d.name];
      if (b === undefined || de === undefined || !b.recording || b.inconsistent) continue;
      const perGran = groups.get(d.name) ?? new Map<number, Entry[]>();
      groups.set(d.name, perGran);
      const list = perGran.get(b.granularity) ?? [];
      perGran.set(b.granularity, list);
      list.push({ name: def.name, b, firstSeenGen: de.firstSeenGen, bornAfterGen: ev.bornAfterGen });
    }
  }
  let tainted = false;
  for (const [disk, perGran] of groups) {
    for (const list of perGran.values()) {
      // witnesses, latest-prepared first, each with the largest count among those prepared at or after it
      const witnesses = list.filter((e) => e.bornAfterGen !== undefined).sort((x, y) => y.bornAfterGen! - x.bornAfterGen!);
      const best: Entry[] = [];
      for (const [i, w] of witnesses.entries()) best.push(i > 0 && best[i - 1]!.b.count >= w.b.count ? best[i - 1]! : w);
      for (const a of list) {
        const ev = out[a.name]!;
        const de = ev.disks[disk]!;
        if (de.taint !== undefined || a.firstSeenGen === undefined) continue;
        // the last witness prepared at or after A's first sighting: binary search on the descending order
        let lo = 0;
        let hi = witnesses.length;
        while (lo < hi) {
          const mid = (lo + hi) >> 1;
          if (witnesses[mid]!.bornAfterGen! >= a.firstSeenGen) lo = mid + 1;
          else hi = mid;
        }
        const witness = lo > 0 ? best[lo - 1]! : undefined;
        if (witness === undefined || witness === a || witness.b.count <= a.b.count) continue;
        const reason =
          `it has ${a.b.count} dirty bytes at ${iso(now)}, fewer than the ${witness.b.count} of checkpoint '${witness.name}', ` +
          `created after it on the same disk: it missed guest writes (disabled, cleared or removed and re-added behind qbackupd's back)`;
        found.push({ checkpoint: a.name, disk, reason });
        out[a.name] = { ...ev, disks: { ...ev.disks, [disk]: { ...de, taint: { reason, at: now } } } };
        tainted = true;
      }
    }
  }
  return tainted;
}

/** The exact check (verify.ts) found a checkpoint's bitmap lacking bits that newer ones hold: taint that disk. */
export function evidenceTaintLacking(
  book: EvidenceBook,
  name: string,
  f: { disk: string; bitmap: string; lacking: number; newer: readonly string[] },
  now: number,
): EvidenceBook {
  const ev = book.checkpoints[name];
  const de = ev?.disks[f.disk];
  if (ev === undefined || de === undefined || de.taint !== undefined) return book;
  const reason =
    `it lacks ${f.lacking} dirty bytes at ${iso(now)} that the bitmaps of checkpoints created after it on the same disk ` +
    `(${f.newer.map((n) => `'${n}'`).join(", ")}) hold: it missed guest writes (disabled, cleared or removed and re-added behind qbackupd's back)`;
  return {
    ...book,
    checkpoints: { ...book.checkpoints, [name]: { ...ev, disks: { ...ev.disks, [f.disk]: { ...de, taint: { reason, at: now } } } } },
  };
}

/** Taints of one checkpoint, disk → reason. */
export function evidenceTaints(book: EvidenceBook, def: CheckpointDefFull): Map<string, BitmapTaint> {
  const m = new Map<string, BitmapTaint>();
  const ev = book.checkpoints[def.name];
  if (ev === undefined) return m;
  for (const d of def.disks) {
    const de = ev.disks[d.name];
    if (d.checkpoint === "bitmap" && de?.taint !== undefined && de.bitmap === d.bitmap) m.set(d.name, de.taint);
  }
  return m;
}

/** A checkpoint just created by us: its bitmaps were added after every bitmap first seen up to `gen`. */
export function evidenceBorn(book: EvidenceBook, name: string, gen: number): EvidenceBook {
  return { ...book, checkpoints: { ...book.checkpoints, [name]: { bornAfterGen: gen, disks: {} } } };
}

/** A checkpoint (re)defined from XML: no history, its first sighting is the baseline. */
export function evidenceDefined(book: EvidenceBook, name: string): EvidenceBook {
  if (book.checkpoints[name] !== undefined) return book;
  return { ...book, checkpoints: { ...book.checkpoints, [name]: { disks: {} } } };
}

export function evidenceDrop(book: EvidenceBook, names: readonly string[]): EvidenceBook {
  if (!names.some((n) => book.checkpoints[n] !== undefined)) return book;
  const checkpoints = { ...book.checkpoints };
  for (const n of names) delete checkpoints[n];
  return { ...book, checkpoints };
}

function isBook(x: unknown): x is EvidenceBook {
  if (typeof x !== "object" || x === null) return false;
  const o = x as Record<string, unknown>;
  return o.version === 1 && typeof o.gen === "number" && typeof o.checkpoints === "object" && o.checkpoints !== null;
}

/** Load a domain's evidence; a missing file is an empty book, an unreadable one is logged and replaced. */
export function evidenceLoad(dir: string, log: Logger): ResultAsync<EvidenceBook, IoError> {
  const path = join(dir, EVIDENCE_FILE);
  return ResultAsync.fromPromise(
    readFile(path, "utf8").then(
      (text) => {
        let parsed: unknown;
        try {
          parsed = JSON.parse(text);
        } catch (e) {
          parsed = e;
        }
        if (isBook(parsed)) return parsed;
        // only a hand edit gets here (writes are atomic); the first checks rebuild a baseline
        log.error({ file: path }, "bitmap evidence unreadable; starting over from what QEMU shows now");
        return emptyBook();
      },
      (e: NodeJS.ErrnoException) => {
        if (e.code === "ENOENT") return emptyBook();
        throw e;
      },
    ),
    (e) => ioError(`cannot read ${path}`, e),
  );
}

export function evidenceSave(dir: string, book: EvidenceBook): ResultAsync<void, IoError> {
  return writeFileAtomic(join(dir, EVIDENCE_FILE), `${JSON.stringify(book, null, 1)}\n`);
}
