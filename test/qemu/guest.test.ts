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
import { GuestAgentClient } from "../../src/agent/client.js";
import { rebaseOnto } from "../helpers/backup.js";
import { addDomain, cli, startDaemon, until } from "../helpers/daemon.js";
import { leftovers } from "../helpers/domain.js";
import { checkManifest, startGuest } from "../helpers/guest.js";
import { execFileP } from "../helpers/qemu.js";

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

    const major = await qemuMajor();
    const files = (c: { stdout: string }) => (JSON.parse(c.stdout) as { disks: { file: string }[] }).disks.map((x) => x.file);
    /** One more freeze in the guest's log than `before`, and as many thaws (the hook's) as freezes. */
    const frozeOnce = async (before: number, what: string) => {
      t.equal(freezes(), before + 1, `${what}: the guest logged a freeze`);
      await until(`${what}: the guest's thaw`, async () => hookThaws() === freezes());
    };

    // full push with a checkpoint, then an incremental push: QEMU 10.0 aborts on a push of an iothread disk (field facts),
    // so there the daemon may refuse it (or, where that is fixed, run it)
    const cp = join(g.dir, "cp.xml");
    writeFileSync(cp, "<domaincheckpoint><name>c1</name></domaincheckpoint>");
    let before = freezes();
    const begun = await q("--json", "backup-begin", "g1", "", cp, "--quiesce");
    const pushes = !(begun.code !== 0 && iothread && major >= 10);
    let full: string | undefined;
    let incFile: string | undefined;
    if (!pushes) {
      t.match(begun.stderr, /refused/, `QEMU ${major}: the iothread push is refused`);
      t.comment(`QEMU ${major} iothread push: ${begun.stderr.trim()}`);
      t.equal(freezes(), before, "refused before any freeze");
    } else {
      t.equal(begun.code, 0, `full push begins: ${begun.stderr.trim()}`);
      const w1 = await q("--json", "wait", "g1", "--timeout", "120");
      t.equal(w1.code, 0, `full push: ${w1.stdout.trim()} ${w1.stderr.trim()} (QEMU: ${g.stderr().trim()})`);
      full = files(await ok("--json", "domjobinfo", "g1", "--completed"))[0]!;
      await frozeOnce(before, "full push");

      await new Promise((r) => setTimeout(r, 1500));
      const inc = join(g.dir, "inc.xml");
      writeFileSync(inc, "<domainbackup><incremental>c1</incremental></domainbackup>");
      writeFileSync(cp, "<domaincheckpoint><name>c2</name></domaincheckpoint>");
      before = freezes();
      await ok("backup-begin", "g1", inc, cp, "--quiesce");
      await ok("wait", "g1", "--timeout", "120");
      incFile = files(await ok("--json", "domjobinfo", "g1", "--completed"))[0]!;
      await frozeOnce(before, "incremental push");
    }

    // a pull, read with nbdcopy (QEMU 7.2 aborts on pulls of iothread disks: the daemon refuses those)
    await new Promise((r) => setTimeout(r, 1000));
    const sock = join(d.stateDir, "backups", "nbd.sock");
    const px = join(g.dir, "pull.xml");
    writeFileSync(px, `<domainbackup mode='pull'><server transport='unix' socket='${sock}'/></domainbackup>`);
    let pulled: string | undefined;
    before = freezes();
    const pull = await q("backup-begin", "g1", px, "--quiesce");
    const pulls = !(iothread && major < 8);
    if (!pulls) {
      t.not(pull.code, 0, "pull of an iothread disk refused on QEMU 7.2");
      t.match(pull.stderr, /refused on QEMU 7\.2/);
      t.equal(freezes(), before, "refused before any freeze");
    } else {
      t.equal(pull.code, 0, `pull begins: ${pull.stderr.trim()}`);
      await ok("wait", "g1", "--timeout", "60");
      pulled = join(g.dir, "pulled.raw");
      await execFileP("nbdcopy", [`nbd+unix:///vda?socket=${sock}`, pulled]);
      await ok("domjobabort", "g1");
      await frozeOnce(before, "pull");
    }

    // restore: the full alone, the chain full + incremental, the pull
    const restores: [string, string][] = [];
    if (full !== undefined && incFile !== undefined) {
      await rebaseOnto(incFile, full);
      restores.push(["full", full], ["full + incremental", incFile]);
    }
    if (pulled !== undefined) restores.push(["pull", pulled]);
    const counts = new Map<string, number>();
    for (const [what, image] of restores) {
      const fsck = await e2fsckClean(image, g.dir);
      t.equal(fsck.code, 0, `${what}: e2fsck -fn finds it clean\n${fsck.out}`);
      t.match(fsck.out, /^Filesystem features:.*has_journal/, `${what}: features read`);
      t.notMatch(fsck.out, /recovering journal|needs_recovery/, `${what}: no journal to replay`);
      const m = await checkManifest(image, g.dir);
      t.ok(m.files > 0, `${what}: ${m.files} files in the manifest`);
      t.same(m.bad, [], `${what}: every listed file has its checksum`);
      counts.set(what, m.files);
    }
    if (pushes)
      t.ok(
        counts.get("full + incremental")! > counts.get("full")!,
        `the incremental holds files written after the full (${counts.get("full")} → ${counts.get("full + incremental")})`,
      );
    if (pushes && pulls) t.ok(counts.get("pull")! >= counts.get("full + incremental")!, "the pull holds at least as many");

    // a backup that fails after the freeze: a bitmap named like its checkpoint appears meanwhile, so the transaction fails
    writeFileSync(cp, "<domaincheckpoint><name>c3</name></domaincheckpoint>");
    before = freezes();
    const failing = q("backup-begin", "g1", pushes ? "" : px, cp, "--quiesce");
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

    // another client holds the agent (QEMU serves one at a time): --quiesce times out; once it leaves, --quiesce works again
    const holder = (await GuestAgentClient.connect(g.agentPath))._unsafeUnwrap();
    const blocked = await q("checkpoint-create-as", "g1", "c4", "--quiesce");
    t.not(blocked.code, 0, `quiesce behind another agent client fails: ${blocked.stderr.trim()}`);
    holder.close();
    await new Promise((r) => setTimeout(r, 200));
    before = freezes();
    await ok("checkpoint-create-as", "g1", "c4", "--quiesce");
    await frozeOnce(before, "checkpoint after the other client left");
    t.comment(`test took ${Date.now() - t0} ms`);
  });
}
