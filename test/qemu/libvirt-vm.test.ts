/**
 * End to end on VMs started as libvirt starts them (Debian's libvirt 9.0
 * command lines, test/fixtures/libvirt): a qcow2 disk over a named qcow2
 * backing node, a virtio-blk disk in an iothread, virtio-scsi with a raw and
 * a qcow2 disk. Through the built daemon and CLI: checkpoint, full push with
 * a checkpoint, guest writes, incremental push, pull, checkpoint delete —
 * each backup byte-exact against the disk at backup time, and libvirt's
 * backing nodes never listed as disks.
 */
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { iothreadVerdict } from "../../src/qmp/iothread-hazards.js";
import { rebaseOnto, snapshotDisks } from "../helpers/backup.js";
import { cli, startDaemon } from "../helpers/daemon.js";
import { leftovers } from "../helpers/domain.js";
import { startLibvirtVm } from "../helpers/libvirt.js";
import { imagesIdentical } from "../helpers/qemu.js";

const KiB = 1024;
const MiB = 1024 * KiB;

interface CompletedJob {
  disks: { name: string; file: string }[];
}

for (const fixture of ["chain", "iothread", "scsi"]) {
  t.test(`libvirt VM '${fixture}': checkpoint, full, incremental, pull, delete`, async (t) => {
    const vm = await startLibvirtVm(t, fixture);
    const names = vm.disks.map((x) => x.id);
    // raw disks carry no bitmaps: incrementals leave them out, as libvirt users must
    const skipRaw = vm.disks.some((x) => x.format === "raw")
      ? vm.disks.map((x) => `<disk name='${x.id}' backup='${x.format === "raw" ? "no" : "yes"}'/>`).join("")
      : "";
    const disksXml = skipRaw === "" ? "" : `<disks>${skipRaw}</disks>`;
    const incIdx = [...vm.disks.keys()].filter((i) => vm.disks[i]!.format !== "raw");
    const d = await startDaemon(t);
    const ok = async (...args: string[]) => {
      const r = await cli(d.socket, args);
      t.equal(r.code, 0, `qbackup ${args.join(" ")}: ${r.stderr.trim()}`);
      return r;
    };
    await ok("domain-add", "vm1", "--qmp", vm.qmpPath);
    for (let i = 0; i < 200; i++) {
      const l = JSON.parse((await ok("--json", "domain-list")).stdout) as { state: string }[];
      if (l[0]?.state === "connected") break;
      await new Promise((r) => setTimeout(r, 50));
    }
    // the disk at a moment, as a standalone image (a backup of our own, straight over QMP)
    const snap = (name: string) => snapshotDisks(vm, name, "16M");
    const completed = async () => JSON.parse((await ok("--json", "domjobinfo", "vm1", "--completed")).stdout) as CompletedJob;

    await ok("checkpoint-create-as", "vm1", "c0");
    t.match((await ok("checkpoint-dumpxml", "vm1", "c0")).stdout, new RegExp(names.map((n) => `<disk name='${n}'`).join("[^]*")));
    for (const b of vm.backingNodes) t.notMatch((await ok("checkpoint-dumpxml", "vm1", "c0")).stdout, b, `backing node ${b} is no disk`);

    // full push with a checkpoint
    for (const i of vm.disks.keys()) await vm.write(i, 0x11 + i, 2 * MiB, MiB);
    const cp = join(vm.dir, "cp.xml");
    writeFileSync(cp, "<domaincheckpoint><name>c1</name></domaincheckpoint>");
    const first = await cli(d.socket, ["backup-begin", "vm1", "", cp]);
    // QEMU 10.0 aborts on a push of a disk in an iothread (src/qmp/iothread-hazards.ts): refused, checkpoints instead
    const pushRefused = first.code !== 0 && /push backups of disks in an iothread are refused on QEMU/.test(first.stderr);
    if (pushRefused) {
      t.notOk(iothreadVerdict(vm.monitor.version.qemu, "push").safe, `refused only where the table says so: ${first.stderr}`);
      return pushRefusedRest();
    }
    t.equal(first.code, 0, first.stderr);
    await ok("wait", "vm1", "--timeout", "60");
    const at1 = await snap("at1");
    const full = await completed();
    t.same(
      full.disks.map((x) => x.name),
      names,
      "exactly the guest's disks are backed up",
    );

    // guest writes, incremental push since c1
    for (const i of vm.disks.keys()) await vm.write(i, 0x21 + i, 5 * MiB, 128 * KiB);
    const bx = join(vm.dir, "inc.xml");
    writeFileSync(bx, `<domainbackup><incremental>c1</incremental>${disksXml}</domainbackup>`);
    writeFileSync(cp, "<domaincheckpoint><name>c2</name></domaincheckpoint>");
    await ok("backup-begin", "vm1", bx, cp);
    await ok("wait", "vm1", "--timeout", "60");
    const at2 = await snap("at2");
    const inc = await completed();
    for (const i of vm.disks.keys()) {
      const c1 = await imagesIdentical(full.disks[i]!.file, at1[i]!);
      t.ok(c1.identical, `full = disk ${names[i]} at c1: ${c1.output}`);
    }
    t.same(
      inc.disks.map((x) => x.name),
      incIdx.map((i) => names[i]),
    );
    for (const [k, i] of incIdx.entries()) {
      await rebaseOnto(inc.disks[k]!.file, full.disks[i]!.file);
      const c2 = await imagesIdentical(inc.disks[k]!.file, at2[i]!);
      t.ok(c2.identical, `full + incremental = disk ${names[i]} at c2: ${c2.output}`);
    }

    return pullAndDelete();

    /** On a QEMU that refuses the pushes: the checkpoints made directly, then the same pull and delete. */
    async function pushRefusedRest() {
      await ok("checkpoint-create-as", "vm1", "c1");
      await ok("checkpoint-create-as", "vm1", "c2");
      return pullAndDelete();
    }

    async function pullAndDelete() {
      // pull: the export serves the disk as it is
      await vm.write(0, 0x31, 8 * MiB, 64 * KiB);
      const at3 = await snap("at3");
      const sock = join(d.stateDir, "backups", "nbd.sock");
      const px = join(vm.dir, "pull.xml");
      writeFileSync(
        px,
        `<domainbackup mode='pull'><incremental>c2</incremental><server transport='unix' socket='${sock}'/>${disksXml}</domainbackup>`,
      );
      const pull = await cli(d.socket, ["backup-begin", "vm1", px]);
      if (pull.code !== 0 && /iothread are refused on QEMU 7\./.test(pull.stderr)) {
        t.pass("QEMU 7.2: a pull of a disk in an iothread is refused, as documented");
      } else {
        t.equal(pull.code, 0, pull.stderr);
        await ok("wait", "vm1", "--timeout", "60");
        for (const i of incIdx) {
          const c = await imagesIdentical(`nbd+unix:///${names[i]}?socket=${sock}`, at3[i]!);
          t.ok(c.identical, `pull export ${names[i]} = disk at pull time: ${c.output}`);
        }
        await ok("domjobabort", "vm1");
      }

      // checkpoint delete: the bitmaps go from the disk nodes (a raw disk's too: volatile), none ever were on a backing node
      await ok("checkpoint-delete", "vm1", "c1");
      t.equal((await ok("checkpoint-list", "vm1", "--name")).stdout, "c0\nc2\n");
      const nodes = (await vm.monitor.execute("query-named-block-nodes", { flat: true }))._unsafeUnwrap();
      for (const n of nodes) {
        // a raw disk's volatile bitmaps come with their live markers (qbk-live-…): the checkpoints' bitmaps are what count here
        const bitmaps = (n["dirty-bitmaps"] ?? [])
          .flatMap((b) => (b.name === undefined || b.name.startsWith("qbk-live-") ? [] : [b.name]))
          .sort();
        const node = n["node-name"] ?? "";
        if (vm.disks.some((x) => x.node === node)) t.same(bitmaps, ["c0", "c2"], `bitmaps on ${node}`);
        else t.same(bitmaps, [], `no bitmaps on ${node}`);
      }
      t.same(await leftovers(vm.monitor), []);
    }
  });
}
