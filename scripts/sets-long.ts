/**
 * Backup sets, long form, on real QEMU through the CLI: a 2-disk VM of 64 MiB
 * disks, one full then --rounds automatic incrementals with random guest
 * writes between (64 KiB aligned: offsets, lengths and patterns from a seeded
 * PRNG, a few per round on either disk); a byte model of every point (kept
 * as the log of writes, replayed per point); verify; a few restores before
 * the prune; prune --keep N; verify; every kept point of every disk restored
 * (--at) and compared byte-exact against the model; the pruned points gone.
 *   node --import tsx scripts/sets-long.ts [--rounds 30] [--keep 7] [--seed N]
 */
import { existsSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { addDomain, type CliResult, cli, startDaemon } from "../test/helpers/daemon.js";
import { execFileP, startVm, tempDir } from "../test/helpers/qemu.js";
import { Cleanup } from "./lib/teardown.js";

const { values } = parseArgs({
  options: {
    rounds: { type: "string", default: "30" },
    keep: { type: "string", default: "7" },
    seed: { type: "string" },
    disks: { type: "string", default: "2" },
  },
});
const ROUNDS = Number(values.rounds);
const KEEP = Number(values.keep);
const SEED = values.seed === undefined ? Math.floor(Math.random() * 2 ** 31) : Number(values.seed);
const NDISKS = Number(values.disks);
const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 64 * MiB;
const BLOCK = 64 * KiB;
const DEVS = ["vda", "vdb", "vdc", "vdd"].slice(0, NDISKS);
if (!(ROUNDS >= 1 && KEEP >= 1 && KEEP <= ROUNDS + 1 && NDISKS >= 1 && NDISKS <= 4)) {
  console.error("usage: sets-long [--rounds N ≥ 1] [--keep K, 1 ≤ K ≤ N+1] [--seed S] [--disks 1..4]");
  process.exit(2);
}

/** mulberry32: small, seeded, good enough to place writes. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
}
const rnd = prng(SEED);
const int = (lo: number, hi: number) => lo + Math.floor(rnd() * (hi - lo + 1));

interface Write {
  disk: number;
  pattern: number;
  offset: number;
  length: number;
}
interface Listing {
  points: { checkpoint: string; kind: string; merged: boolean; disks: { name: string; file: string }[] }[];
}

class Failure extends Error {}
const fail = (m: string): never => {
  throw new Failure(m);
};

const cleanup = new Cleanup();
const t0 = Date.now();
const phase = (s: string) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1).padStart(6)} s] ${s}`);
try {
  console.log(`sets-long: seed ${SEED}, ${ROUNDS} rounds, keep ${KEEP}, ${NDISKS} disk(s) of ${SIZE / MiB} MiB`);
  const vm = await startVm(cleanup, { disks: DEVS.map(() => ({ size: `${SIZE / MiB}M` })) });
  const work = tempDir(cleanup, "qbk-sets-long-");
  const d = await startDaemon(cleanup, { args: ["--allow-dir", work] });
  const q = (...args: string[]) => cli(d.socket, args);
  const ok = async (...args: string[]): Promise<CliResult> => {
    const r = await q(...args);
    if (r.code !== 0) fail(`qbackup ${args.join(" ")}: exit ${r.code}: ${r.stderr.trim() || r.stdout.trim()}`);
    return r;
  };
  await addDomain(d, "vm1", vm.qmpPath);
  const set = join(work, "set");

  // log[i]: the writes made before point i's backup
  const log: Write[][] = [];
  const guestWrites = async (n: number): Promise<Write[]> => {
    const ws: Write[] = [];
    for (let k = 0; k < n; k++) {
      const blocks = SIZE / BLOCK;
      const at = int(0, blocks - 1);
      const len = Math.min(int(1, 32), blocks - at);
      const w = { disk: int(0, NDISKS - 1), pattern: int(1, 255), offset: at * BLOCK, length: len * BLOCK };
      await vm.write(w.disk, w.pattern, w.offset, w.length);
      ws.push(w);
    }
    return ws;
  };
  const modelAt = (point: number): Buffer[] => {
    const m = DEVS.map(() => Buffer.alloc(SIZE));
    for (const ws of log.slice(0, point + 1)) for (const w of ws) m[w.disk]!.fill(w.pattern, w.offset, w.offset + w.length);
    return m;
  };
  /** Restore `dev` at `checkpoint` and compare it with the model, byte for byte (Buffer compare and qemu-img compare). */
  const restoreExact = async (point: number, checkpoint: string): Promise<void> => {
    const m = modelAt(point);
    for (const [k, dev] of DEVS.entries()) {
      const out = join(work, `restored-${point}-${dev}.raw`);
      const ref = join(work, `model-${point}-${dev}.raw`);
      writeFileSync(ref, m[k]!);
      await ok("restore", set, dev, out, "--at", checkpoint);
      const same = await execFileP("qemu-img", ["compare", "-q", "-f", "raw", "-F", "raw", out, ref]).then(
        () => true,
        () => false,
      );
      if (!same) {
        const diff = await execFileP("qemu-img", ["compare", "-f", "raw", "-F", "raw", out, ref]).then(
          (r) => r.stdout,
          (e: { stdout?: string }) => e.stdout ?? "",
        );
        fail(`point ${point} (${checkpoint}) ${dev}: restore differs from the model: ${diff.trim()}`);
      }
      rmSync(out, { force: true });
      rmSync(ref, { force: true });
    }
  };
  const listing = async (): Promise<Listing> => JSON.parse((await ok("--json", "backup-list", set)).stdout) as Listing;

  // phase 1: a full, then ROUNDS incrementals with writes between
  log.push(await guestWrites(int(2, 5)));
  const b0 = await ok("--json", "backup", "vm1", set);
  if ((JSON.parse(b0.stdout) as { kind: string }).kind !== "full") fail(`the first backup is not a full: ${b0.stdout}`);
  const backupMs: number[] = [];
  for (let r = 1; r <= ROUNDS; r++) {
    log.push(await guestWrites(int(1, 5)));
    const s = Date.now();
    const b = await ok("--json", "backup", "vm1", set);
    backupMs.push(Date.now() - s);
    const kind = (JSON.parse(b.stdout) as { kind: string }).kind;
    if (kind !== "incremental") fail(`backup ${r} is a ${kind}, not an incremental: ${b.stdout}`);
  }
  const nWrites = log.reduce((a, ws) => a + ws.length, 0);
  const nBytes = log.reduce((a, ws) => a + ws.reduce((b, w) => b + w.length, 0), 0);
  const before = await listing();
  const kinds = before.points.map((p) => p.kind);
  if (kinds.length !== ROUNDS + 1 || kinds[0] !== "full" || kinds.slice(1).some((k) => k !== "incremental"))
    fail(`backup-list: ${kinds.join(",")}`);
  const sorted = [...backupMs].sort((a, b) => a - b);
  phase(
    `backup: 1 full + ${ROUNDS} incrementals, ${nWrites} guest writes (${(nBytes / MiB).toFixed(1)} MiB); incremental median ${sorted[Math.floor(sorted.length / 2)]} ms, max ${sorted.at(-1)} ms; backup-list shows ${kinds.length} points`,
  );

  // phase 2: verify, and a few restores before the prune (the oldest, a middle one, the newest)
  const v1 = await q("verify", set);
  if (v1.code !== 0) fail(`verify before the prune: exit ${v1.code}: ${v1.stdout}${v1.stderr}`);
  phase(`verify before prune: exit 0 (${v1.stdout.trim().split("\n").at(-1)})`);
  const early = [...new Set([0, Math.floor(ROUNDS / 2), ROUNDS])];
  for (const i of early) await restoreExact(i, before.points[i]!.checkpoint);
  phase(`restore before prune: points ${early.join(", ")} × ${NDISKS} disk(s) exact`);

  // phase 3: prune, verify
  const names = before.points.map((p) => p.checkpoint);
  const pr = await ok("prune", set, "--keep", String(KEEP));
  const after = await listing();
  const keptNames = names.slice(-KEEP);
  if (JSON.stringify(after.points.map((p) => p.checkpoint)) !== JSON.stringify(keptNames))
    fail(`after prune: ${after.points.map((p) => p.checkpoint).join(",")}, expected ${keptNames.join(",")}`);
  if (KEEP < ROUNDS + 1 && (after.points[0]!.kind !== "full" || !after.points[0]!.merged))
    fail(`the oldest kept point is not a merged full: ${JSON.stringify(after.points[0])}`);
  const liveFiles = new Set(after.points.flatMap((p) => p.disks.map((x) => x.file.replace(/^data\//, ""))));
  const extra = readdirSync(join(set, "data")).filter((f) => !liveFiles.has(f));
  if (extra.length > 0) fail(`files left in data/ after the prune: ${extra.join(", ")}`);
  const gone = await q("restore", set, DEVS[0]!, join(work, "gone.raw"), "--at", names[0]!);
  if (KEEP < ROUNDS + 1 && gone.code !== 3) fail(`restore of a pruned point: exit ${gone.code}, expected 3`);
  if (existsSync(join(work, "gone.raw"))) fail("a refused restore left its file");
  const cps = (await ok("checkpoint-list", "vm1", "--name")).stdout
    .trim()
    .split("\n")
    .filter((x) => x !== "");
  if (JSON.stringify(cps) !== JSON.stringify([names.at(-1)])) fail(`checkpoints left after the prune: ${cps.join(", ")}`);
  const said = pr.stdout.split("\n")[0]!.replace(/:.*/, "");
  phase(
    `prune --keep ${KEEP}: ${said}; ${readdirSync(join(set, "data")).length} image files left, only the newest checkpoint left, pruned points refused`,
  );
  const v2 = await q("verify", set);
  if (v2.code !== 0) fail(`verify after the prune: exit ${v2.code}: ${v2.stdout}${v2.stderr}`);
  phase(`verify after prune: exit 0 (${v2.stdout.trim().split("\n").at(-1)})`);

  // phase 4: every kept point, every disk
  for (const [j, p] of after.points.entries()) await restoreExact(ROUNDS + 1 - KEEP + j, p.checkpoint);
  phase(`restore after prune: ${KEEP} points × ${NDISKS} disk(s) exact`);
  console.log(`sets-long: ${ROUNDS + 1} points, pruned to ${KEEP}, all restores exact (seed ${SEED})`);
} catch (e) {
  console.error(`sets-long: FAILED (seed ${SEED}): ${e instanceof Failure ? e.message : (e as Error).stack}`);
  process.exitCode = 1;
} finally {
  await cleanup.run();
}
