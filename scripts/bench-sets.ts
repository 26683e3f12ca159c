/**
 * Backup-set benchmark on real QEMU, through the CLI:
 *   (a) restore of a full + 5 incrementals (`qbackup restore`, which creates
 *       the file, runs `qemu-img convert -n --target-is-zero` and fsyncs it)
 *       against `qemu-img convert -f qcow2 -O raw` of the same chain top
 *       (qemu-img's default cache=unsafe: never flushed) and against the same
 *       with `-t writeback` (flushed at close, as ours is); interleaved
 *       trials, the order alternating within each pair, outputs deleted
 *       between trials; the median of the per-pair ratios with min–max;
 *   (b) what a digest costs: src/sets/digest.ts digestFile over the full's
 *       image, against `cat FILE > /dev/null` of the same file, interleaved,
 *       as seconds per GiB of file; warm (the page cache holds the file, as
 *       right after a backup) and cold (the file's pages dropped first with
 *       `dd iflag=nocache`, which drops that file's cache only).
 *   node --import tsx scripts/bench-sets.ts [--size-gib 1] [--data-mib 512] [--pairs 7]
 */
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { rmSync, statSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { digestFile } from "../src/sets/digest.js";
import { addDomain, type CliResult, cli, startDaemon } from "../test/helpers/daemon.js";
import { execFileP, startVm, tempDir } from "../test/helpers/qemu.js";
import { Cleanup } from "./lib/teardown.js";

const { values } = parseArgs({
  options: {
    "size-gib": { type: "string", default: "1" },
    "data-mib": { type: "string", default: "512" },
    pairs: { type: "string", default: "7" },
  },
});
const SIZE_GIB = Number(values["size-gib"]);
const DATA_MIB = Number(values["data-mib"]);
const PAIRS = Number(values.pairs);
const MiB = 1 << 20;
const GiB = 1 << 30;

const sortedOf = (xs: number[]) => [...xs].sort((a, b) => a - b);
const median = (xs: number[]) => {
  const s = sortedOf(xs);
  return s.length % 2 === 1 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};
async function timed(fn: () => Promise<unknown>): Promise<number> {
  const s = process.hrtime.bigint();
  await fn();
  return Number(process.hrtime.bigint() - s) / 1e9;
}
const ratioLine = (ours: number[], base: number[]) => {
  const r = ours.map((x, i) => x / base[i]!);
  const s = sortedOf(r);
  return `median ${median(r).toFixed(2)}x (${s[0]!.toFixed(2)}–${s.at(-1)!.toFixed(2)}), ${r.length} pairs`;
};
const sh = (cmd: string) =>
  new Promise<void>((resolve, reject) => execFile("sh", ["-c", cmd], (e) => (e === null ? resolve() : reject(e))));

const cleanup = new Cleanup();
try {
  // filled offline before QEMU opens it (see bench-backup.ts): 4 MiB extents spread evenly over the disk
  const imgDir = tempDir(cleanup, "qbk-bench-sets-img-");
  const image = join(imgDir, "vda.qcow2");
  await execFileP("qemu-img", ["create", "-q", "-f", "qcow2", image, `${SIZE_GIB}G`]);
  const extents = DATA_MIB / 4;
  const stride = Math.floor((SIZE_GIB * 1024) / extents) * MiB;
  const writes: string[] = [];
  for (let i = 0; i < extents; i++) writes.push("-c", `write -P ${(i % 250) + 1} ${i * stride} ${4 * MiB}`);
  await execFileP("qemu-io", ["-f", "qcow2", ...writes, image], { maxBuffer: 64 * MiB });

  const vm = await startVm(cleanup, { images: [image] });
  const work = tempDir(cleanup, "qbk-bench-sets-");
  const d = await startDaemon(cleanup, { args: ["--allow-dir", work] });
  const ok = async (...args: string[]): Promise<CliResult> => {
    const r = await cli(d.socket, args);
    if (r.code !== 0) throw new Error(`qbackup ${args.join(" ")}: exit ${r.code}: ${r.stderr.trim()}`);
    return r;
  };
  await addDomain(d, "vm1", vm.qmpPath);
  const set = join(work, "set");
  await ok("backup", "vm1", set);
  // five incrementals, each after 16 MiB of 1 MiB guest writes at spread offsets
  for (let r = 0; r < 5; r++) {
    for (let k = 0; k < 16; k++) {
      const n = r * 16 + k;
      await vm.write(0, 0x80 + r, ((n * 37) % extents) * stride + (n % 4) * MiB, MiB);
    }
    await ok("backup", "vm1", set);
  }
  const list = JSON.parse((await ok("--json", "backup-list", set)).stdout) as {
    points: { checkpoint: string; kind: string; disks: { name: string; file: string }[] }[];
  };
  const kinds = list.points.map((p) => p.kind).join(",");
  if (kinds !== "full,incremental,incremental,incremental,incremental,incremental") throw new Error(`backup-list: ${kinds}`);
  const top = join(set, list.points.at(-1)!.disks[0]!.file);
  const fullImage = join(set, list.points[0]!.disks[0]!.file);
  const chainMiB = list.points.reduce((a, p) => a + statSync(join(set, p.disks[0]!.file)).size, 0) / MiB;
  console.log(
    `${SIZE_GIB} GiB qcow2 disk holding ${DATA_MIB} MiB, QEMU ${vm.monitor.version.package}; set: full + 5 incrementals, ${chainMiB.toFixed(0)} MiB of images`,
  );

  // (a) restore
  const convert: number[] = [];
  const convertWb: number[] = [];
  const ours: number[] = [];
  const out = join(work, "restore.raw");
  const same = async () => {
    const r = await execFileP("qemu-img", ["compare", "-q", "-f", "raw", "-F", "qcow2", out, top]).then(
      () => true,
      () => false,
    );
    if (!r) throw new Error("the restore differs from the chain top");
  };
  const base = () => timed(() => execFileP("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", top, out]));
  const baseWb = () => timed(() => execFileP("qemu-img", ["convert", "-t", "writeback", "-f", "qcow2", "-O", "raw", top, out]));
  const mine = () => timed(() => ok("restore", set, "vda", out));
  // one warm-up of each (page cache of the chain, qemu-img and node on disk), not counted
  for (const f of [base, mine]) {
    await f();
    rmSync(out, { force: true });
  }
  for (let i = 0; i < PAIRS; i++) {
    const order: [number[], () => Promise<number>][] = [
      [convert, base],
      [convertWb, baseWb],
      [ours, mine],
    ];
    if (i % 2 === 1) order.reverse();
    for (const [xs, f] of order) {
      xs.push(await f());
      if (i === 0 && f === mine) await same();
      rmSync(out, { force: true });
      await sh("sync");
    }
  }
  const s = (xs: number[]) => `${median(xs).toFixed(2)} s`;
  console.log(
    `  qemu-img convert -f qcow2 -O raw      ${s(convert)}   qemu-img convert -t writeback ${s(convertWb)}   qbackup restore ${s(ours)}`,
  );
  const rtt: number[] = [];
  for (let i = 0; i < 5; i++) rtt.push(await timed(() => ok("backup-list", set)));
  console.log(`  (a qbackup round trip alone, backup-list: ${median(rtt).toFixed(2)} s)`);
  console.log(`restore full+5 inc: ours/convert median ${ratioLine(ours, convert).replace(/^median /, "")}`);
  console.log(`restore full+5 inc: ours/convert -t writeback ${ratioLine(ours, convertWb)}`);

  // (b) digests
  const bytes = statSync(fullImage).size;
  const perGiB = (sec: number) => sec / (bytes / GiB);
  const digest = () =>
    timed(async () => {
      (await digestFile(fullImage))._unsafeUnwrap();
    });
  const cat = () => timed(() => sh(`cat '${fullImage}' > /dev/null`));
  const drop = () => sh(`dd if='${fullImage}' iflag=nocache count=0 status=none`);
  const results: Record<"warm" | "cold", { dig: number[]; read: number[] }> = {
    warm: { dig: [], read: [] },
    cold: { dig: [], read: [] },
  };
  await cat();
  for (const mode of ["warm", "cold"] as const) {
    for (let i = 0; i < PAIRS; i++) {
      const order: [number[], () => Promise<number>][] = [
        [results[mode].read, cat],
        [results[mode].dig, digest],
      ];
      if (i % 2 === 1) order.reverse();
      for (const [xs, f] of order) {
        if (mode === "cold") await drop();
        else await cat();
        xs.push(await f());
      }
    }
  }
  // SHA-256 alone: 1 GiB through the hash in digestFile's 4 MiB chunks, from one buffer the CPU cache mostly holds
  const chunk = Buffer.alloc(4 * MiB, 0x5a);
  const shaRuns: number[] = [];
  for (let i = 0; i < 3; i++)
    shaRuns.push(
      await timed(async () => {
        const h = createHash("sha256");
        for (let k = 0; k < 256; k++) h.update(chunk);
        h.digest();
      }),
    );
  const shaAlone = median(shaRuns);
  console.log(`  full image ${fullImage.replace(`${set}/`, "")}: ${(bytes / MiB).toFixed(0)} MiB file, ${PAIRS} interleaved pairs each`);
  for (const mode of ["warm", "cold"] as const) {
    const r = results[mode];
    console.log(
      `digest (${mode} cache): ${perGiB(median(r.dig)).toFixed(2)} s/GiB (read alone ${perGiB(median(r.read)).toFixed(2)} s/GiB); digest/read ${ratioLine(r.dig, r.read)}`,
    );
  }
  console.log(`  SHA-256 alone in memory: ${shaAlone.toFixed(2)} s/GiB`);
} finally {
  await cleanup.run();
}
