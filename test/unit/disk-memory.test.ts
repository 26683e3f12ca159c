/**
 * The disk memory (what a domain's disks were when QEMU last ran) and the
 * storage daemon's command line built from it: which disks can be opened
 * offline, what is written and when, what a damaged file does.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pino } from "pino";
import t from "tap";
import { DiskMemory, rememberable } from "../../src/daemon/disk-memory.js";
import { storageDaemonArgs } from "../../src/daemon/offline.js";
import type { DiskInfo } from "../../src/qmp/disks.js";

const log = pino({ level: "silent" });

function disk(over: Partial<DiskInfo> = {}): DiskInfo {
  return {
    name: "vda",
    nodeName: "drive-vda",
    qdev: "/machine/peripheral/vda/virtio-backend",
    file: "/var/lib/vm/vda.qcow2",
    format: "qcow2",
    virtualSize: 1 << 30,
    clusterSize: 65536,
    readOnly: false,
    hasBacking: true,
    bitmaps: [],
    below: [{ nodeName: "base", readOnly: true, file: "/var/lib/vm/base.qcow2", bitmaps: [] }],
    ...over,
  };
}

t.test("rememberable: qcow2 and raw over plain files; not json: pseudo-filenames or other formats", async (t) => {
  t.same(rememberable(disk()), {
    name: "vda",
    file: "/var/lib/vm/vda.qcow2",
    format: "qcow2",
    readOnly: false,
    node: "drive-vda",
    device: "/machine/peripheral/vda/virtio-backend",
    chain: ["/var/lib/vm/base.qcow2"],
  });
  t.equal(rememberable(disk({ format: "raw", file: "/dev/vg0/vm" }))?.format, "raw");
  t.equal(rememberable(disk({ file: 'json:{"driver":"qcow2"}' })), undefined);
  t.equal(rememberable(disk({ format: "vmdk" })), undefined);
});

t.test("remembered, written only on a change, read back; registered disks stand in until QEMU is seen", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "qbackupd-mem-"));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const m = await DiskMemory.open(dir, "vm1", log, [{ name: "vda", file: "/img/vda.qcow2", format: "qcow2" }]);
  t.same(
    m.disks?.map((d) => d.file),
    ["/img/vda.qcow2"],
    "registered by hand",
  );
  t.ok((await m.remember([disk()], 100)).isOk());
  const path = join(dir, "images", "vm1.json");
  const first = readFileSync(path, "utf8");
  t.ok((await m.remember([disk()], 200)).isOk());
  t.equal(readFileSync(path, "utf8"), first, "the same disks: not rewritten");
  const again = await DiskMemory.open(dir, "vm1", log, [{ name: "vda", file: "/img/other.qcow2", format: "qcow2" }]);
  t.equal(again.disks?.[0]?.file, "/var/lib/vm/vda.qcow2", "what QEMU showed wins over the registration");
  t.equal(again.seenAt, 100);
  writeFileSync(path, '{"version":1,"seenAt":1,"disks":[{"name":"vda","file":"relative","format":"qcow2"}]}');
  t.equal((await DiskMemory.open(dir, "vm1", log)).disks, undefined, "a damaged file is ignored (logged), never guessed from");
});

t.test("the storage daemon's command line: locking on, one format node per disk named after it, read-only kept", async (t) => {
  const args = storageDaemonArgs(
    [
      { name: "vda", file: "/img/vda.qcow2", format: "qcow2", readOnly: false, node: "x" },
      { name: "vdb", file: "/img/vdb.raw", format: "raw", readOnly: true, node: "y" },
    ],
    "/run/q.qmp",
    "/run/q.pid",
  );
  const blockdevs = args.flatMap((a, i) => (args[i - 1] === "--blockdev" ? [JSON.parse(a) as Record<string, unknown>] : []));
  t.same(blockdevs, [
    { driver: "file", "node-name": "qbf0", filename: "/img/vda.qcow2", locking: "on" },
    { driver: "qcow2", "node-name": "vda", file: "qbf0", "read-only": false },
    { driver: "file", "node-name": "qbf1", filename: "/img/vdb.raw", locking: "on" },
    { driver: "raw", "node-name": "vdb", file: "qbf1", "read-only": true },
  ]);
  t.ok(args.includes("socket,id=qbkm,path=/run/q.qmp,server=on,wait=off"));
  t.same(args.slice(-2), ["--pidfile", "/run/q.pid"]);
});
