/**
 * Replies real QEMU would never send, for fuzzing the QMP layer and the
 * daemon (src/qmp/shapes.ts must turn each into a protocol error, or let it
 * pass when it fits): well-formed samples, values of every wrong type, and
 * samples with a member deleted or replaced.
 */
import type { QmpCommandName } from "../../src/qmp/index.js";

/** Commands whose reply some code reads (the rest answer `{}`, checked only to be an object). */
export const READ_COMMANDS = [
  "query-version",
  "query-qmp-schema",
  "query-status",
  "query-block",
  "query-named-block-nodes",
  "x-debug-query-block-graph",
  "query-jobs",
  "qom-list",
  "query-block-exports",
  "human-monitor-command",
] as const satisfies readonly QmpCommandName[];

/** Well-formed replies, as QEMU gives them, to mutate. */
export const SAMPLES: Record<(typeof READ_COMMANDS)[number], unknown> = {
  "query-version": { qemu: { major: 7, minor: 2, micro: 0 }, package: "fake" },
  "query-qmp-schema": [
    { name: "blockdev-backup", "meta-type": "command", "arg-type": "1" },
    { name: "1", "meta-type": "object", members: [{ name: "x-perf", type: "2" }, { name: "device" }] },
    { name: "2", "meta-type": "object", members: [{ name: "bitmaps" }, { name: "allocation-depth" }] },
    { name: "3", "meta-type": "enum", values: ["a"] },
  ],
  "query-status": { running: false, status: "prelaunch" },
  "query-block": [
    {
      device: "",
      qdev: "/machine/peripheral/vda/virtio-backend",
      type: "unknown",
      removable: false,
      locked: false,
      inserted: {
        "node-name": "drive-vda",
        drv: "qcow2",
        ro: false,
        file: "/x.qcow2",
        image: { filename: "/x.qcow2", "virtual-size": 1048576, "cluster-size": 65536, "backing-image": { filename: "/b" } },
        "dirty-bitmaps": [{ name: "c1", count: 0, granularity: 65536, recording: true, busy: false, persistent: true }],
      },
    },
  ],
  "query-named-block-nodes": [
    {
      "node-name": "drive-vda",
      drv: "qcow2",
      ro: false,
      backing_file: "/b",
      image: { filename: "/x.qcow2", "virtual-size": 1048576, "backing-filename": "/b" },
      "dirty-bitmaps": [{ name: "c1", count: 0, granularity: 65536, recording: true, busy: false, persistent: true, inconsistent: true }],
    },
    { "node-name": "#block123", drv: "file", ro: false, image: { filename: "/x.qcow2", "virtual-size": 1 } },
  ],
  "x-debug-query-block-graph": {
    nodes: [
      { id: 1, type: "block-backend", name: "vda" },
      { id: 2, type: "block-driver", name: "drive-vda" },
    ],
    edges: [{ parent: 1, child: 2, name: "root", perm: [], "shared-perm": [] }],
  },
  "query-jobs": [{ id: "j", type: "backup", status: "running", "current-progress": 1, "total-progress": 2 }],
  "qom-list": [
    { name: "qbk-owner-x", type: "child<secret>" },
    { name: "io0", type: "child<iothread>" },
  ],
  "query-block-exports": [{ id: "e", type: "fuse", "node-name": "drive-vda", "shutting-down": false }],
  "human-monitor-command": "",
};

/** Seeded, so a failure can be replayed. */
export function mulberry32(seed: number): () => number {
  let a = seed;
  return () => {
    a = (a + 0x6d2b79f5) | 0;
    let x = Math.imul(a ^ (a >>> 15), 1 | a);
    x = (x + Math.imul(x ^ (x >>> 7), 61 | x)) ^ x;
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
}

export const WRONG: readonly unknown[] = [0, -1, 1.5, "", "x", true, false, null, [], [0], ["x"], [null], {}, { a: 1 }, [{}]];

/** Every (container, key) in a JSON value. */
function slots(v: unknown, out: [Record<string, unknown> | unknown[], string | number][] = []) {
  if (Array.isArray(v)) {
    v.forEach((x, i) => {
      out.push([v, i]);
      slots(x, out);
    });
  } else if (typeof v === "object" && v !== null) {
    for (const [k, x] of Object.entries(v)) {
      out.push([v as Record<string, unknown>, k]);
      slots(x, out);
    }
  }
  return out;
}

/** A wrong value of any type, or a sample with one member deleted or replaced by a wrong type. */
export function nonsense(command: string, rnd: () => number): unknown {
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rnd() * xs.length)]!;
  const sample = SAMPLES[command as keyof typeof SAMPLES];
  if (sample === undefined || rnd() < 0.25) return pick(WRONG);
  const v = structuredClone(sample);
  const all = slots(v);
  if (all.length === 0) return pick(WRONG);
  for (let n = 1 + Math.floor(rnd() * 2); n > 0; n--) {
    const [box, key] = pick(all);
    if (!Array.isArray(box) && rnd() < 0.4) delete box[key as string];
    else (box as Record<string | number, unknown>)[key] = pick(WRONG);
  }
  return v;
}
