/**
 * Disk discovery: what disks a VM has, which node carries each one's format
 * layer, and the dirty bitmaps on it. Read-only; it changes nothing in QEMU.
 *
 * A disk is named by its guest device's id (qdev "/machine/peripheral/vda/
 * virtio-backend" → "vda"), or by the legacy drive name, or — for nodes no
 * device uses, as in qemu-storage-daemon — by its node-name.
 */
import { errAsync, type ResultAsync } from "neverthrow";
import type { QmpClient } from "./client.js";
import type { QmpError } from "./errors.js";
import type { BlockDeviceInfo, BlockDirtyInfo, BlockInfo, XDbgBlockGraph } from "./qapi.js";

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
  /**
   * The backing chain below the disk's node, top-down: where bitmaps of
   * checkpoints made before an external snapshot stay (they record no guest
   * write there, only what a commit writes into that layer).
   */
  readonly below: readonly BackingLayer[];
}

export interface BackingLayer {
  readonly nodeName: string;
  /** The image file QEMU opened for the layer (offline backups check the storage daemon opened the same chain). */
  readonly file: string;
  /** QEMU opened the layer read-only (as backing layers are): its bitmaps cannot be changed there. */
  readonly readOnly: boolean;
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

function diskFrom(name: string, qdev: string | undefined, n: BlockDeviceInfo, below: readonly BackingLayer[] = []): DiskInfo {
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
    bitmaps: bitmapsOf(n),
    below,
  };
}

function bitmapsOf(n: BlockDeviceInfo): DirtyBitmap[] {
  return (n["dirty-bitmaps"] ?? []).filter((b) => b.name !== undefined).map(bitmapFrom);
}

/** The nodes below `top` by backing edges (each looked through filters, as a commit's filter may sit between). */
function backingChain(top: string, nodes: ReadonlyMap<string, BlockDeviceInfo>, graph: Graph): BackingLayer[] {
  const out: BackingLayer[] = [];
  let cur = top;
  // a graph has no cycles; the bound only guards against a malformed answer
  for (let i = 0; i < 64; i++) {
    const next = graph.children.get(cur)?.get("backing");
    if (next === undefined) break;
    const path = throughFilters(next, nodes, graph);
    cur = path[path.length - 1]!;
    const n = nodes.get(cur);
    if (n === undefined) break;
    out.push({ nodeName: cur, file: n.image.filename, readOnly: n.ro, bitmaps: bitmapsOf(n) });
  }
  return out;
}

/**
 * Filter drivers: a node of one of these passes I/O to one child and holds no
 * data of its own. Block jobs insert them above a disk (copy-before-write for
 * backup, mirror_top for mirror and active commit, commit_top, throttle…), and
 * query-block then reports the filter as the device's node: the disk, its
 * bitmaps and its size are the node below.
 */
const FILTER_DRIVERS = new Set([
  "copy-before-write",
  "throttle",
  "mirror_top",
  "commit_top",
  "compress",
  "preallocate",
  "copy-on-read",
  "blklogwrites",
  "blkreplay",
]);

/** The child a filter passes I/O to: "file" for most, "backing" for the job filters (mirror_top, commit_top). */
const FILTER_CHILD_ROLES = ["file", "backing"] as const;

/** The block graph as discovery needs it: each node's children by role, and which nodes another node uses. */
interface Graph {
  /** node-name → role → child node-name */
  readonly children: ReadonlyMap<string, ReadonlyMap<string, string>>;
  /**
   * node-names that are a child of another block-driver node (backing, file, target…), or a block
   * job's target (a mirror's target hangs from the job alone, under no node): never a disk of their own.
   */
  readonly hasDriverParent: ReadonlySet<string>;
}

function graphFrom(g: XDbgBlockGraph): Graph {
  const byId = new Map(g.nodes.map((n) => [n.id, n]));
  const children = new Map<string, Map<string, string>>();
  const hasDriverParent = new Set<string>();
  for (const e of g.edges) {
    const p = byId.get(e.parent);
    const c = byId.get(e.child);
    if (c?.type !== "block-driver") continue;
    if (p?.type === "block-job" && e.name === "target") hasDriverParent.add(c.name);
    if (p?.type !== "block-driver") continue;
    const roles = children.get(p.name) ?? new Map<string, string>();
    children.set(p.name, roles);
    roles.set(e.name, c.name);
    hasDriverParent.add(c.name);
  }
  return { children, hasDriverParent };
}

/** From the node a device or export is attached to, down through filters to the node that holds the disk. */
function throughFilters(top: string, nodes: ReadonlyMap<string, BlockDeviceInfo>, graph: Graph): string[] {
  const path = [top];
  // a graph has no cycles; the bound only guards against a malformed answer
  for (let i = 0; i < 32; i++) {
    const cur = path[path.length - 1]!;
    const n = nodes.get(cur);
    if (n === undefined || !FILTER_DRIVERS.has(n.drv)) break;
    const roles = graph.children.get(cur);
    const next = FILTER_CHILD_ROLES.map((r) => roles?.get(r)).find((x) => x !== undefined);
    if (next === undefined) break;
    path.push(next);
  }
  return path;
}

function isSpareCandidate(nn: string | undefined): nn is string {
  return nn !== undefined && !nn.startsWith("#") && !nn.startsWith(OWN_NODE_PREFIX);
}

/**
 * Pure: build the disk list from query-block, query-named-block-nodes(flat)
 * and the block graph. A disk is what a device (or, in a storage daemon, no
 * one or an export) has at the root of its tree, looked through filters; a
 * node that is another node's child — a backing image, a filter's child, a
 * job's target — is never a disk. (`flat` answers carry no backing-image,
 * so the graph is the only place that says which node backs which.)
 */
export function disksFromGraph(blocks: readonly BlockInfo[], nodes: readonly BlockDeviceInfo[], g: XDbgBlockGraph): DiskInfo[] {
  const graph = graphFrom(g);
  const byName = new Map<string, BlockDeviceInfo>();
  for (const n of nodes) if (n["node-name"] !== undefined) byName.set(n["node-name"], n);
  const disks: DiskInfo[] = [];
  const used = new Set<string>();
  for (const b of blocks) {
    const ins = b.inserted;
    if (ins === undefined) continue; // no medium: nothing to back up
    const name = b.qdev !== undefined && b.qdev !== "" ? diskNameFromQdev(b.qdev) : b.device;
    if (name === "") continue;
    const top = ins["node-name"];
    if (top === undefined) {
      disks.push(diskFrom(name, b.qdev, ins));
      continue;
    }
    const path = throughFilters(top, byName, graph);
    for (const p of path) used.add(p);
    const node = path[path.length - 1]!;
    disks.push(diskFrom(name, b.qdev, byName.get(node) ?? ins, backingChain(node, byName, graph)));
  }
  // Named format nodes no device uses (qemu-storage-daemon, or a VM's spare nodes): the roots of
  // the remaining trees, each looked through its filters (a job on a storage daemon's disk puts
  // an auto-named filter above it).
  const spare: DiskInfo[] = [];
  for (const n of nodes) {
    const root = n["node-name"];
    if (root === undefined || used.has(root) || graph.hasDriverParent.has(root)) continue;
    const path = throughFilters(root, byName, graph);
    const nn = path[path.length - 1]!;
    const real = byName.get(nn);
    if (!isSpareCandidate(nn) || used.has(nn) || real === undefined || !FORMAT_DRIVERS.has(real.drv)) continue;
    for (const p of path) used.add(p);
    spare.push(diskFrom(nn, undefined, real, backingChain(nn, byName, graph)));
  }
  // QEMU lists nodes newest first; sort so names are stable across restarts.
  spare.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  return [...disks, ...spare];
}

/**
 * The block graph; `x-debug-` because QEMU keeps the right to change it, so a
 * QEMU that lacks it gets an empty graph: no filter is then looked through
 * and backing nodes are told only by the nested (non-flat) backing chain.
 */
function blockGraph(client: QmpClient, nodes: readonly BlockDeviceInfo[]): ResultAsync<XDbgBlockGraph, QmpError> {
  return client
    .execute("x-debug-query-block-graph")
    .orElse((e) => (e.code === "command" && e.errorClass === "CommandNotFound" ? backingGraph(client, nodes) : errAsync(e)));
}

/** A graph of backing edges only, from query-named-block-nodes without `flat` (nested backing-image). */
function backingGraph(client: QmpClient, nodes: readonly BlockDeviceInfo[]): ResultAsync<XDbgBlockGraph, QmpError> {
  return client.execute("query-named-block-nodes").map((deep) => {
    const byFile = new Map<string, string>();
    for (const n of nodes) if (n["node-name"] !== undefined) byFile.set(n.image.filename, n["node-name"]);
    const gn: XDbgBlockGraph["nodes"] = [];
    const edges: XDbgBlockGraph["edges"] = [];
    const ids = new Map<string, number>();
    const id = (name: string): number => {
      let i = ids.get(name);
      if (i === undefined) {
        i = ids.size;
        ids.set(name, i);
        gn.push({ id: i, type: "block-driver", name });
      }
      return i;
    };
    for (const n of deep) {
      const nn = n["node-name"];
      const backing = n.image["backing-image"]?.filename;
      const child = backing === undefined ? undefined : byFile.get(backing);
      if (nn !== undefined && child !== undefined) edges.push({ parent: id(nn), child: id(child), name: "backing" });
    }
    return { nodes: gn, edges };
  });
}

export function discoverDisks(client: QmpClient): ResultAsync<DiskInfo[], QmpError> {
  return client
    .execute("query-block")
    .andThen((blocks) =>
      client
        .execute("query-named-block-nodes", { flat: true })
        .andThen((nodes) => blockGraph(client, nodes).map((g) => disksFromGraph(blocks, nodes, g))),
    );
}
