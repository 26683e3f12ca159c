/**
 * disksFromGraph on block graphs captured from real QEMU 7.2 and 10.0
 * (scripts/capture-qmp-fixtures.ts): libvirt's named backing chains, a
 * throttle filter, an active commit, foreign backup and mirror jobs, a
 * storage daemon with a job running. The expected disks are written by hand
 * from what each setup is, not from what the code answered.
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { disksFromGraph } from "../../src/qmp/disks.js";
import type { BlockDeviceInfo, BlockInfo, XDbgBlockGraph } from "../../src/qmp/qapi.js";

const DIR = join(import.meta.dirname, "..", "fixtures", "qmp");
const VERSIONS = ["7.2", "10.0"] as const;
const MiB = 1024 * 1024;

interface Captured {
  "query-block": BlockInfo[];
  "query-named-block-nodes": BlockDeviceInfo[];
  "x-debug-query-block-graph": XDbgBlockGraph;
}

function load(name: string, version: string): Captured {
  return JSON.parse(readFileSync(join(DIR, `${name}-${version}.json`), "utf8")) as Captured;
}

interface Expected {
  name: string;
  nodeName: string;
  format: string;
  virtualSize: number;
  hasBacking: boolean;
  bitmaps: string[];
}

function summary(c: Captured): Expected[] {
  return disksFromGraph(c["query-block"], c["query-named-block-nodes"], c["x-debug-query-block-graph"]).map((d) => ({
    name: d.name,
    nodeName: d.nodeName,
    format: d.format,
    virtualSize: d.virtualSize,
    hasBacking: d.hasBacking,
    bitmaps: d.bitmaps.map((b) => b.name).sort(),
  }));
}

const overlay = (nodeName: string, bitmaps: string[]): Expected => ({
  name: "virtio-disk0",
  nodeName,
  format: "qcow2",
  virtualSize: 16 * MiB,
  hasBacking: true,
  bitmaps,
});
const vda: Expected = {
  name: "vda",
  nodeName: "drive-vda",
  format: "qcow2",
  virtualSize: 16 * MiB,
  hasBacking: false,
  bitmaps: ["cp1", "cp2"],
};
const vdb: Expected = { name: "vdb", nodeName: "drive-vdb", format: "raw", virtualSize: 8 * MiB, hasBacking: false, bitmaps: [] };

const CASES: { name: string; why: string; expected: Expected[] }[] = [
  {
    name: "graph-libvirt-chain",
    why: "libvirt chain: one disk on the overlay; the named backing node is no disk",
    expected: [overlay("libvirt-1-format", ["cp1"])],
  },
  {
    name: "graph-libvirt-throttle",
    why: "a device over a throttle filter: the disk is the format node below it",
    expected: [overlay("libvirt-1-format", ["cp1"])],
  },
  {
    name: "graph-libvirt-commit",
    why: "during an active commit: the commit filter is looked through to the new overlay; the old layers are no disks",
    expected: [overlay("libvirt-3-format", [])],
  },
  {
    name: "graph-foreign-backup",
    why: "a foreign backup's copy-before-write filter is looked through; its target is no disk",
    expected: [vda, vdb],
  },
  {
    name: "graph-foreign-mirror",
    why: "a foreign mirror's mirror_top filter is looked through; its target (held only by the job) is no disk",
    expected: [vda, vdb],
  },
  {
    name: "graph-storage-daemon",
    why: "storage daemon: nodes by name, sorted; the auto-named job filter is looked through; our target is no disk",
    expected: [
      { name: "disk0", nodeName: "disk0", format: "qcow2", virtualSize: 16 * MiB, hasBacking: false, bitmaps: ["cp1"] },
      { name: "disk1", nodeName: "disk1", format: "qcow2", virtualSize: 8 * MiB, hasBacking: false, bitmaps: [] },
    ],
  },
];

for (const version of VERSIONS) {
  t.test(`QEMU ${version}`, async (t) => {
    for (const c of CASES) t.same(summary(load(c.name, version)), c.expected, c.why);
  });
}

t.test("the captures hold what the cases claim (filters really sit above the disks)", async (t) => {
  for (const version of VERSIONS) {
    const top = (name: string) => load(name, version)["query-block"].map((b) => b.inserted?.["node-name"]);
    t.same(top("graph-libvirt-throttle"), ["libvirt-1-throttle"], `${version}: the device is on the throttle node`);
    t.same(top("graph-libvirt-commit"), ["commit-flt"], `${version}: the device is on the commit filter`);
    t.same(top("graph-foreign-backup"), ["foreign-cbw", "drive-vdb"], `${version}: vda's device is on the backup filter`);
    t.same(top("graph-foreign-mirror"), ["foreign-mirror", "drive-vdb"], `${version}: vda's device is on the mirror filter`);
    const sd = load("graph-storage-daemon", version)["query-named-block-nodes"].map((n) => n.drv);
    t.ok(sd.includes("copy-before-write"), `${version}: the storage daemon's job put a filter in`);
  }
});

t.test("bitmap details come from the disk node, not the filter", async (t) => {
  for (const version of VERSIONS) {
    const c = load("graph-foreign-backup", version);
    const d = disksFromGraph(c["query-block"], c["query-named-block-nodes"], c["x-debug-query-block-graph"])[0]!;
    t.same(
      d.bitmaps.map((b) => ({ ...b })).sort((a, b) => (a.name < b.name ? -1 : 1)),
      ["cp1", "cp2"].map((name) => ({
        name,
        persistent: true,
        recording: true,
        busy: false,
        granularity: 65536,
        count: MiB,
        inconsistent: false,
      })),
      `${version}: both bitmaps counted the guest's 1 MiB write`,
    );
    t.equal(d.qdev, "/machine/peripheral/vda/virtio-backend");
    t.equal(d.clusterSize, 65536);
  }
});
