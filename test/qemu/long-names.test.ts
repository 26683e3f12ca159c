/**
 * Names at the limit (255 bytes, issue 12) end to end through the CLI: a
 * domain whose name is 255 bytes, two 255-byte checkpoints that share their
 * first 254 bytes; full push, incremental push, pull, checkpoint verbs, a
 * kill -9 of the daemon and a restart, domain-remove — byte-exact, and no
 * file name in the state or backup directory longer than the file system takes.
 * And a disk whose name is 255 bytes (its device id): push, pull, and the
 * pull's backup-dumpxml (its exportbitmap named after the disk) taken back.
 */
import { readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { fileStem, MAX_NAME_BYTES } from "../../src/conf/names.js";
import { qemuIoDevice } from "../../src/qmp/index.js";
import { allocatedRanges, handBackups, rebaseOnto, snapshotDisks } from "../helpers/backup.js";
import { cli, connected, startDaemon } from "../helpers/daemon.js";
import { bitmapNames, leftovers } from "../helpers/domain.js";
import { createImage, execFileP, imagesIdentical, rangeHolds, startVm, tempDir } from "../helpers/qemu.js";

const KiB = 1024;
const MiB = 1024 * KiB;

/** Every entry name below `dir`, with its path. */
function walk(dir: string): { path: string; name: string }[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) => [
    { path: join(dir, e.name), name: e.name },
    ...(e.isDirectory() ? walk(join(dir, e.name)) : []),
  ]);
}

t.test("255-byte domain and checkpoint names through the CLI, a kill -9 and a restart", async (t) => {
  const DOM = `vm-${"long.name_".repeat(25)}`.padEnd(MAX_NAME_BYTES, "z");
  const CP1 = `${"c".repeat(MAX_NAME_BYTES - 1)}1`;
  const CP2 = `${"c".repeat(MAX_NAME_BYTES - 1)}2`;
  t.equal(Buffer.byteLength(DOM), 255);
  t.equal(Buffer.byteLength(CP1), 255);

  const vm = await startVm(t, { disks: [{ size: "16M" }, { size: "16M" }] });
  let d = await startDaemon(t);
  const dir = d.dir;
  const q = (...args: string[]) => cli(d.socket, args);
  const ok = async (...args: string[]) => {
    const r = await q(...args);
    t.equal(r.code, 0, `qbackup ${args.map((a) => (a.length > 20 ? `${a.slice(0, 12)}…` : a)).join(" ")}: ${r.stderr.trim()}`);
    return r;
  };
  await ok("domain-add", DOM, "--qmp", vm.qmpPath);
  await connected(d, DOM);
  t.same(
    (JSON.parse((await ok("--json", "domain-list")).stdout) as { name: string }[]).map((x) => x.name),
    [DOM],
    "listed under its whole name",
  );
  const snap = (name: string) => snapshotDisks(vm, name, "16M");
  const completedFiles = async () =>
    (JSON.parse((await ok("--json", "domjobinfo", DOM, "--completed")).stdout) as { disks: { file: string }[] }).disks.map((x) => x.file);

  // full push with the first checkpoint
  await vm.write(0, 0x11, 0, 2 * MiB);
  await vm.write(1, 0x21, MiB, MiB);
  const cpFile = join(vm.dir, "cp.xml");
  writeFileSync(cpFile, `<domaincheckpoint><name>${CP1}</name><description>full</description></domaincheckpoint>`);
  const begin = await ok("--json", "backup-begin", DOM, "", cpFile);
  t.match(JSON.parse(begin.stdout), { domain: DOM, mode: "push", checkpoint: CP1 });
  await ok("wait", DOM, "--timeout", "60");
  const at1 = await snap("at1");
  const full = await completedFiles();

  // guest writes, then an incremental push since the first checkpoint, creating the second
  await vm.write(0, 0x12, 4 * MiB, 128 * KiB);
  await vm.write(1, 0x22, 8 * MiB, 64 * KiB);
  const bx = join(vm.dir, "inc.xml");
  writeFileSync(bx, `<domainbackup><incremental>${CP1}</incremental></domainbackup>`);
  writeFileSync(cpFile, `<domaincheckpoint><name>${CP2}</name></domaincheckpoint>`);
  t.match(JSON.parse((await ok("--json", "backup-begin", DOM, bx, cpFile)).stdout), { checkpoint: CP2, incremental: CP1 });
  await ok("wait", DOM, "--timeout", "60");
  const at2 = await snap("at2");
  const inc = await completedFiles();
  t.same(await allocatedRanges(inc[0]!), [[4 * MiB, 128 * KiB]], "vda incremental: only what was written since the first checkpoint");
  t.same(await allocatedRanges(inc[1]!), [[8 * MiB, 64 * KiB]], "vdb incremental");
  for (let i = 0; i < 2; i++) {
    const c1 = await imagesIdentical(full[i]!, at1[i]!);
    t.ok(c1.identical, `full = disk at the first checkpoint (${i}): ${c1.output}`);
    await rebaseOnto(inc[i]!, full[i]!);
    const c2 = await imagesIdentical(inc[i]!, at2[i]!);
    t.ok(c2.identical, `full + incremental = disk at the second checkpoint (${i}): ${c2.output}`);
  }
  for (const f of [...full, ...inc]) t.ok(f.startsWith(join(d.stateDir, "backups", fileStem(DOM))), "backups in the domain's stem dir");

  // the checkpoint verbs, by the whole names
  t.equal((await ok("checkpoint-list", DOM, "--name")).stdout, `${CP1}\n${CP2}\n`);
  t.equal((await ok("checkpoint-parent", DOM, CP2)).stdout, `${CP1}\n`);
  const xml1 = (await ok("checkpoint-dumpxml", DOM, CP1)).stdout;
  t.match(xml1, `<name>${CP1}</name>`);
  t.match(xml1, `bitmap='${CP1}'`);
  t.notMatch(xml1, CP2);
  const xml2 = (await ok("checkpoint-dumpxml", DOM, CP2)).stdout;
  t.match(xml2, `<name>${CP2}</name>`);
  t.match(xml2, new RegExp(`<parent>\\s*<name>${CP1}</name>\\s*</parent>`), "its parent, by the whole name");
  t.same(await bitmapNames(vm.monitor), [CP1, CP1, CP2, CP2], "both checkpoints' bitmaps, under their whole names, on both disks");

  // a pull, incremental since the second checkpoint, over a unix socket
  await vm.write(0, 0x13, 10 * MiB, 64 * KiB);
  const at3 = await snap("at3");
  const sock = join(d.stateDir, "backups", "nbd.sock");
  const px = join(vm.dir, "pull.xml");
  writeFileSync(
    px,
    `<domainbackup mode='pull'><incremental>${CP2}</incremental><server transport='unix' socket='${sock}'/></domainbackup>`,
  );
  await ok("backup-begin", DOM, px);
  await vm.write(0, 0x14, 12 * MiB, MiB); // after begin: not in the export
  const uri = (disk: string) => `nbd+unix:///${disk}?socket=${sock}`;
  const map = await execFileP("nbdinfo", ["--json", "--map=qemu:dirty-bitmap:backup-vda", uri("vda")]);
  const dirty = (JSON.parse(map.stdout) as { offset: number; length: number; type: number }[])
    .filter((e) => e.type & 1)
    .map((e) => [e.offset, e.length]);
  t.same(dirty, [[10 * MiB, 64 * KiB]], "dirty map since the second checkpoint");
  const pulled = async (tag: string) => {
    for (const [i, disk] of ["vda", "vdb"].entries()) {
      const copy = join(vm.dir, `pull-${tag}-${disk}.raw`);
      await execFileP("nbdcopy", [uri(disk), copy]);
      const cmp = await imagesIdentical(copy, at3[i]!);
      t.ok(cmp.identical, `${tag}: the export of ${disk} is the disk at begin: ${cmp.output}`);
    }
  };
  await pulled("before restart");
  const jobBefore = JSON.parse((await ok("--json", "domjobinfo", DOM)).stdout) as { id: string; domain: string };
  const doneBefore = (await ok("--json", "domjobinfo", DOM, "--completed")).stdout;

  // kill -9 and start again on the same directory: everything reads back under the whole names
  await d.stop("SIGKILL");
  d = await startDaemon(t, { dir });
  await connected(d, DOM);
  const jobAfter = JSON.parse((await ok("--json", "domjobinfo", DOM)).stdout) as { id: string; domain: string; active: boolean };
  t.match(jobAfter, { id: jobBefore.id, domain: DOM, active: true }, "the running pull was adopted from its job record");
  t.equal((await ok("--json", "domjobinfo", DOM, "--completed")).stdout, doneBefore, "the completed job record reads back");
  t.match((await ok("backup-dumpxml", DOM)).stdout, /exportname='vda' exportbitmap='backup-vda'/);
  await pulled("after restart");
  t.ok(await rangeHolds(uri("vda"), "raw", 0x13, 10 * MiB, 64 * KiB));
  t.equal((await ok("checkpoint-list", DOM, "--name")).stdout, `${CP1}\n${CP2}\n`, "both checkpoints read back");
  t.equal((await ok("checkpoint-dumpxml", DOM, CP1)).stdout, xml1);
  t.equal((await ok("checkpoint-dumpxml", DOM, CP2)).stdout, xml2);
  t.notMatch(d.log(), /skipped|does not match/, "no checkpoint file skipped on load");
  await ok("domjobabort", DOM);
  t.same(await leftovers(vm.monitor), [], "pull torn down");

  // delete the first checkpoint by its name: only its file and its bitmaps go
  const cpDir = join(d.stateDir, "checkpoint", fileStem(DOM));
  t.equal(readdirSync(cpDir).filter((f) => f.endsWith(".xml")).length, 2);
  await ok("checkpoint-delete", DOM, CP1);
  t.equal((await ok("checkpoint-list", DOM, "--name")).stdout, `${CP2}\n`);
  t.same(await bitmapNames(vm.monitor), [CP2, CP2], "the first checkpoint's bitmaps removed from both disks");
  t.same(
    readdirSync(cpDir).filter((f) => f.endsWith(".xml")),
    [`${fileStem(CP2)}.xml`],
    "the second checkpoint's file stays",
  );
  t.match(readFileSync(join(cpDir, `${fileStem(CP2)}.xml`), "utf8"), `<name>${CP2}</name>`, "its file keeps the whole name");
  t.equal((await q("checkpoint-dumpxml", DOM, CP1)).code, 3, "the deleted one is gone");

  // no entry in the state dir (the backups are below it) has a name the file system would refuse
  const entries = walk(dir);
  const tooLong = entries.filter((e) => Buffer.byteLength(e.name) > 255).map((e) => e.path);
  t.same(tooLong, [], "no file name over 255 bytes");
  t.ok(
    entries.some((e) => e.name === fileStem(DOM)),
    "the domain's directories are named by its stem",
  );

  await ok("domain-remove", DOM);
  t.same(JSON.parse((await ok("--json", "domain-list")).stdout), [], "removed");
  await d.stop("SIGKILL");
  d = await startDaemon(t, { dir });
  t.same(JSON.parse((await ok("--json", "domain-list")).stdout), [], "still removed after a restart");
});

t.test("a disk whose name is 255 bytes: push, pull, and the pull's backup-dumpxml given back", async (t) => {
  const DISK = "disk-".padEnd(MAX_NAME_BYTES, "x");
  const DOM = "v".repeat(MAX_NAME_BYTES);
  const CP = "c".repeat(MAX_NAME_BYTES);
  const vmDir = tempDir(t);
  const image = join(vmDir, "disk.qcow2");
  await createImage(image, "16M");
  const node = { "node-name": "n0", driver: "qcow2", file: { driver: "file", filename: image } };
  const vm = await startVm(t, {
    dir: vmDir,
    disks: [],
    extraArgs: ["-blockdev", JSON.stringify(node), "-device", `virtio-blk-pci,drive=n0,id=${DISK}`],
  });
  const d = await startDaemon(t);
  const ok = async (...args: string[]) => {
    const r = await cli(d.socket, args);
    t.equal(r.code, 0, `qbackup ${args[0]}: ${r.stderr.trim()}`);
    return r;
  };
  await ok("domain-add", DOM, "--qmp", vm.qmpPath);
  await connected(d, DOM);
  const write = async (pattern: number, offset: number, length: number) =>
    (
      await qemuIoDevice(vm.monitor, `/machine/peripheral/${DISK}/virtio-backend`, `write -P ${pattern} ${offset} ${length}`)
    )._unsafeUnwrap();
  await write(0x31, 0, MiB);
  const cp = join(vmDir, "cp.xml");
  writeFileSync(cp, `<domaincheckpoint><name>${CP}</name></domaincheckpoint>`);
  // the disk at a moment, as a standalone image (the VM's own file is behind QEMU's caches)
  const snap = async (name: string) => {
    const file = join(vmDir, `${name}.qcow2`);
    await handBackups(vm.monitor, "16M", [{ node: "n0", target: file, sync: "full" }]);
    return file;
  };
  await ok("backup-begin", DOM, "", cp);
  await ok("wait", DOM, "--timeout", "60");
  const at1 = await snap("at1");
  const full = (JSON.parse((await ok("--json", "domjobinfo", DOM, "--completed")).stdout) as { disks: { name: string; file: string }[] })
    .disks;
  t.equal(full[0]?.name, DISK, "the disk under its whole name");
  t.match(await imagesIdentical(full[0]!.file, at1), { identical: true }, "full push = the disk");
  t.ok(await rangeHolds(full[0]!.file, "qcow2", 0x31, 0, MiB), "and holds what the guest wrote");

  await write(0x32, 2 * MiB, 64 * KiB);
  const at2 = await snap("at2");
  const sock = join(d.stateDir, "backups", "nbd.sock");
  const px = join(vmDir, "pull.xml");
  writeFileSync(px, `<domainbackup mode='pull'><incremental>${CP}</incremental><server transport='unix' socket='${sock}'/></domainbackup>`);
  await ok("backup-begin", DOM, px);
  const dump = (await ok("backup-dumpxml", DOM)).stdout;
  const bitmap = /exportbitmap='([^']+)'/.exec(dump)?.[1] ?? "";
  t.ok(
    bitmap.startsWith("backup-disk-xxx") && Buffer.byteLength(bitmap) <= MAX_NAME_BYTES,
    `exportbitmap is a name: ${Buffer.byteLength(bitmap)} bytes`,
  );
  const uri = `nbd+unix:///${DISK}?socket=${sock}`;
  const map = await execFileP("nbdinfo", ["--json", `--map=qemu:dirty-bitmap:${bitmap}`, uri]);
  const dirty = (JSON.parse(map.stdout) as { offset: number; length: number; type: number }[])
    .filter((e) => e.type & 1)
    .map((e) => [e.offset, e.length]);
  t.same(dirty, [[2 * MiB, 64 * KiB]], "the exported bitmap: what changed since the checkpoint");
  const copy = join(vmDir, "copy.raw");
  await execFileP("nbdcopy", [uri, copy]);
  t.match(await imagesIdentical(copy, at2), { identical: true }, "the export = the disk");
  await ok("domjobabort", DOM);

  // libvirt's habit: the filled-in definition given back starts the same backup again
  writeFileSync(px, dump.replace(/ file='[^']*'/g, ""));
  await ok("backup-begin", DOM, px);
  t.match((await ok("backup-dumpxml", DOM)).stdout, `exportbitmap='${bitmap}'`);
  t.ok(await rangeHolds(uri, "raw", 0x32, 2 * MiB, 64 * KiB));
  await ok("domjobabort", DOM);
});
