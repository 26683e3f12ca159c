/**
 * Disk discovery: what disks a VM has, which node carries each one's format
 * layer, and the dirty bitmaps on it. Read-only; it changes nothing in QEMU.
 *
 * A disk is named by its guest device's id (qdev "/machine/peripheral/vda/
 * virtio-backend" → "vda"), or by the legacy drive name, or — for nodes no
 * device uses, as in qemu-storage-daemon — by its node-name.
 */
import type { ResultAsync } from "neverthrow";
import type { QmpClient } from "./client.js";
import type { QmpError } from "./errors.js";
import type { BlockDeviceInfo, BlockDirtyInfo, BlockInfo } from "./qapi.js";

export interface DirtyBitmap {
  readonly name: string;
  readonly persistent: boolean;
  readonly recording: boolean;
  readonly busy: boolean;
  readonly granularity: number;
  /** Dirty bytes (QEMU's count, in bytes, multiple of granularity). */
  readonly count: number;
  readonly inconsistent: boolean;
}

export interface DiskInfo {
  readonly name: string;
  /** The node-name of the disk's top (format) node: where bitmaps live and jobs attach. */
  readonly nodeName: string;
  /** qdev path for guest-visible I/O (HMP qemu-io -d), when a device uses the disk. */
  readonly qdev: string | undefined;
  readonly file: string;
  readonly format: string;
  readonly virtualSize: number;
  readonly clusterSize: number | undefined;
  readonly readOnly: boolean;
  readonly hasBacking: boolean;
  readonly bitmaps: readonly DirtyBitmap[];
}

/** Node names qbackupd gives its own nodes (targets, scratch); never listed as disks. */
export const OWN_NODE_PREFIX = "qbk-";

/** Formats that are image formats rather than protocols; only these are disks. */
const FORMAT_DRIVERS = new Set(["qcow2", "raw", "qed", "vmdk", "vdi", "vpc", "vhdx", "luks", "parallels", "qcow", "bochs", "cloop", "dmg"]);

export function diskNameFromQdev(qdev: string): string {
  // "/machine/peripheral/vda/virtio-backend" → "vda"; "/machine/peripheral-anon/device[0]/..." stays unnamed
  const m = /^\/machine\/peripheral\/([^/]+)(\/|$)/.exec(qdev);
  return m?.[1] ?? qdev;
}

function bitmapFrom(b: BlockDirtyInfo): DirtyBitmap {
  return {
    name: b.name ?? "",
    persistent: b.persistent,
    recording: b.recording,
    busy: b.busy,
    granularity: b.granularity,
    count: b.count,
    inconsistent: b.inconsistent === true,
  };
}

function diskFrom(name: string, qdev: string | undefined, n: BlockDeviceInfo): DiskInfo {
  return {
    name,
    nodeName: n["node-name"] ?? "",
    qdev,
    file: n.image.filename,
    format: n.drv,
    virtualSize: n.image["virtual-size"],
    clusterSize: n.image["cluster-size"],
    readOnly: n.ro,
    hasBacking: n.backing_file !== undefined || n.image["backing-filename"] !== undefined,
    bitmaps: (n["dirty-bitmaps"] ?? []).filter((b) => b.name !== undefined).map(bitmapFrom),
  };
}

/** Pure: build the disk list from query-block and query-named-block-nodes(flat). */
export function disksFromQuery(blocks: readonly BlockInfo[], nodes: readonly BlockDeviceInfo[]): DiskInfo[] {
  const disks: DiskInfo[] = [];
  const used = new Set<string>();
  for (const b of blocks) {
    const ins = b.inserted;
    if (ins === undefined) continue; // no medium: nothing to back up
    const name = b.qdev !== undefined && b.qdev !== "" ? diskNameFromQdev(b.qdev) : b.device;
    if (name === "") continue;
    if (ins["node-name"] !== undefined) used.add(ins["node-name"]);
    disks.push(diskFrom(name, b.qdev, ins));
  }
  // Named format nodes no device uses (qemu-storage-daemon, or a VM's spare nodes).
  // Skip auto-named nodes (#blockNNN) and nodes that are another node's backing image.
  const spare: DiskInfo[] = [];
  const backingFiles = new Set(nodes.map((n) => n.image["backing-image"]?.filename).filter((f) => f !== undefined));
  for (const n of nodes) {
    const nn = n["node-name"];
    if (nn === undefined || nn.startsWith("#") || nn.startsWith(OWN_NODE_PREFIX) || used.has(nn) || !FORMAT_DRIVERS.has(n.drv)) continue;
    if (backingFiles.has(n.image.filename)) continue;
    spare.push(diskFrom(nn, undefined, n));
  }
  // QEMU lists nodes newest first; sort so names are stable across restarts.
  spare.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  return [...disks, ...spare];
}

export function discoverDisks(client: QmpClient): ResultAsync<DiskInfo[], QmpError> {
  return client
    .execute("query-block")
    .andThen((blocks) => client.execute("query-named-block-nodes", { flat: true }).map((nodes) => disksFromQuery(blocks, nodes)));
}
