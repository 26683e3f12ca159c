/**
 * Backup sets (issue 14), through the CLI against real QEMU: a 2-disk VM, a
 * full and two automatic incrementals with guest writes between; every disk
 * restored at every point equal to the disk at that time; verify passes, and
 * fails naming the file and the points once one byte of a data cluster is
 * flipped; prune --keep 2 merges and leaves the kept points exact and the
 * pruned one gone, with the checkpoints the set no longer needs deleted; a
 * bitmap removed behind the daemon's back makes the next backup a full that
 * says why; an export serves a point over NBD; the refusals a script meets.
 */
import { spawn } from "node:child_process";
import { closeSync, existsSync, openSync, readdirSync, readFileSync, readSync, rmSync, writeFileSync, writeSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { addDomain, cliOn, startDaemon, until } from "../helpers/daemon.js";
import { execFileP, startVm, tempDir } from "../helpers/qemu.js";

const KiB = 1024;
const MiB = 1024 * KiB;

interface Listing {
  points: { checkpoint: string; kind: string; reason: string | null; merged: boolean; disks: { name: string; file: string }[] }[];
}

async function sameRaw(a: string, b: string): Promise<boolean> {
  return execFileP("qemu-img", ["compare", "-q", "-f", "raw", "-F", "raw", a, b]).then(
    () => true,
    () => false,
  );
}

/** Host offset of the first data cluster of the image's own layer. */
async function firstDataOffset(image: string): Promise<number> {
  const r = await execFileP("qemu-img", ["map", "--output=json", "-f", "qcow2", image]);
  const m = (JSON.parse(r.stdout) as { data: boolean; depth: number; offset?: number }[]).find(
    (x) => x.data && x.depth === 0 && x.offset !== undefined,
  );
  if (m === undefined) throw new Error(`no data cluster in ${image}`);
  return m.offset!;
}

function flipByte(file: string, at: number): void {
  const fd = openSync(file, "r+");
  const b = Buffer.alloc(1);
  readSync(fd, b, 0, 1, at);
  b[0] = b[0]! ^ 0xff;
  writeSync(fd, b, 0, 1, at);
  closeSync(fd);
}

t.test("backup sets: full + automatic incrementals, restore, verify, prune, fallback to full, export", async (t) => {
  const vm = await startVm(t, { disks: [{ size: "8M" }, { size: "8M" }] });
  const work = tempDir(t);
  const d = await startDaemon(t, { args: ["--allow-dir", work] });
  const { q, ok } = cliOn(t, d.socket);
  await addDomain(d, "vm1", vm.qmpPath);
  const set = join(work, "set");
  const refs: string[][] = [];
  // what the guest's disks hold, kept as the test writes (QEMU's image file lags behind its metadata cache)
  const model = vm.disks.map(() => Buffer.alloc(8 * MiB));
  const write = async (disk: number, pattern: number, offset: number, length: number) => {
    await vm.write(disk, pattern, offset, length);
    model[disk]!.fill(pattern, offset, offset + length);
  };
  const snapshot = async (i: number) => {
    const r: string[] = [];
    for (const [k, m] of model.entries()) {
      const f = join(work, `ref${i}-${k}.raw`);
      writeFileSync(f, m);
      r.push(f);
    }
    refs.push(r);
  };

  await write(0, 0x11, 0, MiB);
  await write(1, 0x21, 2 * MiB, MiB);
  const b1 = await ok("backup", "vm1", set);
  t.match(b1.stdout, /full \(the set has no restore point yet\)/, "the first backup is a full, saying why");
  await snapshot(0);
  await write(0, 0x12, 512 * KiB, 64 * KiB);
  await write(1, 0x22, 5 * MiB, 128 * KiB);
  t.match((await ok("backup", "vm1", set)).stdout, /: incremental, restore point/, "the second is incremental");
  await snapshot(1);
  await write(0, 0x13, 6 * MiB, 64 * KiB);
  await write(1, 0x23, 2 * MiB, 64 * KiB);
  const b3 = JSON.parse((await ok("--json", "backup", "vm1", set)).stdout) as { kind: string; point: { disks: unknown[] } };
  t.equal(b3.kind, "incremental", "the third is incremental (--json)");
  t.equal(b3.point.disks.length, 2);
  await snapshot(2);

  const list = JSON.parse((await ok("--json", "backup-list", set)).stdout) as Listing;
  t.same(
    list.points.map((p) => p.kind),
    ["full", "incremental", "incremental"],
  );
  t.match((await ok("backup-list", set)).stdout, /Restore point\s+Time\s+Kind\s+Disk/);
  const names = list.points.map((p) => p.checkpoint);

  // every disk at every point
  for (const [i, name] of names.entries()) {
    for (const [k, dev] of ["vda", "vdb"].entries()) {
      const out = join(work, `restored-${i}-${dev}.raw`);
      await ok("restore", set, dev, out, "--at", name);
      t.ok(await sameRaw(out, refs[i]![k]!), `${dev} at ${name} restored byte-exact`);
    }
  }
  const q2 = join(work, "newest-vda.qcow2");
  await ok("restore", set, "vda", q2, "--format", "qcow2");
  t.ok(
    await execFileP("qemu-img", ["compare", "-q", "-f", "qcow2", "-F", "raw", q2, refs[2]![0]!]).then(
      () => true,
      () => false,
    ),
    "a qcow2 restore of the newest point",
  );

  // what a script meets
  t.equal((await q("restore", set, "vda", q2)).code, 4, "FILE exists: conflict");
  t.equal((await q("restore", set, "vda", join(work, "x.raw"), "--at", "nope")).code, 3, "no such restore point");
  t.equal((await q("restore", set, "vdz", join(work, "x.raw"))).code, 2, "no such disk");
  t.notOk(existsSync(join(work, "x.raw")), "nothing left by the refusals");
  t.equal((await q("restore", set, "vda", "/etc/qbackupd-should-not-exist.raw")).code, 4, "a file outside the allowed directories");
  t.notOk(existsSync("/etc/qbackupd-should-not-exist.raw"));
  t.equal((await q("backup-list", join(work, "none"))).code, 3, "not a set");

  // verify, then one flipped byte in a data cluster of point 2's vdb image
  t.equal((await q("verify", set)).code, 0, "an intact set verifies");
  const victim = join(set, list.points[1]!.disks.find((x) => x.name === "vdb")!.file);
  const at = (await firstDataOffset(victim)) + 100;
  flipByte(victim, at);
  const bad = await q("verify", set);
  t.equal(bad.code, 1, "a flipped byte is found");
  t.match(bad.stdout, new RegExp(list.points[1]!.disks.find((x) => x.name === "vdb")!.file.replace(/\./g, "\\.")), "the file is named");
  t.match(bad.stdout, new RegExp(`Restore points affected: ${names[1]}, ${names[2]}`), "and the points that read it");
  flipByte(victim, at);
  t.equal((await q("verify", set)).code, 0, "flipped back: intact");

  // prune to 2: point 1 merged away, 2 and 3 exact
  const pr = await ok("prune", set, "--keep", "2");
  t.match(pr.stdout, /Kept 2 restore point\(s\), removed 1/);
  const after = JSON.parse((await ok("--json", "backup-list", set)).stdout) as Listing;
  t.same(
    after.points.map((p) => [p.checkpoint, p.kind, p.merged]),
    [
      [names[1], "full", true],
      [names[2], "incremental", false],
    ],
  );
  t.notOk(
    readdirSync(join(set, "data")).some((f) => f.startsWith("000001.")),
    "the pruned point's images are gone",
  );
  for (const i of [1, 2]) {
    for (const [k, dev] of ["vda", "vdb"].entries()) {
      const out = join(work, `pruned-${i}-${dev}.raw`);
      await ok("restore", set, dev, out, "--at", names[i]!);
      t.ok(await sameRaw(out, refs[i]![k]!), `after prune: ${dev} at ${names[i]} exact`);
    }
  }
  t.equal((await q("restore", set, "vda", join(work, "gone.raw"), "--at", names[0]!)).code, 3, "the pruned point is gone");
  t.equal((await q("verify", set)).code, 0, "the pruned set verifies");
  t.equal((await ok("checkpoint-list", "vm1", "--name")).stdout, `${names[2]}\n`, "only the newest point's checkpoint is left");

  // an incremental after the prune, then a bitmap removed behind the daemon's back
  await write(0, 0x14, 3 * MiB, 64 * KiB);
  t.match((await ok("backup", "vm1", set)).stdout, /: incremental/);
  const newest = (JSON.parse((await ok("--json", "backup-list", set)).stdout) as Listing).points.at(-1)!.checkpoint;
  (await vm.monitor.execute("block-dirty-bitmap-remove", { node: vm.disks[0]!.node, name: newest }))._unsafeUnwrap();
  await write(0, 0x15, 7 * MiB, 64 * KiB);
  const fb = await ok("backup", "vm1", set);
  t.match(fb.stdout, new RegExp(`full \\(.*${newest}.*\\)`), `a full, saying why: ${fb.stdout.trim()}`);
  await snapshot(3);
  const fin = JSON.parse((await ok("--json", "backup-list", set)).stdout) as Listing;
  t.equal(fin.points.at(-1)!.kind, "full");
  t.ok(fin.points.at(-1)!.reason !== null, "the point records why");
  const out = join(work, "after-fallback.raw");
  await ok("restore", set, "vda", out);
  t.ok(await sameRaw(out, refs[3]![0]!), "the fallback full is exact");

  // export the newest point of vdb over NBD
  const sock = join(work, "exp.sock");
  const exp = spawn(join(process.cwd(), "bin", "qbackup"), ["--socket", d.socket, "export", set, "vdb", "--socket", sock], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  let expOut = "";
  exp.stdout?.setEncoding("utf8").on("data", (s: string) => (expOut += s));
  const expDone = new Promise<number | null>((r) => exp.once("exit", (c) => r(c)));
  await until("export serving", async () => /Serving vdb/.test(expOut));
  const copy = join(work, "export-copy.raw");
  await execFileP("nbdcopy", [`nbd+unix:///vdb?socket=${sock}`, copy]);
  t.ok(await sameRaw(copy, refs[3]![1]!), "the export serves the point exactly");
  t.equal((await q("prune", set, "--keep", "1")).code, 4, "a prune while an export reads the set: busy");
  exp.kill("SIGINT");
  t.equal(await expDone, 0, "the export ends on Ctrl-C");
  const serving = () =>
    readdirSync("/proc")
      .filter((p) => /^[0-9]+$/.test(p))
      .some((p) => {
        try {
          return readFileSync(`/proc/${p}/cmdline`, "utf8").includes(sock);
        } catch {
          return false;
        }
      });
  await until("no export left", async () => !serving() && !existsSync(sock));
  t.equal((await q("prune", set, "--keep", "1")).code, 0, "the export ended: the set is free again");

  // a set of another domain
  const vm2 = await startVm(t, { disks: [{ size: "4M" }] });
  await addDomain(d, "vm2", vm2.qmpPath);
  const foreign = await q("backup", "vm2", set);
  t.equal(foreign.code, 4, "another domain's set: conflict");
  t.match(foreign.stderr, /backup set of domain 'vm1'/);
  writeFileSync(join(work, "marker"), "");
});

t.test(
  "backup sets: the daemon killed -9 mid backup settles it after restart; an aborted backup leaves no point and no file",
  async (t) => {
    const vm = await startVm(t, { disks: [{ size: "8M" }] });
    const dir = tempDir(t, "qbackupd-daemon-");
    const work = tempDir(t);
    const set = join(work, "set");
    const d = await startDaemon(t, { dir, args: ["--allow-dir", work] });
    const { ok } = cliOn(t, d.socket);
    await addDomain(d, "vm1", vm.qmpPath);
    await vm.write(0, 0x31, 0, 2 * MiB);
    await ok("backup", "vm1", set);
    await vm.write(0, 0x32, 4 * MiB, 2 * MiB);
    // 2 MiB at 256 KiB/s: still copying when the daemon dies
    const started = JSON.parse((await ok("--json", "backup", "vm1", set, "--no-wait", "--bandwidth", "256K")).stdout) as {
      kind: string;
      checkpoint: string;
    };
    t.equal(started.kind, "incremental");
    t.ok(existsSync(join(set, "pending.json")), "the backup is journaled while it runs");
    await d.stop("SIGKILL");
    rmSync(join(dir, "api.sock"), { force: true });
    const d2 = await startDaemon(t, { dir, args: ["--allow-dir", work], readyMs: 20_000 });
    const again = cliOn(t, d2.socket);
    t.equal((await again.q("prune", set, "--keep", "1")).code, 4, "a prune while the adopted backup runs: busy");
    await until("the adopted backup settled", async () => {
      const l = JSON.parse((await again.ok("--json", "backup-list", set)).stdout) as Listing & { pending: unknown };
      return l.pending === null;
    });
    const l = JSON.parse((await again.ok("--json", "backup-list", set)).stdout) as Listing;
    t.same(
      l.points.map((p) => [p.checkpoint === started.checkpoint, p.kind]),
      [
        [false, "full"],
        [true, "incremental"],
      ],
      "the backup the killed daemon began became its restore point",
    );
    const model = Buffer.alloc(8 * MiB);
    model.fill(0x31, 0, 2 * MiB);
    model.fill(0x32, 4 * MiB, 6 * MiB);
    const ref = join(work, "ref.raw");
    writeFileSync(ref, model);
    const out = join(work, "out.raw");
    await again.ok("restore", set, "vda", out);
    t.ok(await sameRaw(out, ref), "restored byte-exact");
    t.equal((await again.q("verify", set)).code, 0);

    // a backup aborted while it copies: no point, its images gone, the next one still incremental
    await vm.write(0, 0x33, 0, 2 * MiB);
    const ab = JSON.parse((await again.ok("--json", "backup", "vm1", set, "--no-wait", "--bandwidth", "256K")).stdout) as {
      checkpoint: string;
    };
    await again.ok("domjobabort", "vm1");
    const r = await again.q("backup", "vm1", set);
    t.equal(r.code, 0, `the next backup runs: ${r.stderr}`);
    t.match(r.stdout, /: incremental/, "and is incremental");
    const fin = JSON.parse((await again.ok("--json", "backup-list", set)).stdout) as Listing;
    t.notOk(
      fin.points.some((p) => p.checkpoint === ab.checkpoint),
      "the aborted backup is no restore point",
    );
    t.same(
      readdirSync(join(set, "data")).filter((f) => f.startsWith("000003.")),
      [],
      "its images are gone",
    );
    model.fill(0x33, 0, 2 * MiB);
    writeFileSync(ref, model);
    const out2 = join(work, "out2.raw");
    await again.ok("restore", set, "vda", out2);
    t.ok(await sameRaw(out2, ref), "the next incremental covers the aborted one's writes too");
  },
);
