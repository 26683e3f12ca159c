/**
 * What each QEMU version does with a backup of a disk that runs in an
 * iothread, as tried on that version (scripts/probe-iothreads.ts, one fresh
 * qemu-storage-daemon per step, its disk served as vhost-user-blk from an
 * iothread; test/qemu/iothread-probe.test.ts re-runs the probes on every QEMU of
 * the test matrix and fails when this table and QEMU disagree). A version
 * that was never tried gets no benefit of the doubt: newer is not assumed
 * safe, since 10.0 aborts on a push that 7.2 runs.
 *
 *   7.2.x: push runs. A pull aborts: blockdev-add of a fleecing image backed
 *          by the disk ("qemu_mutex_unlock_impl: Operation not permitted").
 *          A FUSE export serving the disk from an iothread aborts on its next
 *          write once any block job ran on the node (bdrv_poll_co).
 *          (Adding the fleecing image without its backing, moving it into the
 *          iothread with x-blockdev-set-iothread and then reopening it with
 *          the disk as backing runs on 7.2; not used yet.)
 *   10.0.x: a push aborts when blockdev-backup inserts its copy-before-write
 *          filter ("bdrv_insert_node: Assertion `bdrv_get_aio_context(bs) ==
 *          ctx' failed"), also with the target moved into the disk's iothread
 *          first (x-blockdev-set-iothread). A pull runs, NBD client included:
 *          its fleecing image, backed by the disk, follows it into the
 *          iothread before the filter is inserted.
 *   Both: dirty-bitmap add, merge and remove (checkpoints) run.
 * Pure data and a lookup; touches nothing.
 */
import type { VersionTriple } from "./qapi.js";

export type IothreadOp = "push" | "pull" | "push-with-fuse-export";

export interface IothreadVerdict {
  readonly safe: boolean;
  /** Why not, for the error message: what aborts, as seen on that version. */
  readonly reason: string;
}

interface VersionEntry {
  readonly major: number;
  readonly minor: number;
  readonly ops: Readonly<Record<IothreadOp, IothreadVerdict>>;
}

const CBW_INSERT_ABORT = "blockdev-backup's copy-before-write filter aborts QEMU (bdrv_insert_node assertion)";

export const IOTHREAD_TRIED: readonly VersionEntry[] = [
  {
    major: 7,
    minor: 2,
    ops: {
      push: { safe: true, reason: "" },
      pull: { safe: false, reason: "a fleecing image backed by such a disk aborts QEMU (qemu_mutex_unlock_impl)" },
      "push-with-fuse-export": { safe: false, reason: "after a block job the FUSE export's next write aborts QEMU (bdrv_poll_co)" },
    },
  },
  {
    major: 10,
    minor: 0,
    ops: {
      push: { safe: false, reason: CBW_INSERT_ABORT },
      pull: { safe: true, reason: "" },
      "push-with-fuse-export": { safe: false, reason: CBW_INSERT_ABORT },
    },
  },
];

export function triedVersions(): string {
  return IOTHREAD_TRIED.map((e) => `${e.major}.${e.minor}`).join(", ");
}

/** The verdict for `op` on QEMU `v`: what was tried on its major.minor, or unsafe when it never was. */
export function iothreadVerdict(v: VersionTriple, op: IothreadOp): IothreadVerdict {
  const e = IOTHREAD_TRIED.find((x) => x.major === v.major && x.minor === v.minor);
  if (e === undefined)
    return {
      safe: false,
      reason: `backups of disks in iothreads were never tried on QEMU ${v.major}.${v.minor} (tried: ${triedVersions()})`,
    };
  return e.ops[op];
}
