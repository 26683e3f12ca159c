/**
 * TypeScript shapes of the QAPI types, commands and events qbackupd uses,
 * following QEMU's schema (qapi/block-core.json, job.json, block-export.json,
 * transaction.json, qom.json, misc.json) as of QEMU 7.2. Only the members we
 * read or send are spelled out; optional QAPI members are optional here.
 * A reply member listed here is one shapes.ts checks before the caller sees
 * it: add a member to both, or code reads what nobody checked.
 */

export interface VersionTriple {
  major: number;
  minor: number;
  micro: number;
}
export interface VersionInfo {
  qemu: VersionTriple;
  package: string;
}

/** query-qmp-schema: SchemaInfo, kept loose (we only look up names and members). */
export interface SchemaInfo {
  name: string;
  "meta-type": "builtin" | "enum" | "array" | "object" | "alternate" | "command" | "event";
  "arg-type"?: string;
  /** An alternate's members have a type and no name. */
  members?: { name?: string }[];
}

export interface BlockDirtyInfo {
  name?: string;
  count: number;
  granularity: number;
  recording: boolean;
  busy: boolean;
  persistent: boolean;
  inconsistent?: boolean;
}

export interface ImageInfo {
  filename: string;
  "virtual-size": number;
  "cluster-size"?: number;
  "backing-filename"?: string;
  /** Only its filename is read (and checked). */
  "backing-image"?: { filename: string };
}

export interface BlockDeviceInfo {
  "node-name"?: string;
  ro: boolean;
  drv: string;
  backing_file?: string;
  image: ImageInfo;
  "dirty-bitmaps"?: BlockDirtyInfo[];
}

/** x-debug-query-block-graph: the whole block graph, parents to children (QEMU ≥ 4.0). */
export interface XDbgBlockGraphNode {
  id: number;
  type: "block-backend" | "block-job" | "block-driver";
  /** node-name for block-driver nodes; the device name or qdev path for block backends. */
  name: string;
}

export interface XDbgBlockGraphEdge {
  parent: number;
  child: number;
  /** The child's role: "file", "backing", "target", "root", … */
  name: string;
}

export interface XDbgBlockGraph {
  nodes: XDbgBlockGraphNode[];
  edges: XDbgBlockGraphEdge[];
}

export interface BlockInfo {
  device: string;
  qdev?: string;
  inserted?: BlockDeviceInfo;
}

export type JobType =
  | "commit"
  | "stream"
  | "mirror"
  | "backup"
  | "create"
  | "amend"
  | "snapshot-load"
  | "snapshot-save"
  | "snapshot-delete";
export type JobStatus =
  | "undefined"
  | "created"
  | "running"
  | "paused"
  | "ready"
  | "standby"
  | "waiting"
  | "pending"
  | "aborting"
  | "concluded"
  | "null";

export interface JobInfo {
  id: string;
  status: JobStatus;
  "current-progress": number;
  "total-progress": number;
  error?: string;
}

export type MirrorSyncMode = "top" | "full" | "none" | "incremental" | "bitmap";
export type BitmapSyncMode = "on-success" | "never" | "always";
export type OnError = "report" | "ignore" | "enospc" | "stop" | "auto";

export interface BackupPerf {
  "use-copy-range"?: boolean;
  "max-workers"?: number;
  "max-chunk"?: number;
}

export interface BlockdevBackup {
  "job-id"?: string;
  device: string;
  target: string;
  sync: MirrorSyncMode;
  speed?: number;
  bitmap?: string;
  "bitmap-mode"?: BitmapSyncMode;
  compress?: boolean;
  "on-source-error"?: OnError;
  "on-target-error"?: OnError;
  "auto-finalize"?: boolean;
  "auto-dismiss"?: boolean;
  "filter-node-name"?: string;
  "x-perf"?: BackupPerf;
}

export interface BlockDirtyBitmapAdd {
  node: string;
  name: string;
  granularity?: number;
  persistent?: boolean;
  disabled?: boolean;
}
export interface BlockDirtyBitmap {
  node: string;
  name: string;
}
export type BlockDirtyBitmapOrStr = string | { node: string; name: string };
export interface BlockDirtyBitmapMerge {
  node: string;
  target: string;
  bitmaps: BlockDirtyBitmapOrStr[];
}

export type TransactionAction =
  | { type: "block-dirty-bitmap-add"; data: BlockDirtyBitmapAdd }
  | { type: "block-dirty-bitmap-remove"; data: BlockDirtyBitmap }
  | { type: "block-dirty-bitmap-clear"; data: BlockDirtyBitmap }
  | { type: "block-dirty-bitmap-enable"; data: BlockDirtyBitmap }
  | { type: "block-dirty-bitmap-disable"; data: BlockDirtyBitmap }
  | { type: "block-dirty-bitmap-merge"; data: BlockDirtyBitmapMerge }
  | { type: "blockdev-backup"; data: BlockdevBackup };

export interface TransactionProperties {
  "completion-mode"?: "individual" | "grouped";
}

/** BlockdevOptions, restricted to the drivers we create: file/host_device under qcow2/raw. */
export type BlockdevRef = string | BlockdevOptions;
export type BlockdevOptions =
  | {
      driver: "file" | "host_device";
      "node-name"?: string;
      filename: string;
      "read-only"?: boolean;
      "auto-read-only"?: boolean;
      discard?: "ignore" | "unmap";
      cache?: { direct?: boolean; "no-flush"?: boolean };
      aio?: "threads" | "native" | "io_uring";
    }
  | {
      driver: "qcow2";
      "node-name"?: string;
      file: BlockdevRef;
      backing?: BlockdevRef | null;
      "read-only"?: boolean;
      discard?: "ignore" | "unmap";
      cache?: { direct?: boolean; "no-flush"?: boolean };
    }
  | { driver: "raw"; "node-name"?: string; file: BlockdevRef; "read-only"?: boolean; cache?: { direct?: boolean; "no-flush"?: boolean } };

/** BlockdevCreateOptions for the images we make: a qcow2 on a file, or a raw file (file-posix create sizes it). */
export type BlockdevCreateOptions =
  | { driver: "qcow2"; file: BlockdevRef; size: number; "cluster-size"?: number }
  | { driver: "file"; filename: string; size: number };

export type SocketAddressLegacy = { type: "unix"; data: { path: string } } | { type: "inet"; data: { host: string; port: string } };

export interface NbdServerStart {
  addr: SocketAddressLegacy;
  "tls-creds"?: string;
  "tls-authz"?: string;
  "max-connections"?: number;
}

export interface BlockExportAddNbd {
  type: "nbd";
  id: string;
  "node-name": string;
  writable?: boolean;
  writethrough?: boolean;
  name?: string;
  description?: string;
  bitmaps?: string[];
  "allocation-depth"?: boolean;
}

export interface BlockExportInfo {
  id: string;
  type: "nbd" | "fuse" | "vduse-blk" | "vhost-user-blk";
  "node-name": string;
}

export type ObjectAdd =
  | { "qom-type": "tls-creds-x509"; id: string; dir: string; endpoint?: "client" | "server"; "verify-peer"?: boolean }
  | { "qom-type": "secret"; id: string; data?: string; file?: string; format?: "raw" | "base64" }
  | { "qom-type": string; id: string; [prop: string]: unknown };

export interface StatusInfo {
  running: boolean;
  status: string;
}

type NoArgs = undefined;

/** command name → argument and return types: what `QmpClient.execute` checks at compile time. */
export interface QmpCommandMap {
  qmp_capabilities: { args: NoArgs | { enable?: string[] }; ret: Record<string, never> };
  "query-version": { args: NoArgs; ret: VersionInfo };
  "query-qmp-schema": { args: NoArgs; ret: SchemaInfo[] };
  "query-status": { args: NoArgs; ret: StatusInfo };
  "query-block": { args: NoArgs; ret: BlockInfo[] };
  "query-named-block-nodes": { args: NoArgs | { flat?: boolean }; ret: BlockDeviceInfo[] };
  "x-debug-query-block-graph": { args: NoArgs; ret: XDbgBlockGraph };
  "blockdev-add": { args: BlockdevOptions; ret: Record<string, never> };
  "blockdev-del": { args: { "node-name": string }; ret: Record<string, never> };
  "blockdev-create": { args: { "job-id": string; options: BlockdevCreateOptions }; ret: Record<string, never> };
  "block-dirty-bitmap-add": { args: BlockDirtyBitmapAdd; ret: Record<string, never> };
  "block-dirty-bitmap-remove": { args: BlockDirtyBitmap; ret: Record<string, never> };
  "block-dirty-bitmap-clear": { args: BlockDirtyBitmap; ret: Record<string, never> };
  "block-dirty-bitmap-enable": { args: BlockDirtyBitmap; ret: Record<string, never> };
  "block-dirty-bitmap-disable": { args: BlockDirtyBitmap; ret: Record<string, never> };
  "block-dirty-bitmap-merge": { args: BlockDirtyBitmapMerge; ret: Record<string, never> };
  transaction: { args: { actions: TransactionAction[]; properties?: TransactionProperties }; ret: Record<string, never> };
  "blockdev-backup": { args: BlockdevBackup; ret: Record<string, never> };
  "block-job-set-speed": { args: { device: string; speed: number }; ret: Record<string, never> };
  "block-job-cancel": { args: { device: string; force?: boolean }; ret: Record<string, never> };
  "query-jobs": { args: NoArgs; ret: JobInfo[] };
  "qom-list": { args: { path: string }; ret: { name: string; type: string }[] };
  /** A QOM property's value; its type depends on the property. */
  "qom-get": { args: { path: string; property: string }; ret: unknown };
  "job-cancel": { args: { id: string }; ret: Record<string, never> };
  "job-dismiss": { args: { id: string }; ret: Record<string, never> };
  "job-finalize": { args: { id: string }; ret: Record<string, never> };
  "nbd-server-start": { args: NbdServerStart; ret: Record<string, never> };
  "nbd-server-stop": { args: NoArgs; ret: Record<string, never> };
  "block-export-add": { args: BlockExportAddNbd; ret: Record<string, never> };
  "block-export-del": { args: { id: string; mode?: "safe" | "hard" }; ret: Record<string, never> };
  "query-block-exports": { args: NoArgs; ret: BlockExportInfo[] };
  "object-add": { args: ObjectAdd; ret: Record<string, never> };
  "object-del": { args: { id: string }; ret: Record<string, never> };
  "human-monitor-command": { args: { "command-line": string; "cpu-index"?: number }; ret: string };
  quit: { args: NoArgs; ret: Record<string, never> };
  stop: { args: NoArgs; ret: Record<string, never> };
  cont: { args: NoArgs; ret: Record<string, never> };
}

export type QmpCommandName = keyof QmpCommandMap;

/** event name → data: what typed subscriptions deliver. */
export interface QmpEventMap {
  JOB_STATUS_CHANGE: { id: string; status: JobStatus };
  BLOCK_JOB_COMPLETED: { type: JobType; device: string; len: number; offset: number; speed: number; error?: string };
  BLOCK_JOB_CANCELLED: { type: JobType; device: string; len: number; offset: number; speed: number };
  BLOCK_JOB_ERROR: { device: string; operation: "read" | "write"; action: "ignore" | "report" | "stop" };
  BLOCK_JOB_READY: { type: JobType; device: string; len: number; offset: number; speed: number };
  BLOCK_JOB_PENDING: { type: JobType; id: string };
  BLOCK_EXPORT_DELETED: { id: string };
  SHUTDOWN: { guest: boolean; reason: string };
  STOP: Record<string, never>;
  RESUME: Record<string, never>;
}
