/**
 * The backup set's manifest and prune plan, without QEMU: a hand-edited
 * manifest never names a file outside the set, chains are followed and
 * checked link by link, and prune keeps the newest points with the oldest
 * kept incremental's chain merged into it.
 */
import t from "tap";
import { SetLocks } from "../../src/sets/lock.js";
import { chainOf, imageFile, type Point, parseIndex, parsePoint, SET_FORMAT, type SetIndex } from "../../src/sets/manifest.js";
import { planPrune } from "../../src/sets/prune.js";

const sha = "a".repeat(64);
const point = (seq: number, parent: number | null, disks = ["vda", "vdb"]): Point => ({
  format: "qbackupd-point/1",
  seq,
  checkpoint: `c${seq}`,
  time: "2026-12-07T00:00:00.000Z",
  kind: parent === null ? "full" : "incremental",
  parent,
  disks: disks.map((name) => ({
    name,
    file: imageFile(seq, name),
    backing: parent === null ? null : imageFile(parent, name),
    virtualSize: 1,
    dataSize: 1,
    sha256: sha,
  })),
});
const index = (seqs: number[]): SetIndex => ({
  format: SET_FORMAT,
  domain: "vm1",
  created: "x",
  points: seqs.map((seq) => ({ seq, checkpoint: `c${seq}` })),
  abandoned: [],
  nextSeq: Math.max(0, ...seqs) + 1,
});

t.test("manifests: a file outside the set, a broken kind, a bad order are refused as set-corrupt", async (t) => {
  const p = point(2, 1);
  t.ok(parsePoint(JSON.parse(JSON.stringify(p)), "p").isOk());
  for (const file of ["../../etc/passwd", "/etc/shadow", "data/../../x.qcow2", "data/000001.vda.raw", "data/1.vda.qcow2"]) {
    const bad = { ...p, disks: [{ ...p.disks[0]!, file }] };
    const r = parsePoint(bad, "p");
    t.ok(r.isErr() && r.error.code === "set-corrupt", `file '${file}' refused`);
  }
  t.ok(parsePoint({ ...p, parent: null }, "p").isErr(), "an incremental without a parent");
  t.ok(parsePoint({ ...p, disks: [{ ...p.disks[0]!, sha256: "zz" }] }, "p").isErr(), "a digest that is not one");
  t.ok(parseIndex(index([1, 2]), "i").isOk());
  t.ok(
    parseIndex(
      {
        ...index([1, 2]),
        points: [
          { seq: 2, checkpoint: "c2" },
          { seq: 1, checkpoint: "c1" },
        ],
      },
      "i",
    ).isErr(),
    "out of order",
  );
  t.ok(parseIndex({ ...index([1, 2]), nextSeq: 2 }, "i").isErr(), "a number at or above nextSeq");
  t.ok(parseIndex({ ...index([1]), domain: "../x" }, "i").isErr(), "a domain name that is not one");
  t.ok(parseIndex("[]", "i").isErr());
});

t.test("chains: followed down to the full, each link checked", async (t) => {
  const pts = new Map([1, 2, 3].map((s) => [s, point(s, s === 1 ? null : s - 1)]));
  const c = chainOf(pts, 3, "vda");
  t.same(
    c._unsafeUnwrap().map((d) => d.file),
    [imageFile(3, "vda"), imageFile(2, "vda"), imageFile(1, "vda")],
  );
  pts.delete(2);
  t.ok(chainOf(pts, 3, "vda").isErr(), "a missing link");
  const loop = new Map([[1, { ...point(1, 1) }]]);
  t.ok(chainOf(loop, 1, "vda").isErr(), "a loop");
});

t.test("prune plan: newest N kept, the oldest kept incremental's chain merged into it", async (t) => {
  const pts = new Map([1, 2, 3, 4].map((s) => [s, point(s, s === 1 ? null : s - 1)]));
  const p = planPrune(index([1, 2, 3, 4]), pts, 2)._unsafeUnwrap();
  t.same(p.keep, [3, 4]);
  t.same(p.drop, [1, 2]);
  t.same(p.merges, [
    { point: 3, disk: "vda", base: imageFile(1, "vda"), top: imageFile(3, "vda") },
    { point: 3, disk: "vdb", base: imageFile(1, "vdb"), top: imageFile(3, "vdb") },
  ]);
  // the oldest kept is a full: nothing to merge
  const withFull = new Map([...pts, [3, point(3, null)], [4, point(4, 3)]]);
  t.same(planPrune(index([1, 2, 3, 4]), withFull, 2)._unsafeUnwrap().merges, []);
  t.same(planPrune(index([1, 2]), pts, 5)._unsafeUnwrap().drop, [], "fewer points than kept: nothing");
  t.equal(planPrune(index([1]), pts, 0)._unsafeUnwrapErr().code, "bad-request");
});

t.test("locks: one backup, prune alone, readers together", async (t) => {
  const l = new SetLocks();
  const b = l.acquire("/s", "backup", "b")._unsafeUnwrap();
  t.ok(l.acquire("/s", "backup", "b2").isErr(), "a second backup");
  t.ok(l.acquire("/s", "prune", "p").isErr(), "a prune during a backup");
  const r = l.acquire("/s", "restore", "r")._unsafeUnwrap();
  t.ok(l.acquire("/other", "prune", "p").isOk(), "another set");
  b();
  t.ok(l.acquire("/s", "prune", "p").isErr(), "a prune during a restore");
  r();
  r();
  const p = l.acquire("/s", "prune", "p")._unsafeUnwrap();
  t.ok(l.acquire("/s", "verify", "v").isErr(), "a reader during a prune");
  p();
  t.same(l.holders("/s"), []);
});
