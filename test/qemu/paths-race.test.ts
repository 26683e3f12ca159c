/**
 * Someone who can write inside an allowed directory swaps a directory on the
 * target's path for a symlink (renameat2 RENAME_EXCHANGE, atomic) while jobs
 * begin, abort and serve NBD. Nothing outside the allowed directories may be
 * created, changed or deleted: a victim directory's names, contents and
 * mtimes are compared before and after. The swapper runs as nobody (65534),
 * the owner of the directory it swaps in, through python3's ctypes.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { chmodSync, chownSync, lstatSync, mkdirSync, readdirSync, readFileSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import type { JobManager } from "../../src/jobs/manager.js";
import { createExclusive, removeSafely, trustFor } from "../../src/jobs/safe-fs.js";
import { startDaemon } from "../helpers/daemon.js";
import { jobManager, type TestDomain, testDomain } from "../helpers/domain.js";
import { type Teardown, tempDir } from "../helpers/qemu.js";

const NOBODY = 65534;

const SWAPPER = `
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_EXCHANGE = 2
a, b = sys.argv[1].encode(), sys.argv[2].encode()
os.setgroups([]); os.setgid(${NOBODY}); os.setuid(${NOBODY})
print("ready", flush=True)
while True:
    libc.renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE)
    time.sleep(0.0005)
`;

interface Arena {
  readonly allowed: string;
  /** The directory nobody swaps with a symlink to the victim: targets go in here. */
  readonly swapped: string;
  readonly victim: string;
  snapshot(): string;
  swap(): Promise<void>;
  stop(): void;
}

/** allowed/t (nobody's) holds d (a directory) and s (a symlink to victim, outside the allowed directories). */
function arena(t: Teardown, victimFiles: readonly string[]): Arena {
  const root = tempDir(t, "qbk-race-");
  chmodSync(root, 0o755);
  const allowed = join(root, "allowed");
  const victim = join(root, "victim");
  mkdirSync(allowed, { mode: 0o755 });
  mkdirSync(victim, { mode: 0o755 });
  for (const f of victimFiles) writeFileSync(join(victim, f), `victim ${f}\n`);
  const own = join(allowed, "t");
  mkdirSync(own);
  mkdirSync(join(own, "d"));
  symlinkSync(victim, join(own, "s"));
  for (const p of [own, join(own, "d")]) chownSync(p, NOBODY, NOBODY);
  let proc: ChildProcess | undefined;
  const stop = (): void => {
    proc?.kill("SIGKILL");
    proc = undefined;
  };
  t.teardown(stop);
  return {
    allowed,
    swapped: join(own, "d"),
    victim,
    snapshot: () =>
      JSON.stringify(
        readdirSync(victim)
          .sort()
          .map((f) => {
            const st = lstatSync(join(victim, f));
            return [f, st.mode, st.mtimeMs, st.size, st.isFile() ? readFileSync(join(victim, f), "utf8") : "not a regular file"];
          }),
      ),
    swap: () =>
      new Promise<void>((resolve, reject) => {
        proc = spawn("python3", ["-c", SWAPPER, join(own, "d"), join(own, "s")], { stdio: ["ignore", "pipe", "inherit"] });
        proc.once("error", reject);
        proc.stdout!.once("data", () => resolve());
      }),
    stop,
  };
}

async function endQuietly(jm: JobManager, d: TestDomain): Promise<void> {
  if (jm.job(d.domain.name)?.active) await jm.end(d.domain.name);
}

t.test("begin while a directory on the target's path is swapped for a symlink: nothing is created outside", async (t) => {
  const d = await testDomain(t, "vm1", [{ size: "1M" }]);
  const a = arena(t, ["passwd"]);
  const jm = jobManager(d.backupDir, { allowedDirs: [a.allowed] });
  const before = a.snapshot();
  await a.swap();
  const codes = new Set<string>();
  for (let i = 0; i < 40; i++) {
    const target = join(a.swapped, `img${i}.qcow2`);
    const r = await jm.begin(
      d.domain,
      `<domainbackup><disks><disk name='vda'><target file='${target}'/></disk></disks></domainbackup>`,
      undefined,
    );
    codes.add(r.isErr() ? r.error.code : "begun");
    await jm.wait(d.domain.name, 30_000);
    await endQuietly(jm, d);
  }
  a.stop();
  t.equal(a.snapshot(), before, "the victim directory is untouched");
  t.same([...codes], ["path-refused"], "a directory nobody else may write to is required on the way");
});

t.test("abort while a directory on the target's path is swapped for a symlink: nothing is deleted outside", async (t) => {
  const d = await testDomain(t, "vm1", [{ size: "64M" }]);
  await d.vm.write(0, 0x55, 0, 32 * 1024 * 1024);
  const a = arena(t, ["passwd"]);
  const jm = jobManager(d.backupDir, { allowedDirs: [a.allowed] });
  const before = a.snapshot();
  for (let i = 0; i < 10; i++) {
    // the target is named like the victim's file; the swapping starts once the job runs (slowly: 64 KiB/s)
    const target = join(a.swapped, "passwd");
    const begun = await jm.begin(
      d.domain,
      `<domainbackup><disks><disk name='vda'><target file='${target}'/></disk></disks></domainbackup>`,
      undefined,
      { bandwidth: 64 * 1024 },
    );
    await a.swap();
    await new Promise((r) => setTimeout(r, Math.random() * 20));
    if (begun.isOk()) await endQuietly(jm, d);
    a.stop();
  }
  t.equal(a.snapshot(), before, "the victim directory is untouched");
});

t.test("pull with an NBD socket whose directory is swapped for a symlink: nothing is deleted outside", async (t) => {
  const d = await testDomain(t, "vm1", [{ size: "1M" }]);
  const names = Array.from({ length: 30 }, (_, i) => `nbd${i}.sock`);
  const a = arena(t, names);
  const jm = jobManager(d.backupDir, { allowedDirs: [a.allowed, d.backupDir] });
  const before = a.snapshot();
  await a.swap();
  for (const n of names) {
    const sock = join(a.swapped, n);
    await jm.begin(d.domain, `<domainbackup mode='pull'><server transport='unix' socket='${sock}'/></domainbackup>`, undefined);
    await endQuietly(jm, d);
  }
  a.stop();
  t.equal(a.snapshot(), before, "the victim directory is untouched");
});

t.test("the walk itself never follows a swapped directory, even where its owner is trusted", async (t) => {
  // trusting nobody here isolates the descriptor walk from the ownership check
  const trust = trustFor({ uid: NOBODY, gid: NOBODY });
  const a = arena(t, ["passwd"]);
  const before = a.snapshot();
  await a.swap();
  let created = 0;
  for (let i = 0; i < 200; i++) {
    const p = join(a.swapped, `n${i}`);
    const id = await createExclusive(p, trust).catch(() => undefined);
    if (id !== undefined) created++;
    await removeSafely(p, trust, id);
    // without an identity: a regular file at the name, whichever directory the name is in now
    await removeSafely(join(a.swapped, "passwd"), trust);
  }
  a.stop();
  t.equal(a.snapshot(), before, "the victim directory is untouched");
  t.ok(created > 0, `files were created inside meanwhile (${created} of 200)`);
});

t.test("the daemon warns at start of an allowed directory that others can change", async (t) => {
  const dir = tempDir(t, "qbk-allow-");
  chmodSync(dir, 0o755);
  const theirs = join(dir, "theirs");
  const ours = join(dir, "ours");
  mkdirSync(theirs);
  mkdirSync(ours);
  chownSync(theirs, NOBODY, NOBODY);
  const d = await startDaemon(t, { args: ["--allow-dir", theirs, "--allow-dir", ours] });
  const warned = d
    .log()
    .split("\n")
    .filter((l) => l.includes("allowed directory that others"));
  t.equal(warned.length, 1, `one warning, for theirs: ${d.log()}`);
  t.match(warned[0], theirs);
  t.match(warned[0], /owned by uid 65534/);
});

const PLANTER = `
import os, sys, time
os.setgroups([]); os.setgid(${NOBODY}); os.setuid(${NOBODY})
pub, victim, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
print("ready", flush=True)
names = [("img%d.qcow2" % i, "nbd%d.sock" % i) for i in range(n)]
names = [x for pair in names for x in pair]
while True:
    # our files: moved away (the sticky bit refuses); then a symlink out planted, and taken back a moment later
    for name in names:
        p = os.path.join(pub, name)
        try: os.rename(p, p + ".moved")
        except OSError: pass
        try: os.symlink(os.path.join(victim, name), p)
        except OSError: pass
    time.sleep(0.0005)
    for name in names:
        p = os.path.join(pub, name)
        if os.path.islink(p):
            try: os.unlink(p)
            except OSError: pass
    time.sleep(0.001)
`;

t.test(
  "an allowed directory everyone may write to, with the sticky bit: names planted and moved meanwhile, nothing outside changes",
  async (t) => {
    const d = await testDomain(t, "vm1", [{ size: "1M" }]);
    const n = 25;
    const a = arena(
      t,
      Array.from({ length: n }, (_, i) => `nbd${i}.sock`),
    );
    const pub = join(a.allowed, "pub");
    mkdirSync(pub);
    chmodSync(pub, 0o1777);
    const jm = jobManager(d.backupDir, { allowedDirs: [pub, d.backupDir] });
    const before = a.snapshot();
    const planter = spawn("python3", ["-c", PLANTER, pub, a.victim, String(n)], { stdio: ["ignore", "pipe", "inherit"] });
    t.teardown(() => planter.kill("SIGKILL"));
    await new Promise((r) => planter.stdout!.once("data", r));
    let begun = 0;
    for (let i = 0; i < n; i++) {
      const push = `<domainbackup><disks><disk name='vda'><target file='${join(pub, `img${i}.qcow2`)}'/></disk></disks></domainbackup>`;
      // refused (target-exists, image: EEXIST) whenever a planted name is there: a squatter can deny, never redirect
      if ((await jm.begin(d.domain, push, undefined)).isOk()) begun++;
      await jm.wait(d.domain.name, 30_000);
      await endQuietly(jm, d);
      const pull = `<domainbackup mode='pull'><server transport='unix' socket='${join(pub, `nbd${i}.sock`)}'/></domainbackup>`;
      if ((await jm.begin(d.domain, pull, undefined)).isOk()) begun++;
      await endQuietly(jm, d);
    }
    planter.kill("SIGKILL");
    t.equal(a.snapshot(), before, "the victim directory is untouched");
    t.ok(begun > 0, `backups in the sticky directory still begin (${begun} of ${2 * n})`);
  },
);
