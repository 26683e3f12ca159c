/** disksFromGraph, pure: filters looked through, backing and target nodes never disks, storage-daemon nodes by name. */
import t from "tap";
import { disksFromGraph } from "../../src/qmp/disks.js";
import type { BlockDeviceInfo, BlockInfo, XDbgBlockGraph } from "../../src/qmp/qapi.js";

function node(name: string, drv: string, bitmaps: string[] = []): BlockDeviceInfo {
  return {
    "node-name": name,
    ro: false,
    drv,
    image: { filename: `/x/${name}`, "virtual-size": 1 << 24 },
    "dirty-bitmaps": bitmaps.map((b) => ({ name: b, count: 0, granularity: 65536, recording: true, busy: false, persistent: true })),
  };
}

function graph(names: string[], edges: [string, string, string][], backends: [string, string][] = []): XDbgBlockGraph {
  const all = [
    ...names.map((n) => ({ type: "block-driver" as const, name: n })),
    ...backends.map(([b]) => ({ type: "block-backend" as const, name: b })),
  ];
  const id = (n: string) => all.findIndex((x) => x.name === n);
  return {
    nodes: all.map((x, i) => ({ id: i, ...x })),
    edges: [
      ...edges.map(([p, c, name]) => ({ parent: id(p), child: id(c), name })),
      ...backends.map(([b, c]) => ({ parent: id(b), child: id(c), name: "root" })),
    ],
  };
}

t.test("a storage daemon's node under an auto-named copy-before-write filter keeps its name and bitmaps", async (t) => {
  const nodes = [node("#block123", "copy-before-write"), node("disk0", "qcow2", ["c1"]), node("#block7", "file"), node("qbk-t0", "qcow2")];
  const g = graph(
    nodes.map((n) => n["node-name"]!),
    [
      ["#block123", "disk0", "file"],
      ["#block123", "qbk-t0", "target"],
      ["disk0", "#block7", "file"],
    ],
    [["guest0", "#block123"]],
  );
  const disks = disksFromGraph([], nodes, g);
  t.same(
    disks.map((d) => [d.name, d.nodeName, d.bitmaps.map((b) => b.name)]),
    [["disk0", "disk0", ["c1"]]],
  );
});

t.test("a device over a throttle filter over a chain: the disk is the overlay; the backing node is none", async (t) => {
  const nodes = [node("thr", "throttle"), node("top", "qcow2", ["c1"]), node("base", "qcow2")];
  const blocks: BlockInfo[] = [{ device: "", qdev: "/machine/peripheral/vda/virtio-backend", inserted: nodes[0]! }];
  const g = graph(
    ["thr", "top", "base"],
    [
      ["thr", "top", "file"],
      ["top", "base", "backing"],
    ],
  );
  t.same(
    disksFromGraph(blocks, nodes, g).map((d) => [d.name, d.nodeName]),
    [["vda", "top"]],
  );
});
