import { createHash } from "node:crypto";
/**
 * From an aligned <domainbackup> and what QEMU reports, the per-disk plan of
 * a backup: node names, job ids, files, sync modes, bitmaps, exports; and
 * the QMP arguments that carry it out. Pure, so the generated QMP can be
 * checked against golden files (libvirt's qemublocktest habit): see
 * test/unit/plan-golden.test.ts and test/fixtures/golden/.
 */
import type { BackupDef, BackupDiskDef } from "../conf/backup.js";
import type { CheckpointDefFull } from "../conf/checkpoint.js";
import { derivedName } from "../conf/names.js";
import type { DiskInfo } from "../qmp/disks.js";
import { OWN_NODE_PREFIX } from "../qmp/disks.js";
import type { BlockdevBackup, BlockdevOptions, BlockExportAddNbd, MirrorSyncMode, TransactionAction } from "../qmp/qapi.js";

export interface DiskPlan {
  readonly disk: string;
  /** The source's format node. */
  readonly node: string;
  /** QEMU job id (also the device name in BLOCK_JOB_* events). */
  readonly jobId: string;
  /** Id of the blockdev-create job that formats the image (only while begin runs; absent in older records). */
  readonly createJobId: string;
  /** Node of the target (push) or scratch (pull) image. */
  readonly targetNode: string;
  readonly file: string;
  readonly format: "qcow2" | "raw";
  /** We create the file (and so remove it on failure); false when reusing the caller's. */
  readonly createFile: boolean;
  readonly sync: MirrorSyncMode;
  readonly virtualSize: number;
  readonly clusterSize: number | undefined;
  /** Incremental: the checkpoint and its bitmap on this disk, merged into `tempBitmap`. */
  readonly incremental: { readonly checkpoint: string; readonly bitmap: string } | undefined;
  /** Temporary bitmap: the changes since the checkpoint, frozen at the backup's point in time. */
  readonly tempBitmap: string | undefined;
  /** Pull: the NBD export. */
  readonly export: { readonly id: string; readonly name: string; readonly bitmap: string | undefined } | undefined;
}

export interface PlanOptions {
  readonly mode: BackupDef["mode"];
  /** Reuse caller-created files (libvirt's REUSE_EXTERNAL). */
  readonly reuse: boolean;
  /** Bytes per second per disk job; 0 or undefined: unlimited. */
  readonly bandwidth?: number | undefined;
  /** blockdev-backup x-perf is available. */
  readonly backupPerf: boolean;
  /** Push: report ready without writing the targets out to disk first (absent in records of older versions: durable). */
  readonly nonDurable?: boolean | undefined;
  /** Give created files (and the domain's backup directory) to QEMU's user. */
  readonly imageOwner?: { readonly uid: number; readonly gid: number } | undefined;
}

/**
 * What names our nodes, jobs and exports in QEMU after the domain: 6 hex
 * digits of its name's SHA-256. Two registrations can then never take each
 * other's objects for their own (a start-up cleanup only removes what carries
 * its own domain's tag).
 */
export function domainTag(domain: string): string {
  return createHash("sha256").update(domain).digest("hex").slice(0, 6);
}

/** Every name our backups of `domain` give objects in QEMU starts with this. */
export function ownPrefix(domain: string): string {
  return `${OWN_NODE_PREFIX}${domainTag(domain)}-`;
}

/** Names of versions before the domain tag (qbk-t0, qbk-j1…): still ours to clean up. */
const LEGACY_OWN_NAME = /^qbk-[jcte]\d+$/;

/** Whether a QEMU object of this name belongs to a backup of `domain` (and to no other domain's). */
export function isOwnName(name: string, domain: string): boolean {
  return name.startsWith(ownPrefix(domain)) || LEGACY_OWN_NAME.test(name);
}

/**
 * Names of disk i's objects in job `jobId` of `domain`. QEMU node names are
 * limited to 31 characters, so they are indexed rather than named after the
 * disk: qbk-<domain tag 6>-<job id 8>-t<i> is at most 24.
 */
export function ownNames(
  i: number,
  domain: string,
  jobId: string,
): { jobId: string; createJobId: string; targetNode: string; exportId: string } {
  const p = `${ownPrefix(domain)}${jobId}-`;
  return { jobId: `${p}j${i}`, createJobId: `${p}c${i}`, targetNode: `${p}t${i}`, exportId: `${p}e${i}` };
}

/** libvirt's name for the temporary / exported bitmap (shortened where a long disk name would make it no name). */
export function tempBitmapName(disk: string): string {
  return derivedName("backup-", disk);
}

export function planDisk(
  names: ReturnType<typeof ownNames>,
  d: BackupDiskDef,
  source: DiskInfo,
  checkpoints: ReadonlyMap<string, CheckpointDefFull>,
  opts: PlanOptions,
  fileExists: boolean,
): DiskPlan | string {
  const file = d.store?.file;
  if (file === undefined) return `disk '${d.name}': no target file`;
  const format = opts.mode === "pull" ? "qcow2" : ((d.driver ?? "qcow2") as "qcow2" | "raw");
  let incremental: DiskPlan["incremental"];
  if (d.backupmode === "incremental" && d.incremental !== undefined) {
    const cp = checkpoints.get(d.incremental);
    if (cp === undefined) return `checkpoint '${d.incremental}' does not exist`;
    const cd = cp.disks.find((x) => x.name === d.name);
    if (cd === undefined || cd.checkpoint !== "bitmap" || cd.bitmap === undefined) {
      return `checkpoint '${d.incremental}' does not cover disk '${d.name}': an incremental backup of it is impossible`;
    }
    incremental = { checkpoint: d.incremental, bitmap: cd.bitmap };
  }
  const tempBitmap = incremental !== undefined ? (d.exportbitmap ?? tempBitmapName(d.name)) : undefined;
  let sync: MirrorSyncMode;
  if (opts.mode === "pull") sync = "none";
  else if (incremental !== undefined) sync = "incremental";
  // 'top' copies only allocated clusters: a full backup when the source has no backing
  // file and the target is a fresh image (unallocated reads as zeroes there too).
  else sync = !source.hasBacking && !fileExists ? "top" : "full";
  return {
    disk: d.name,
    node: source.nodeName,
    jobId: names.jobId,
    createJobId: names.createJobId,
    targetNode: names.targetNode,
    file,
    format,
    createFile: !fileExists,
    sync,
    virtualSize: source.virtualSize,
    clusterSize: source.clusterSize,
    incremental,
    tempBitmap,
    export: opts.mode === "pull" ? { id: names.exportId, name: d.exportname ?? d.name, bitmap: tempBitmap } : undefined,
  };
}

/**
 * blockdev-add of the target (push) or scratch (pull, backed by the source node).
 * Neither is flushed by QEMU (no-flush): a scratch image is thrown away, and a
 * push target is written out by the daemon itself (see writeback.ts), off the
 * copy's critical path.
 */
export function targetBlockdev(p: DiskPlan, mode: BackupDef["mode"]): BlockdevOptions {
  const cache = { "no-flush": true };
  const file = { driver: "file" as const, filename: p.file, cache };
  if (mode === "pull") return { driver: "qcow2", "node-name": p.targetNode, file, backing: p.node, discard: "unmap", cache };
  return p.format === "raw"
    ? { driver: "raw", "node-name": p.targetNode, file, cache }
    : { driver: "qcow2", "node-name": p.targetNode, file, cache };
}

/** One transaction: checkpoint bitmaps, temporary bitmaps with their merges, every disk's job. */
export function backupTransaction(
  plans: readonly DiskPlan[],
  checkpointActions: readonly TransactionAction[],
  opts: PlanOptions,
): TransactionAction[] {
  const actions: TransactionAction[] = [...checkpointActions];
  for (const p of plans) {
    if (p.tempBitmap !== undefined && p.incremental !== undefined) {
      actions.push({ type: "block-dirty-bitmap-add", data: { node: p.node, name: p.tempBitmap, disabled: true } });
      actions.push({ type: "block-dirty-bitmap-merge", data: { node: p.node, target: p.tempBitmap, bitmaps: [p.incremental.bitmap] } });
    }
    const job: BlockdevBackup = {
      "job-id": p.jobId,
      device: p.node,
      target: p.targetNode,
      sync: p.sync,
      "auto-dismiss": false,
      ...(p.sync === "incremental" ? { bitmap: p.tempBitmap! } : {}),
      ...(opts.bandwidth ? { speed: opts.bandwidth } : {}),
      // copy_file_range between the images: measured 2-4x faster on 7.2 (see the recipes)
      ...(opts.backupPerf && opts.mode === "push" ? { "x-perf": { "use-copy-range": true } } : {}),
    };
    actions.push({ type: "blockdev-backup", data: job });
  }
  return actions;
}

export function exportArgs(p: DiskPlan): BlockExportAddNbd {
  const e = p.export!;
  return { type: "nbd", id: e.id, "node-name": p.targetNode, name: e.name, writable: false, ...(e.bitmap ? { bitmaps: [e.bitmap] } : {}) };
}
