/**
 * The exact subset check, run before an incremental begins from a
 * checkpoint that the evidence finds clean. Comparing counts (evidence.ts)
 * misses a disable/write/enable of an older bitmap whenever its surplus over
 * a newer one is larger than the writes it missed; comparing the bits
 * themselves does not. Every bitmap of a checkpoint created after this
 * one's bitmap was first seen (same disk, same granularity) holds only
 * writes this one must hold too. So, per disk, in one `transaction`: a
 * disabled temporary copy of the checkpoint's bitmap, and a disabled
 * temporary union of it with those newer bitmaps; if the union counts more
 * dirty bytes than the copy, the checkpoint's bitmap lacks writes that a
 * newer one recorded. Both temporaries are filled at one instant, so guest
 * writes meanwhile change nothing; then they are removed.
 *
 * It reads checkpoint bitmaps only as merge sources and never changes them;
 * its temporary bitmaps (non-persistent, prefix VERIFY_PREFIX) are removed
 * on every path. Memory: two bitmaps per disk for the moment of the check
 * (disk size / granularity / 8 bytes each).
 */
import { randomBytes } from "node:crypto";
import { okAsync, ResultAsync } from "neverthrow";
import type { CheckpointDefFull } from "../conf/checkpoint.js";
import type { QmpClient } from "../qmp/client.js";
import { type DiskInfo, discoverDisks } from "../qmp/disks.js";
import type { QmpError } from "../qmp/errors.js";
import type { TransactionAction } from "../qmp/qapi.js";
import type { EvidenceBook } from "./evidence.js";
import type { CheckpointMap } from "./tree.js";

/** Temporary bitmaps of this check; never a checkpoint's (validity does not list them as unclaimed). */
export const VERIFY_PREFIX = "qbk-verify-";

export interface SubsetFinding {
  readonly disk: string;
  readonly bitmap: string;
  /** Dirty bytes the newer bitmaps hold that this one lacks. */
  readonly lacking: number;
  readonly newer: readonly string[];
}

interface Plan {
  readonly disk: string;
  readonly node: string;
  readonly bitmap: string;
  readonly newer: readonly string[];
  readonly copy: string;
  readonly union: string;
}

/** Per disk: which newer checkpoints' bitmaps must be subsets of this checkpoint's. */
function verifyPlan(def: CheckpointDefFull, all: CheckpointMap, disks: readonly DiskInfo[], book: EvidenceBook): Plan[] {
  const tag = randomBytes(4).toString("hex");
  const plans: Plan[] = [];
  const ev = book.checkpoints[def.name];
  for (const [i, d] of def.disks.entries()) {
    if (d.checkpoint !== "bitmap" || d.bitmap === undefined) continue;
    const disk = disks.find((x) => x.name === d.name);
    const mine = disk?.bitmaps.find((b) => b.name === d.bitmap);
    const firstSeen = ev?.disks[d.name]?.firstSeenGen;
    if (disk === undefined || mine === undefined || firstSeen === undefined || mine.busy || !mine.recording) continue;
    const newer: string[] = [];
    for (const other of all.values()) {
      const born = book.checkpoints[other.name]?.bornAfterGen;
      if (other.name === def.name || born === undefined || born < firstSeen) continue;
      const od = other.disks.find((x) => x.name === d.name);
      const ob = od?.checkpoint === "bitmap" ? disk.bitmaps.find((b) => b.name === od.bitmap) : undefined;
      if (ob === undefined || ob.busy || ob.inconsistent || ob.granularity !== mine.granularity) continue;
      newer.push(ob.name);
    }
    if (newer.length === 0) continue;
    plans.push({
      disk: d.name,
      node: disk.nodeName,
      bitmap: d.bitmap,
      newer,
      copy: `${VERIFY_PREFIX}${tag}-${i}-copy`,
      union: `${VERIFY_PREFIX}${tag}-${i}-union`,
    });
  }
  return plans;
}

/**
 * Check a checkpoint's bitmaps against every newer checkpoint's. Findings
 * name what is lacking; a QMP error means the check could not be made (the
 * caller decides), and the temporaries are removed in either case.
 */
export function verifySubsets(
  client: QmpClient,
  def: CheckpointDefFull,
  all: CheckpointMap,
  disks: readonly DiskInfo[],
  book: EvidenceBook,
): ResultAsync<SubsetFinding[], QmpError> {
  const plans = verifyPlan(def, all, disks, book);
  if (plans.length === 0) return okAsync([]);
  const actions: TransactionAction[] = [];
  for (const p of plans) {
    const granularity = disks.find((x) => x.name === p.disk)!.bitmaps.find((b) => b.name === p.bitmap)!.granularity;
    actions.push(
      { type: "block-dirty-bitmap-add", data: { node: p.node, name: p.copy, granularity, persistent: false, disabled: true } },
      { type: "block-dirty-bitmap-add", data: { node: p.node, name: p.union, granularity, persistent: false, disabled: true } },
      { type: "block-dirty-bitmap-merge", data: { node: p.node, target: p.copy, bitmaps: [p.bitmap] } },
      { type: "block-dirty-bitmap-merge", data: { node: p.node, target: p.union, bitmaps: [p.bitmap, ...p.newer] } },
    );
  }
  const removes: TransactionAction[] = plans.flatMap((p): TransactionAction[] => [
    { type: "block-dirty-bitmap-remove", data: { node: p.node, name: p.copy } },
    { type: "block-dirty-bitmap-remove", data: { node: p.node, name: p.union } },
  ]);
  // a failed transaction added nothing; after a successful one the temporaries go whatever the measuring gave
  return client
    .execute("transaction", { actions })
    .andThen(
      () =>
        new ResultAsync(
          (async () => {
            const measured = await discoverDisks(client);
            await client.execute("transaction", { actions: removes });
            return measured;
          })(),
        ),
    )
    .map((now) =>
      plans.flatMap((p): SubsetFinding[] => {
        const bitmaps = now.find((x) => x.name === p.disk)?.bitmaps ?? [];
        const copy = bitmaps.find((b) => b.name === p.copy)?.count;
        const union = bitmaps.find((b) => b.name === p.union)?.count;
        if (copy === undefined || union === undefined || union <= copy) return [];
        return [{ disk: p.disk, bitmap: p.bitmap, lacking: union - copy, newer: p.newer }];
      }),
    );
}
