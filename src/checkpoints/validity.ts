/**
 * Is a checkpoint's bitmap trustworthy? Pure: compares checkpoint metadata
 * with the disks and bitmaps QEMU reports. A checkpoint is invalid when any
 * of its bitmaps is missing, marked inconsistent (QEMU crashed with it
 * loaded), not persistent, not recording, or busy without a job of ours
 * holding it. An invalid checkpoint can never be the base of an incremental.
 */
import type { CheckpointDefFull } from "../conf/checkpoint.js";
import type { DiskInfo } from "../qmp/disks.js";
import type { CheckpointMap } from "./tree.js";

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

export function checkpointProblems(def: CheckpointDefFull, disks: readonly DiskInfo[], inUse: ReadonlySet<string> = new Set()): string[] {
  const problems: string[] = [];
  const byName = new Map(disks.map((d) => [d.name, d]));
  for (const d of def.disks) {
    if (d.checkpoint !== "bitmap" || d.bitmap === undefined) continue;
    const disk = byName.get(d.name);
    if (disk === undefined) {
      problems.push(`disk '${d.name}' is gone from the domain`);
      continue;
    }
    const b = disk.bitmaps.find((x) => x.name === d.bitmap);
    const where = `bitmap '${d.bitmap}' on disk '${d.name}'`;
    if (b === undefined) problems.push(`${where} is missing`);
    else if (b.inconsistent) problems.push(`${where} is inconsistent (QEMU did not shut down cleanly)`);
    else if (!b.persistent) problems.push(`${where} is not persistent`);
    else if (!b.recording) problems.push(`${where} is not recording guest writes`);
    else if (b.busy && !inUse.has(`${d.name}/${d.bitmap}`)) problems.push(`${where} is busy (in use by another job)`);
  }
  return problems;
}

export function assessCheckpoints(all: CheckpointMap, disks: readonly DiskInfo[], inUse: ReadonlySet<string> = new Set()): Assessment {
  const problems = new Map<string, string[]>();
  const claimed = new Set<string>();
  for (const def of all.values()) {
    problems.set(def.name, checkpointProblems(def, disks, inUse));
    for (const d of def.disks) if (d.bitmap !== undefined) claimed.add(`${d.name}/${d.bitmap}`);
  }
  const unclaimed: UnclaimedBitmap[] = [];
  for (const disk of disks) {
    for (const b of disk.bitmaps) {
      const key = `${disk.name}/${b.name}`;
      if (!claimed.has(key) && !inUse.has(key)) unclaimed.push({ disk: disk.name, bitmap: b.name, persistent: b.persistent });
    }
  }
  return { problems, unclaimed };
}
