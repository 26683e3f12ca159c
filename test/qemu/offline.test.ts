/**
 * Backups of a VM that is shut down (issue 13): the daemon remembers the
 * disks' images from when QEMU ran, and opens them in a qemu-storage-daemon
 * for the operation, with QEMU's image locking on. Through the CLI against
 * real QEMU: a full with a checkpoint while the VM runs, guest writes, the
 * VM shut down, an incremental of the stopped VM holding exactly the written
 * clusters, restored byte-exact; no process holds the image afterwards; an
 * image another process holds (qemu-nbd serving it) is refused; the VM
 * started again continues the same chain. And a daemon killed during an
 * offline backup: the storage daemon is adopted and ended.
 */
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { allocatedRanges, rebaseOnto } from "../helpers/backup.js";
import { addDomain, cliOn, connected, fileWriter, startDaemon, until } from "../helpers/daemon.js";
import { imageFree, killedMidPush, shutDown, storageDaemons } from "../helpers/offline.js";
import { execFileP, imagesIdentical, startVm, tempDir } from "../helpers/qemu.js";

const KiB = 1024;
const MiB = 1024 * KiB;

t.test("a stopped VM: incremental through a storage daemon, exact; locked image refused; the chain goes on once it runs", async (t) => {
  const vm = await startVm(t, { disks: [{ size: "16M" }] });
  const image = vm.disks[0]!.path;
  const d = await startDaemon(t);
  const { q, ok, lastFile } = cliOn(t, d.socket);
  const file = fileWriter(vm.dir);
  await addDomain(d, "vm1", vm.qmpPath);

  // while it runs: a full with c1
  await vm.write(0, 0x11, 0, MiB);
  await ok("backup-begin", "vm1", "", file("c1.xml", "<domaincheckpoint><name>c1</name></domaincheckpoint>"));
  await ok("wait", "vm1", "--timeout", "60");
  const full = await lastFile();
  await vm.write(0, 0x12, 3 * MiB, 128 * KiB);
  await shutDown(vm);
  await until(
    "vm1 offline",
    async () =>
      (JSON.parse((await ok("--json", "domain-list")).stdout) as { name: string; state: string }[]).find((x) => x.name === "vm1")?.state ===
      "offline",
  );
  t.match((await ok("domain-list")).stdout, /vm1\s+offline/, "domain-list says offline");

  // the stopped VM: an incremental since c1, creating c2, through a storage daemon
  const inc = await ok(
    "backup-begin",
    "vm1",
    file("inc-c1.xml", "<domainbackup><incremental>c1</incremental></domainbackup>"),
    file("c2.xml", "<domaincheckpoint><name>c2</name></domaincheckpoint>"),
  );
  t.match(inc.stdout, /backup/);
  await ok("wait", "vm1", "--timeout", "60");
  const inc1 = await lastFile();
  t.same(await allocatedRanges(inc1), [[3 * MiB, 128 * KiB]], "exactly the clusters the guest wrote");
  await until("storage daemon ended", async () => storageDaemons() === 0 && (await imageFree(image)));
  t.ok(await imageFree(image), "afterwards no process holds the image");
  await rebaseOnto(inc1, full);
  const cmp = await imagesIdentical(inc1, image);
  t.ok(cmp.identical, `full + incremental = the stopped VM's disk: ${cmp.output}`);
  t.match((await ok("checkpoint-dumpxml", "vm1", "c2", "--size")).stdout, /<disk name='vda' checkpoint='bitmap' bitmap='c2' size='0'\/>/);
  t.ok(await imageFree(image), "checkpoint-dumpxml --size ended its storage daemon too");

  // an image another process holds: refused, with QEMU's reason, nothing started
  const sock = join(tempDir(t), "nbd.sock");
  const nbd = spawn("qemu-nbd", ["-f", "qcow2", "-k", sock, "--persistent", image], { stdio: "ignore" });
  t.teardown(() => nbd.kill("SIGKILL"));
  await until("qemu-nbd holds the image", async () => existsSync(sock) && !(await imageFree(image)));
  const held = await q("backup-begin", "vm1");
  t.equal(held.code, 4, `busy: exit 4 (${held.stderr.trim()})`);
  t.match(held.stderr, /in use by another process \(QEMU's image lock\)/);
  t.equal((await q("checkpoint-create-as", "vm1", "c9")).code, 4, "a checkpoint too");
  // ended cleanly: a writer that is killed leaves the image's bitmaps marked in use (inconsistent), as a crashed QEMU would
  nbd.kill("SIGTERM");
  await until("qemu-nbd gone", () => imageFree(image));
  t.equal(storageDaemons(), 0, "no storage daemon left by the refusals");

  // offline checkpoint create and delete
  await ok("checkpoint-create-as", "vm1", "c3");
  await ok("checkpoint-delete", "vm1", "c3");
  t.equal((await ok("checkpoint-list", "vm1", "--name")).stdout, "c1\nc2\n");

  // the VM starts again on the same image: the chain since c2 (made offline) goes on
  const vm2 = await startVm(t, { dir: vm.dir, images: [image] });
  await connected(d, "vm1");
  await vm2.write(0, 0x13, 5 * MiB, 64 * KiB);
  await ok("backup-begin", "vm1", file("inc-c2.xml", "<domainbackup><incremental>c2</incremental></domainbackup>"));
  await ok("wait", "vm1", "--timeout", "60");
  const inc2 = await lastFile();
  t.same(await allocatedRanges(inc2), [[5 * MiB, 64 * KiB]], "since c2: the write after the restart");
  await rebaseOnto(inc2, inc1);
  await shutDown(vm2);
  const cmp2 = await imagesIdentical(inc2, image);
  t.ok(cmp2.identical, `full + inc + inc = the disk: ${cmp2.output}`);
});

t.test("a daemon killed during an offline backup: its storage daemon is adopted, the job finishes, nothing is left", async (t) => {
  // 2 MiB at 256 KiB/s: still copying when the daemon dies
  const { image, again } = await killedMidPush(t);
  const w = await again.ok("--json", "wait", "vm1", "--timeout", "60");
  t.match(JSON.parse(w.stdout), { state: "ready" }, "the adopted job finished");
  await until("storage daemon ended", async () => storageDaemons() === 0 && (await imageFree(image)));
  const job = JSON.parse((await again.ok("--json", "domjobinfo", "vm1", "--completed")).stdout) as { disks: { file: string }[] };
  const cmp = await imagesIdentical(job.disks[0]!.file, image);
  t.ok(cmp.identical, `the backup = the disk: ${cmp.output}`);
});

t.test("domain-add --disk without --qmp: a VM never seen running, backed up offline, full and incremental", async (t) => {
  const dir = tempDir(t);
  const image = join(dir, "vda.qcow2");
  await execFileP("qemu-img", ["create", "-f", "qcow2", image, "16M"]);
  await execFileP("qemu-io", ["-f", "qcow2", "-c", `write -P 0x41 ${MiB} ${MiB}`, image]);
  const d = await startDaemon(t);
  const { q, ok, lastFile } = cliOn(t, d.socket);
  const file = fileWriter(dir);
  t.equal((await q("domain-add", "cold")).code, 2, "neither --qmp nor --disk: a usage error");
  t.equal((await q("domain-add", "cold", "--disk", "vda")).code, 2, "--disk needs DEV=FILE");
  t.match((await ok("domain-add", "cold", "--disk", `vda=${image},format=qcow2`)).stdout, /Domain cold added \(offline\)/);
  t.match((await ok("domain-list")).stdout, /cold\s+offline\s+0\s+-\s+-/);
  await ok("backup-begin", "cold", "", file("c1.xml", "<domaincheckpoint><name>c1</name></domaincheckpoint>"));
  await ok("wait", "cold", "--timeout", "60");
  const full = await lastFile("cold");
  t.ok((await imagesIdentical(full, image)).identical, "the full = the image");
  // written while nothing of ours runs: a persistent bitmap records it (qemu-io opens the image like QEMU does)
  await execFileP("qemu-io", ["-f", "qcow2", "-c", `write -P 0x42 ${4 * MiB} 64k`, image]);
  await ok("backup-begin", "cold", file("inc.xml", "<domainbackup><incremental>c1</incremental></domainbackup>"));
  await ok("wait", "cold", "--timeout", "60");
  const inc = await lastFile("cold");
  t.same(await allocatedRanges(inc), [[4 * MiB, 64 * KiB]], "the incremental: the write");
  await rebaseOnto(inc, full);
  t.ok((await imagesIdentical(inc, image)).identical, "full + incremental = the image");
  t.ok(await imageFree(image));

  // a pull offline, incremental since c1: the storage daemon serves the export until the pull is ended
  await execFileP("qemu-io", ["-f", "qcow2", "-c", `write -P 0x43 ${6 * MiB} 64k`, image]);
  const sock = join(d.stateDir, "backups", "pull.sock");
  await ok(
    "backup-begin",
    "cold",
    file("pull.xml", `<domainbackup mode='pull'><incremental>c1</incremental><server transport='unix' socket='${sock}'/></domainbackup>`),
  );
  await ok("wait", "cold", "--timeout", "60");
  const uri = `nbd+unix:///vda?socket=${sock}`;
  const map = await execFileP("nbdinfo", ["--json", "--map=qemu:dirty-bitmap:backup-vda", uri]);
  const dirty = (JSON.parse(map.stdout) as { offset: number; length: number; type: number }[])
    .filter((e) => e.type & 1)
    .map((e) => [e.offset, e.length]);
  t.same(
    dirty,
    [
      [4 * MiB, 64 * KiB],
      [6 * MiB, 64 * KiB],
    ],
    "the export's dirty map since c1",
  );
  t.ok((await imagesIdentical(uri, image)).identical, "the export = the image");
  t.equal(storageDaemons(), 1, "a storage daemon serves the pull");
  await ok("domjobabort", "cold");
  await until("storage daemon ended", async () => storageDaemons() === 0 && (await imageFree(image)));
  t.ok(await imageFree(image), "ended with the pull");
});
