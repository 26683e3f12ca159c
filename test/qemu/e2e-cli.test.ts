/**
 * End to end through the CLI only: a real VM with two disks, the built
 * daemon, and `qbackup` verbs: domain-add, checkpoint, full push, incremental
 * push, pull, abort, checkpoint delete — with byte-exact checks.
 */
import { readdirSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { ApiClient } from "../../src/cli/client.js";
import { allocatedRanges, rebaseOnto, snapshotDisks } from "../helpers/backup.js";
import { cli, startDaemon } from "../helpers/daemon.js";
import { bitmapNames, leftovers } from "../helpers/domain.js";
import { execFileP, imagesIdentical, rangeHolds, startVm } from "../helpers/qemu.js";

const KiB = 1024;
const MiB = 1024 * KiB;

t.test("domain-add, checkpoint, full push, incremental push, pull, abort, checkpoint delete", async (t) => {
  const vm = await startVm(t, { disks: [{ size: "16M" }, { size: "16M" }] });
  const d = await startDaemon(t);
  const q = (...args: string[]) => cli(d.socket, args);
  const ok = async (...args: string[]) => {
    const r = await q(...args);
    t.equal(r.code, 0, `qbackup ${args.join(" ")}: ${r.stderr.trim()}`);
    return r;
  };
  await ok("domain-add", "vm1", "--qmp", vm.qmpPath);
  for (let i = 0; i < 100; i++) {
    const l = JSON.parse((await ok("--json", "domain-list")).stdout) as { state: string }[];
    if (l[0]?.state === "connected") break;
    await new Promise((r) => setTimeout(r, 50));
  }
  const snap = (name: string) => snapshotDisks(vm, name, "16M");

  // full push with a checkpoint
  await vm.write(0, 0x11, 0, 2 * MiB);
  await vm.write(1, 0x21, MiB, MiB);
  const cpFile = join(vm.dir, "c1.xml");
  writeFileSync(cpFile, "<domaincheckpoint><name>c1</name><description>full</description></domaincheckpoint>");
  const begin = await ok("--json", "backup-begin", "vm1", "", cpFile);
  t.match(JSON.parse(begin.stdout), { mode: "push", checkpoint: "c1" });
  await ok("wait", "vm1", "--timeout", "60");
  const at1 = await snap("at1");
  const full = (JSON.parse((await ok("--json", "domjobinfo", "vm1", "--completed")).stdout) as { disks: { file: string }[] }).disks.map(
    (x) => x.file,
  );
  t.equal((await ok("domjobinfo", "vm1")).stdout, "Job type:         None        \n", "no running job: virsh's answer, exit 0");

  // incremental push since c1, creating c2
  await vm.write(0, 0x12, 4 * MiB, 128 * KiB);
  const bx = join(vm.dir, "inc.xml");
  writeFileSync(bx, "<domainbackup><incremental>c1</incremental></domainbackup>");
  writeFileSync(cpFile, "<domaincheckpoint><name>c2</name></domaincheckpoint>");
  await ok("backup-begin", "vm1", bx, cpFile);
  await ok("wait", "vm1");
  const at2 = await snap("at2");
  const inc = (JSON.parse((await ok("--json", "domjobinfo", "vm1", "--completed")).stdout) as { disks: { file: string }[] }).disks.map(
    (x) => x.file,
  );
  t.same(await allocatedRanges(inc[0]!), [[4 * MiB, 128 * KiB]]);
  t.same(await allocatedRanges(inc[1]!), []);
  for (let i = 0; i < 2; i++) {
    t.ok((await imagesIdentical(full[i]!, at1[i]!)).identical, `full = disk at c1 (${i})`);
    await rebaseOnto(inc[i]!, full[i]!);
    t.ok((await imagesIdentical(inc[i]!, at2[i]!)).identical, `full + inc = disk at c2 (${i})`);
  }

  // checkpoints as virsh shows them
  t.equal((await ok("checkpoint-list", "vm1", "--name")).stdout, "c1\nc2\n");
  t.equal((await ok("checkpoint-parent", "vm1", "c2")).stdout, "c1\n");
  t.equal((await ok("checkpoint-list", "vm1", "--tree")).stdout, "c1\n└─ c2\n");
  await vm.write(0, 0x13, 8 * MiB, 64 * KiB);
  t.match(
    (await ok("checkpoint-dumpxml", "vm1", "c2", "--size")).stdout,
    /<disk name='vda' checkpoint='bitmap' bitmap='c2' size='65536'\/>/,
  );

  // pull, incremental since c2, read with nbdinfo and qemu-io
  const sock = join(d.stateDir, "backups", "nbd.sock");
  const px = join(vm.dir, "pull.xml");
  writeFileSync(px, `<domainbackup mode='pull'><incremental>c2</incremental><server transport='unix' socket='${sock}'/></domainbackup>`);
  await ok("backup-begin", "vm1", px);
  await ok("wait", "vm1");
  const dump = (await ok("backup-dumpxml", "vm1")).stdout;
  t.match(dump, /exportname='vda' exportbitmap='backup-vda'/);
  const map = await execFileP("nbdinfo", ["--json", "--map=qemu:dirty-bitmap:backup-vda", `nbd+unix:///vda?socket=${sock}`]);
  const dirty = (JSON.parse(map.stdout) as { offset: number; length: number; type: number }[])
    .filter((e) => e.type & 1)
    .map((e) => [e.offset, e.length]);
  t.same(dirty, [[8 * MiB, 64 * KiB]], "dirty map since c2");
  t.ok(await rangeHolds(`nbd+unix:///vda?socket=${sock}`, "raw", 0x13, 8 * MiB, 64 * KiB));
  t.equal((await q("backup-begin", "vm1")).code, 4, "busy: exit 4");
  // the pull's size is what its exports offer: the bitmap's 64 KiB on vda, nothing on vdb (QEMU counts no NBD reads)
  const served = JSON.parse((await ok("--json", "domjobinfo", "vm1")).stdout) as { bytesTotal: number; disks: { bytesTotal: number }[] };
  t.equal(served.bytesTotal, 64 * KiB, "an incremental pull's total: the changed bytes it exports");
  t.same(
    served.disks.map((x) => x.bytesTotal),
    [64 * KiB, 0],
  );
  t.match((await ok("domjobinfo", "vm1")).stdout, /Data total:\s+64\.000 KiB\n/);
  await ok("domjobabort", "vm1");
  t.same(await leftovers(vm.monitor), [], "pull torn down");
  const m = await new ApiClient(d.socket).request("GET", "/v1/metrics");
  t.match(
    "text" in m ? m.text : "",
    new RegExp(`qbackupd_backup_bytes_total\\{domain="vm1",mode="pull"\\} ${64 * KiB}\n`),
    "counted in the metrics",
  );

  // abort a slow push
  await ok("backup-begin", "vm1", "--bandwidth", "65536");
  const ab = await ok("--json", "domjobabort", "vm1");
  t.equal(JSON.parse(ab.stdout).state, "cancelled");
  t.equal((await q("wait", "vm1")).code, 1, "wait reports the cancelled backup: exit 1");
  t.same(await leftovers(vm.monitor), []);

  // a push that is ready once copied, not yet written out
  t.equal(JSON.parse((await ok("--json", "backup-begin", "vm1", "--no-durable")).stdout).durable, false);
  const nd = JSON.parse((await ok("--json", "wait", "vm1")).stdout);
  t.match(nd, { state: "ready", durable: false });
  for (const dk of nd.disks as { file: string }[]) rmSync(dk.file);

  // checkpoint delete
  await ok("checkpoint-delete", "vm1", "c1");
  t.equal((await ok("checkpoint-list", "vm1", "--name")).stdout, "c2\n");
  t.same(await bitmapNames(vm.monitor), ["c2", "c2"], "c1's bitmaps removed from both disks");

  // errors: one line on stderr, proper exit codes
  const bad = await q("checkpoint-create-as", "vm1", "../x");
  t.equal(bad.code, 2);
  t.match(bad.stderr, /^qbackup: checkpoint name '\.\.\/x' must not start with '\.'\n$/);
  t.equal((await q("checkpoint-dumpxml", "vm1", "nope")).code, 3);
  t.equal((await q("domjobinfo", "nosuchvm")).code, 3);
  t.equal((await q("no-such-verb")).code, 2);
  const unreachable = await cli(join(vm.dir, "nothing.sock"), ["domain-list"]);
  t.equal(unreachable.code, 5);
  t.match(unreachable.stderr, /^qbackup: cannot reach qbackupd/);
  t.notMatch(`${bad.stderr}${unreachable.stderr}`, /at .*\.js:\d+/, "no stack traces");
  void readdirSync;
});
