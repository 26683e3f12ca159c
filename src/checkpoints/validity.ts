/**
 * Is a checkpoint's bitmap trustworthy? Pure: compares checkpoint metadata
 * with the disks and bitmaps QEMU reports, and with the evidence of earlier
 * checks (evidence.ts). A checkpoint is invalid when any of its bitmaps is
 * missing, marked inconsistent (QEMU crashed with it loaded), not
 * persistent (unless the checkpoint made it volatile: a raw disk's, gone for
 * good once missing), not recording, or busy without a job of ours holding it — or
 * when the evidence says it was ever so, or was cleared, recreated or missed
 * writes behind our back, even if it looks healthy now. An invalid
 * checkpoint can never be the base of an incremental. Each checkpoint's
 * bitmap stands alone in this daemon's scheme (no chain of merged bitmaps),
 * so one checkpoint's problems never make another invalid.
 */
import type { CheckpointDefFull } from "../conf/checkpoint.js";
import type { DiskInfo } from "../qmp/disks.js";
import { type EvidenceBook, emptyBook, evidenceTaints, LIVE_MARKER_GONE, liveMarker, VOLATILE_GONE } from "./evidence.js";
import type { CheckpointMap } from "./tree.js";
import { VERIFY_PREFIX } from "./verify.js";

export interface UnclaimedBitmap {
  readonly disk: string;
  readonly bitmap: string;
  readonly persistent: boolean;
}

export interface Assessment {
  /** checkpoint name → problems (empty when valid). */
  readonly problems: ReadonlyMap<string, readonly string[]>;
  /** Bitmaps in QEMU that no checkpoint claims (reported, never deleted). */
  readonly unclaimed: readonly UnclaimedBitmap[];
}

export function checkpointProblems(
  def: CheckpointDefFull,
  disks: readonly DiskInfo[],
  inUse: ReadonlySet<string> = new Set(),
  evidence: EvidenceBook = emptyBook(),
  /** Only these disks of the checkpoint matter (an incremental of some disks); default: all. */
  only?: ReadonlySet<string>,
): string[] {
  const problems: string[] = [];
  const byName = new Map(disks.map((d) => [d.name, d]));
  const taints = evidenceTaints(evidence, def);
  for (const d of def.disks) {
    if (only !== undefined && !only.has(d.name)) continue;
    const before = problems.length;
    if (d.checkpoint !== "bitmap" || d.bitmap === undefined) continue;
    const disk = byName.get(d.name);
    if (disk === undefined) {
      problems.push(`disk '${d.name}' is gone from the domain`);
      continue;
    }
    const b = disk.bitmaps.find((x) => x.name === d.bitmap);
    const where = `bitmap '${d.bitmap}' on disk '${d.name}'`;
    const layer = b === undefined ? disk.below.find((l) => l.bitmaps.some((x) => x.name === d.bitmap)) : undefined;
    if (b === undefined && d.volatile === true) problems.push(`${where} is gone: ${VOLATILE_GONE}`);
    else if (layer !== undefined)
      problems.push(
        `${where} is on a backing layer (node '${layer.nodeName}'): an overlay was put on top of it (an external snapshot), so the guest's writes since then are not in it`,
      );
    else if (b === undefined) problems.push(`${where} is missing`);
    else if (b.inconsistent) problems.push(`${where} is inconsistent (QEMU did not shut down cleanly)`);
    else if (!b.persistent && d.volatile !== true) problems.push(`${where} is not persistent`);
    else if (b.persistent && d.volatile === true) problems.push(`${where} is persistent, but qbackupd made it volatile: it was recreated`);
    else if (d.volatile === true && !disk.bitmaps.some((x) => x.name === liveMarker(def, d.name)))
      problems.push(`${where} is not the checkpoint's: ${LIVE_MARKER_GONE}`);
    else if (!b.recording) problems.push(`${where} is not recording guest writes`);
    else if (b.busy && !inUse.has(`${d.name}/${d.bitmap}`)) problems.push(`${where} is busy (in use by another job)`);
    // what is wrong now says enough; otherwise what was seen wrong before, which no later state undoes
    const taint = taints.get(d.name);
    if (problems.length === before && taint !== undefined) problems.push(`${where} cannot be trusted: ${taint.reason}`);
  }
  return problems;
}

/** Problems known from the evidence alone (no QEMU view at hand). */
export function evidenceProblems(def: CheckpointDefFull, evidence: EvidenceBook): string[] {
  return [...evidenceTaints(evidence, def)].map(
    ([disk, t]) => `bitmap '${def.disks.find((d) => d.name === disk)?.bitmap}' on disk '${disk}' cannot be trusted: ${t.reason}`,
  );
}

export function assessCheckpoints(
  all: CheckpointMap,
  disks: readonly DiskInfo[],
  inUse: ReadonlySet<string> = new Set(),
  evidence: EvidenceBook = emptyBook(),
): Assessment {
  const problems = new Map<string, string[]>();
  const claimed = new Set<string>();
  for (const def of all.values()) {
    problems.set(def.name, checkpointProblems(def, disks, inUse, evidence));
    for (const d of def.disks) {
      if (d.bitmap !== undefined) claimed.add(`${d.name}/${d.bitmap}`);
      if (d.bitmap !== undefined && d.volatile === true) claimed.add(`${d.name}/${liveMarker(def, d.name)}`);
    }
  }
  const unclaimed: UnclaimedBitmap[] = [];
  for (const disk of disks) {
    for (const b of disk.bitmaps) {
      const key = `${disk.name}/${b.name}`;
      // the exact check's temporaries, there for the moment of a check
      if (b.name.startsWith(VERIFY_PREFIX)) continue;
      if (!claimed.has(key) && !inUse.has(key)) unclaimed.push({ disk: disk.name, bitmap: b.name, persistent: b.persistent });
    }
  }
  return { problems, unclaimed };
}
