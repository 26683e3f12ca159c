/**
 * The checkpoint hierarchy (src/checkpoints/tree.ts) and checkpoint validity
 * (src/checkpoints/validity.ts) on fixture inputs: a forest with siblings,
 * a missing parent and a cycle; disks as discovery reports them from a
 * graph captured from real QEMU, and each way a bitmap can be untrustworthy.
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { checkTree, descendants, leaves, renderTree, roots, topological } from "../../src/checkpoints/tree.js";
import { assessCheckpoints, checkpointProblems } from "../../src/checkpoints/validity.js";
import type { CheckpointDefFull } from "../../src/conf/checkpoint.js";
import { type DirtyBitmap, type DiskInfo, disksFromGraph } from "../../src/qmp/disks.js";

function cp(name: string, creationTime: number, parent?: string, bitmaps: Record<string, string> = { vda: name }): CheckpointDefFull {
  return {
    name,
    creationTime,
    ...(parent === undefined ? {} : { parent }),
    disks: Object.entries(bitmaps).map(([disk, bitmap]) => ({ name: disk, checkpoint: "bitmap" as const, bitmap })),
  };
}

function map(...defs: CheckpointDefFull[]): Map<string, CheckpointDefFull> {
  return new Map(defs.map((d) => [d.name, d]));
}

/**
 *   a ─┬─ b ── d
 *      └─ c          (c younger than b)
 *   e                (second root, older than a)
 */
const FOREST = map(cp("d", 40, "b"), cp("c", 30, "a"), cp("b", 20, "a"), cp("a", 10), cp("e", 5));

const names = (l: readonly CheckpointDefFull[]) => l.map((c) => c.name);

t.test("tree: roots, leaves, descendants, topological order, by age", async (t) => {
  t.same(names(roots(FOREST)), ["e", "a"], "roots oldest first");
  t.same(names(leaves(FOREST)), ["e", "c", "d"]);
  t.same(names(descendants(FOREST, "a", false)), ["b", "c"], "children");
  t.same(names(descendants(FOREST, "a", true)), ["b", "d", "c"], "descendants: parents before children");
  t.same(names(descendants(FOREST, "d", true)), []);
  t.same(names(topological(FOREST)), ["e", "a", "b", "d", "c"]);
  t.same(checkTree(FOREST), []);
});

t.test("tree: equal creation times are ordered by name", async (t) => {
  const m = map(cp("z", 1), cp("m", 1), cp("a", 1));
  t.same(names(roots(m)), ["a", "m", "z"]);
});

t.test("tree: rendering as virsh checkpoint-list --tree", async (t) => {
  t.equal(renderTree(FOREST), ["e", "a", "├─ b", "│  └─ d", "└─ c", ""].join("\n"));
  t.equal(renderTree(new Map()), "");
});

t.test("tree: a missing parent makes a root, a cycle is reported; neither is fatal", async (t) => {
  const m = map(cp("a", 1), cp("orphan", 2, "gone"), cp("x", 3, "y"), cp("y", 4, "x"));
  t.same(names(roots(m)), ["a", "orphan"]);
  t.same(names(topological(m)), ["a", "orphan"], "the cycle is unreachable from any root");
  t.same(checkTree(m), [
    "checkpoint 'orphan' names parent 'gone', which does not exist; treated as a root",
    "checkpoint 'x' is part of a parent cycle",
    "checkpoint 'y' is part of a parent cycle",
  ]);
});

/** vda and vdb as discovery reads them from a graph captured from QEMU 10.0: cp1, cp2 on vda, under a foreign backup's filter. */
function capturedDisks(): DiskInfo[] {
  const c = JSON.parse(readFileSync(join(import.meta.dirname, "..", "fixtures", "qmp", "graph-foreign-backup-10.0.json"), "utf8"));
  return disksFromGraph(c["query-block"], c["query-named-block-nodes"], c["x-debug-query-block-graph"]);
}

function withBitmap(disks: readonly DiskInfo[], disk: string, bitmap: string, over: Partial<DirtyBitmap> | undefined): DiskInfo[] {
  return disks.map((d) =>
    d.name !== disk
      ? d
      : {
          ...d,
          bitmaps:
            over === undefined
              ? d.bitmaps.filter((b) => b.name !== bitmap)
              : d.bitmaps.map((b) => (b.name === bitmap ? { ...b, ...over } : b)),
        },
  );
}

t.test("validity: the captured disks hold both checkpoints' bitmaps", async (t) => {
  const disks = capturedDisks();
  const a = assessCheckpoints(map(cp("cp1", 1), cp("cp2", 2, "cp1")), disks);
  t.same(
    [...a.problems],
    [
      ["cp1", []],
      ["cp2", []],
    ],
  );
  t.same(a.unclaimed, []);
});

t.test("validity: each way a bitmap is untrustworthy", async (t) => {
  const disks = capturedDisks();
  const cp1 = cp("cp1", 1);
  const cases: [string, DiskInfo[], string[]][] = [
    ["missing", withBitmap(disks, "vda", "cp1", undefined), ["bitmap 'cp1' on disk 'vda' is missing"]],
    [
      "inconsistent",
      withBitmap(disks, "vda", "cp1", { inconsistent: true }),
      ["bitmap 'cp1' on disk 'vda' is inconsistent (QEMU did not shut down cleanly)"],
    ],
    ["not persistent", withBitmap(disks, "vda", "cp1", { persistent: false }), ["bitmap 'cp1' on disk 'vda' is not persistent"]],
    ["not recording", withBitmap(disks, "vda", "cp1", { recording: false }), ["bitmap 'cp1' on disk 'vda' is not recording guest writes"]],
    ["busy", withBitmap(disks, "vda", "cp1", { busy: true }), ["bitmap 'cp1' on disk 'vda' is busy (in use by another job)"]],
    ["disk gone", disks.filter((d) => d.name !== "vda"), ["disk 'vda' is gone from the domain"]],
  ];
  for (const [what, d, expected] of cases) t.same(checkpointProblems(cp1, d), expected, what);
  t.same(checkpointProblems(cp1, withBitmap(disks, "vda", "cp1", { busy: true }), new Set(["vda/cp1"])), [], "busy by our own job: valid");
  t.same(
    checkpointProblems(cp("two", 1, undefined, { vda: "gone1", vdb: "gone2" }), disks),
    ["bitmap 'gone1' on disk 'vda' is missing", "bitmap 'gone2' on disk 'vdb' is missing"],
    "every disk's problem is listed",
  );
  const noBitmap: CheckpointDefFull = { name: "nb", creationTime: 1, disks: [{ name: "vdb", checkpoint: "no" }] };
  t.same(checkpointProblems(noBitmap, []), [], "a disk the checkpoint does not cover is not looked at");
});

t.test("validity: unclaimed bitmaps are reported, ours in use are not", async (t) => {
  const disks = capturedDisks();
  const a = assessCheckpoints(map(cp("cp2", 2)), disks, new Set(["vdb/backup-vdb"]));
  t.same(a.unclaimed, [{ disk: "vda", bitmap: "cp1", persistent: true }]);
  const withTemp = disks.map((d) =>
    d.name === "vdb"
      ? {
          ...d,
          bitmaps: [
            { name: "backup-vdb", persistent: false, recording: false, busy: true, granularity: 65536, count: 0, inconsistent: false },
          ],
        }
      : d,
  );
  t.same(assessCheckpoints(map(cp("cp1", 1), cp("cp2", 2)), withTemp, new Set(["vdb/backup-vdb"])).unclaimed, []);
  t.same(assessCheckpoints(map(cp("cp1", 1), cp("cp2", 2)), withTemp).unclaimed, [
    { disk: "vdb", bitmap: "backup-vdb", persistent: false },
  ]);
});
