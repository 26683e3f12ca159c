/**
 * Quiesced backups of a real Linux guest through the built daemon and CLI:
 * full push with a checkpoint, incremental push, pull (read with nbdcopy).
 * The guest keeps writing checksummed files to its ext4 data disk; a restored
 * backup must be a clean filesystem (e2fsck -fn, no journal to replay) whose
 * every manifest-listed file has its checksum. The guest's own log shows the
 * freezes and thaws; a backup that fails after the freeze still thaws.
 * With and without an iothread on the data disk.
 */
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { GuestAgentClient } from "../src/agent/client.js";
import { rebaseOnto } from "./helpers/backup.js";
import { addDomain, cli, startDaemon, until } from "./helpers/daemon.js";
import { leftovers } from "./helpers/domain.js";
import { checkManifest, startGuest } from "./helpers/guest.js";
import { execFileP } from "./helpers/qemu.js";

const count = (s: string, what: string) => s.split(what).length - 1;

async function e2fsckClean(image: string, dir: string): Promise<{ code: number; out: string }> {
  const raw = join(dir, `fsck-${Date.now()}.raw`);
  await execFileP("qemu-img", ["convert", "-U", "-O", "raw", image, raw]);
  try {
    // the superblock's features: a filesystem caught mid-transaction has needs_recovery (a journal to replay)
    const features = (await execFileP("dumpe2fs", ["-h", raw])).stdout.split("\n").find((l) => l.startsWith("Filesystem features:"));
    const r = await execFileP("e2fsck", ["-fn", raw]);
    return { code: 0, out: `${features}\n${r.stdout}${r.stderr}` };
  } catch (e) {
    const x = e as { code?: number; stdout?: string; stderr?: string };
    return { code: x.code ?? 1, out: `${x.stdout ?? ""}${x.stderr ?? ""}` };
  } finally {
    await execFileP("rm", ["-f", raw]);
  }
}

async function qemuMajor(): Promise<number> {
  const r = await execFileP("qemu-system-x86_64", ["--version"]);
  return Number(/version (\d+)/.exec(r.stdout)?.[1] ?? 0);
}

for (const iothread of [false, true]) {
  t.test(`quiesced full, incremental and pull of a live Linux guest${iothread ? " (data disk in an iothread)" : ""}`, async (t) => {
    const t0 = Date.now();
    const g = await startGuest(t, { iothread });
    t.comment(`guest booted to its workload in ${g.bootMs} ms`);
    const d = await startDaemon(t);
    const q = (...args: string[]) => cli(d.socket, args);
    const ok = async (...args: string[]) => {
      const r = await q(...args);
      t.equal(r.code, 0, `qbackup ${args.join(" ")}: ${r.stderr.trim()}`);
      return r;
    };
    await addDomain(d, "g1", g.qmpPath, ["--agent", g.agentPath]);
    const freezes = () => count(g.serial(), "guest-fsfreeze called");
    const hookThaws = () => count(g.serial(), "FSFREEZE-HOOK thaw");
    await new Promise((r) => setTimeout(r, 1500)); // let the workload write some files

    const cp = join(g.dir, "cp.xml");
    writeFileSync(cp, "<domaincheckpoint><name>c1</name></domaincheckpoint>");
    const begun = await q("--json", "backup-begin", "g1", "", cp, "--quiesce");
    if (begun.code !== 0 && iothread && (await qemuMajor()) >= 10) {
      // QEMU 10.0 aborts a push of an iothread disk (field facts); the daemon may refuse it or lose QEMU
      t.comment(`QEMU 10 refused or lost the iothread push: ${begun.stderr.trim()}`);
      t.pass("iothread push on QEMU 10: refused");
      return;
    }
    t.equal(begun.code, 0, `full push begins: ${begun.stderr.trim()}`);
    const w1 = await q("--json", "wait", "g1", "--timeout", "120");
    if (w1.code !== 0 && iothread && (await qemuMajor()) >= 10) {
      t.comment(`QEMU 10 iothread push failed: ${w1.stdout.trim()} ${w1.stderr.trim()} (QEMU stderr: ${g.stderr().trim()})`);
      t.pass("iothread push on QEMU 10: failed");
      return;
    }
    t.equal(w1.code, 0, `full push: ${w1.stderr.trim()}`);
    const files = (c: { stdout: string }) => (JSON.parse(c.stdout) as { disks: { file: string }[] }).disks.map((x) => x.file);
    const full = files(await ok("--json", "domjobinfo", "g1", "--completed"))[0]!;
    t.equal(freezes(), 1, "the guest logged one freeze");
    await until("the guest's thaw", async () => hookThaws() === 1);

    await new Promise((r) => setTimeout(r, 1500));
    const inc = join(g.dir, "inc.xml");
    writeFileSync(inc, "<domainbackup><incremental>c1</incremental></domainbackup>");
    writeFileSync(cp, "<domaincheckpoint><name>c2</name></domaincheckpoint>");
    await ok("backup-begin", "g1", inc, cp, "--quiesce");
    await ok("wait", "g1", "--timeout", "120");
    const incFile = files(await ok("--json", "domjobinfo", "g1", "--completed"))[0]!;
    t.equal(freezes(), 2, "a second freeze");
    await until("the second thaw", async () => hookThaws() === 2);

    // a pull, read with nbdcopy (QEMU 7.2 aborts on pulls of iothread disks: the daemon refuses those)
    await new Promise((r) => setTimeout(r, 1000));
    const sock = join(d.stateDir, "backups", "nbd.sock");
    const px = join(g.dir, "pull.xml");
    writeFileSync(px, `<domainbackup mode='pull'><server transport='unix' socket='${sock}'/></domainbackup>`);
    let pulled: string | undefined;
    const pull = await q("backup-begin", "g1", px, "--quiesce");
    if (iothread && (await qemuMajor()) < 8) {
      t.not(pull.code, 0, "pull of an iothread disk refused on QEMU 7.2");
      t.match(pull.stderr, /refused on QEMU 7\.2/);
      t.equal(freezes(), 2, "refused before any freeze");
    } else {
      t.equal(pull.code, 0, `pull begins: ${pull.stderr.trim()}`);
      await ok("wait", "g1", "--timeout", "60");
      pulled = join(g.dir, "pulled.raw");
      await execFileP("nbdcopy", [`nbd+unix:///vda?socket=${sock}`, pulled]);
      await ok("domjobabort", "g1");
      t.equal(freezes(), 3, "a third freeze");
      await until("the third thaw", async () => hookThaws() === 3);
    }

    // restore: the full alone, the chain full + incremental, the pull
    await rebaseOnto(incFile, full);
    const counts: number[] = [];
    for (const [what, image] of [
      ["full", full],
      ["full + incremental", incFile],
      ...(pulled === undefined ? [] : [["pull", pulled] as const]),
    ] as const) {
      const fsck = await e2fsckClean(image, g.dir);
      t.equal(fsck.code, 0, `${what}: e2fsck -fn finds it clean\n${fsck.out}`);
      t.match(fsck.out, /^Filesystem features:.*has_journal/, `${what}: features read`);
      t.notMatch(fsck.out, /recovering journal|needs_recovery/, `${what}: no journal to replay`);
      const m = await checkManifest(image, g.dir);
      t.ok(m.files > 0, `${what}: ${m.files} files in the manifest`);
      t.same(m.bad, [], `${what}: every listed file has its checksum`);
      counts.push(m.files);
    }
    t.ok(counts[1]! > counts[0]!, `the incremental holds files written after the full (${counts[0]} → ${counts[1]})`);
    if (pulled !== undefined) t.ok(counts[2]! >= counts[1]!, "the pull holds at least as many");

    // a backup that fails after the freeze: a bitmap named like its checkpoint appears meanwhile, so the transaction fails
    writeFileSync(cp, "<domaincheckpoint><name>c3</name></domaincheckpoint>");
    const before = freezes();
    const failing = q("backup-begin", "g1", "", cp, "--quiesce");
    await until("the guest starts freezing", async () => freezes() > before, 30_000);
    (await g.monitor.execute("block-dirty-bitmap-add", { node: g.disks[0]!.node, name: "c3" }))._unsafeUnwrap();
    const failed = await failing;
    t.not(failed.code, 0, `the backup failed: ${failed.stderr.trim()}`);
    t.match(failed.stderr, /c3/, "in its transaction (the bitmap c3 exists)");
    await until("the guest's thaw after the failure", async () => hookThaws() === freezes());
    const agent = (await GuestAgentClient.connect(g.agentPath))._unsafeUnwrap();
    t.equal((await agent.status())._unsafeUnwrap(), "thawed", "the guest agent reports thawed");
    agent.close();
    t.same(await leftovers(g.monitor), [], "nothing left in QEMU");
    t.comment(`test took ${Date.now() - t0} ms`);
  });
}
