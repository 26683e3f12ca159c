/**
 * Disk discovery from the block graph, on real QEMU: a VM whose disk has a
 * named backing node (as libvirt starts every VM) has one disk, before and
 * after blockdev-snapshot and block-commit; while a foreign block job puts a
 * filter above the disk, the disk and its bitmaps are still found below it,
 * so checkpoints stay valid, delete removes the real bitmap and sizes show.
 */
import { join } from "node:path";
import t from "tap";
import { discoverDisks } from "../../src/qmp/disks.js";
import type { QmpClient } from "../../src/qmp/index.js";
import { qemuIoDevice } from "../../src/qmp/index.js";
import { jobManager, leftovers, settledBackup, testDomain, waitJob } from "../helpers/domain.js";
import { createImage, execFileP, imagesIdentical, tempDir } from "../helpers/qemu.js";

const MiB = 1024 * 1024;
const QDEV = "/machine/peripheral/virtio-disk0/virtio-backend";

/** libvirt's way: every layer a named -blockdev, the overlay's backing given by node-name. */
async function libvirtChainArgs(dir: string): Promise<string[]> {
  const base = join(dir, "base.qcow2");
  const top = join(dir, "top.qcow2");
  await createImage(base, "16M");
  await execFileP("qemu-io", ["-f", "qcow2", "-c", `write -P 0x61 0 ${MiB}`, base]);
  await execFileP("qemu-img", ["create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top]);
  const file = (n: number, path: string) =>
    JSON.stringify({ driver: "file", filename: path, "node-name": `libvirt-${n}-storage`, "auto-read-only": true, discard: "unmap" });
  return [
    "-blockdev",
    file(2, base),
    "-blockdev",
    JSON.stringify({ "node-name": "libvirt-2-format", "read-only": true, driver: "qcow2", file: "libvirt-2-storage", backing: null }),
    "-blockdev",
    file(1, top),
    "-blockdev",
    JSON.stringify({
      "node-name": "libvirt-1-format",
      "read-only": false,
      driver: "qcow2",
      file: "libvirt-1-storage",
      backing: "libvirt-2-format",
    }),
    "-device",
    "virtio-blk-pci,drive=libvirt-1-format,id=virtio-disk0",
  ];
}

async function diskList(client: QmpClient): Promise<{ name: string; node: string }[]> {
  return (await discoverDisks(client))._unsafeUnwrap().map((d) => ({ name: d.name, node: d.nodeName }));
}

t.test("a named backing node is not a disk: incremental from a checkpoint works, after snapshot and commit too", async (t) => {
  const dir = tempDir(t);
  const d = await testDomain(t, "lv", [], undefined, { extraArgs: await libvirtChainArgs(dir) });
  t.same(await diskList(d.client), [{ name: "virtio-disk0", node: "libvirt-1-format" }], "one disk, on the overlay");
  const jm = jobManager(d.backupDir);
  const full = await settledBackup(jm, d, undefined, "<domaincheckpoint><name>cp1</name></domaincheckpoint>");
  t.equal(full.state, "ready", full.error ?? "");
  t.same(
    full.disks.map((x) => x.name),
    ["virtio-disk0"],
  );
  (await qemuIoDevice(d.vm.monitor, QDEV, `write -P 0x72 ${2 * MiB} ${MiB}`))._unsafeUnwrap();
  const inc = await settledBackup(jm, d, "<domainbackup><incremental>cp1</incremental></domainbackup>", undefined);
  t.equal(inc.state, "ready", inc.error ?? "");

  // blockdev-snapshot: a new named overlay on top; the old top becomes a backing node
  const snap = join(dir, "snap.qcow2");
  await createImage(snap, "16M");
  const mon = d.vm.monitor;
  (await mon.execute("blockdev-add", { driver: "file", filename: snap, "node-name": "libvirt-3-storage" }))._unsafeUnwrap();
  (
    await mon.execute("blockdev-add", { driver: "qcow2", "node-name": "libvirt-3-format", file: "libvirt-3-storage", backing: null })
  )._unsafeUnwrap();
  (await mon.executeRaw("blockdev-snapshot", { node: "libvirt-1-format", overlay: "libvirt-3-format" }))._unsafeUnwrap();
  t.same(
    await diskList(d.client),
    [{ name: "virtio-disk0", node: "libvirt-3-format" }],
    "after blockdev-snapshot: one disk, on the new overlay",
  );

  // active block-commit: while it runs a mirror_top/commit_top filter sits above; after it the disk is back on libvirt-1-format
  (
    await mon.executeRaw("block-commit", {
      "job-id": "fc",
      device: "libvirt-3-format",
      "base-node": "libvirt-1-format",
      "filter-node-name": "commit-flt",
    })
  )._unsafeUnwrap();
  await waitJob(mon, "fc", "ready");
  t.same(await diskList(d.client), [{ name: "virtio-disk0", node: "libvirt-3-format" }], "during the commit: the filter is looked through");
  (await mon.executeRaw("job-complete", { id: "fc" }))._unsafeUnwrap();
  await waitJob(mon, "fc", "gone");
  // as libvirt does: the committed overlay is deleted (left alone, an unattached named node counts as a spare disk)
  (await mon.execute("blockdev-del", { "node-name": "libvirt-3-format" }))._unsafeUnwrap();
  (await mon.execute("blockdev-del", { "node-name": "libvirt-3-storage" }))._unsafeUnwrap();
  t.same(await diskList(d.client), [{ name: "virtio-disk0", node: "libvirt-1-format" }], "after the commit: the disk is the base again");

  // the full backup at the end holds the chain's data byte for byte
  const last = await settledBackup(jm, d, undefined, undefined);
  t.equal(last.state, "ready", last.error ?? "");
  const now = join(dir, "now.qcow2");
  await execFileP("qemu-img", ["convert", "-U", "-O", "qcow2", join(dir, "top.qcow2"), now]);
  const cmp = await imagesIdentical(last.disks[0]!.file, now);
  t.ok(cmp.identical, cmp.output);
  t.same(await leftovers(d.client), []);
});

t.test("block-stream into the overlay: while it runs and after, one disk; the streamed-from base is no disk while it backs", async (t) => {
  const dir = tempDir(t);
  const d = await testDomain(t, "st", [], undefined, { extraArgs: await libvirtChainArgs(dir) });
  const mon = d.vm.monitor;
  (await mon.executeRaw("block-stream", { "job-id": "fs", device: "libvirt-1-format", speed: 65536 }))._unsafeUnwrap();
  await waitJob(mon, "fs", "running");
  t.same(await diskList(d.client), [{ name: "virtio-disk0", node: "libvirt-1-format" }], "during the stream");
  (await mon.executeRaw("block-job-set-speed", { device: "fs", speed: 0 }))._unsafeUnwrap();
  await waitJob(mon, "fs", "gone");
  // the base no longer backs anything; libvirt deletes it, and so does this test
  (await mon.execute("blockdev-del", { "node-name": "libvirt-2-format" }))._unsafeUnwrap();
  (await mon.execute("blockdev-del", { "node-name": "libvirt-2-storage" }))._unsafeUnwrap();
  t.same(await diskList(d.client), [{ name: "virtio-disk0", node: "libvirt-1-format" }], "after the stream");
  const full = await settledBackup(jobManager(d.backupDir), d, undefined, undefined);
  t.equal(full.state, "ready", full.error ?? "");
  t.same(await leftovers(d.client), []);
});

t.test("blockdev-reopen onto another backing node: still one disk, the new base is no disk, backups byte-exact", async (t) => {
  const dir = tempDir(t);
  const d = await testDomain(t, "ro", [], undefined, { extraArgs: await libvirtChainArgs(dir) });
  const mon = d.vm.monitor;
  // a copy of the base, opened as libvirt-3-*, then the overlay reopened onto it (as a tool moving a chain would)
  const copy = join(dir, "base-copy.qcow2");
  await execFileP("qemu-img", ["convert", "-O", "qcow2", join(dir, "base.qcow2"), copy]);
  (
    await mon.executeRaw("blockdev-add", { driver: "file", filename: copy, "node-name": "libvirt-3-storage", "auto-read-only": true })
  )._unsafeUnwrap();
  (
    await mon.executeRaw("blockdev-add", {
      "node-name": "libvirt-3-format",
      "read-only": true,
      driver: "qcow2",
      file: "libvirt-3-storage",
      backing: null,
    })
  )._unsafeUnwrap();
  const top = { "node-name": "libvirt-1-format", "read-only": false, driver: "qcow2", file: "libvirt-1-storage" };
  (await mon.executeRaw("blockdev-reopen", { options: [{ ...top, backing: "libvirt-3-format" }] }))._unsafeUnwrap();
  (await mon.execute("blockdev-del", { "node-name": "libvirt-2-format" }))._unsafeUnwrap();
  (await mon.execute("blockdev-del", { "node-name": "libvirt-2-storage" }))._unsafeUnwrap();
  t.same(await diskList(d.client), [{ name: "virtio-disk0", node: "libvirt-1-format" }], "the new backing node is no disk");
  const full = await settledBackup(jobManager(d.backupDir), d, undefined, undefined);
  t.equal(full.state, "ready", full.error ?? "");
  const flat = join(dir, "flat.qcow2");
  // (the overlay's header still names the old base, whose data the copy has)
  await execFileP("qemu-img", ["convert", "-U", "-O", "qcow2", join(dir, "top.qcow2"), flat]);
  const same = await imagesIdentical(full.disks[0]!.file, flat);
  t.ok(same.identical, `the backup is the disk as the guest sees it: ${same.output}`);
  t.same(await leftovers(d.client), []);
});

/** A foreign job that stays running: a throttled backup (copy-before-write above the disk), or a mirror in ready state (mirror_top). */
async function foreignJob(mon: QmpClient, kind: "backup" | "mirror"): Promise<void> {
  (await mon.executeRaw("blockdev-add", { driver: "null-co", "node-name": "foreign-target", size: 64 * MiB }))._unsafeUnwrap();
  if (kind === "backup") {
    (
      await mon.executeRaw("blockdev-backup", {
        "job-id": "foreign",
        device: "drive-vda",
        target: "foreign-target",
        sync: "full",
        speed: 1,
        "filter-node-name": "foreign-cbw",
      })
    )._unsafeUnwrap();
    await waitJob(mon, "foreign", "running");
  } else {
    (
      await mon.executeRaw("blockdev-mirror", {
        "job-id": "foreign",
        device: "drive-vda",
        target: "foreign-target",
        sync: "full",
        "filter-node-name": "foreign-mirror",
      })
    )._unsafeUnwrap();
    await waitJob(mon, "foreign", "ready");
  }
}

for (const kind of ["backup", "mirror"] as const) {
  t.test(`a foreign ${kind} job's filter hides neither the disk nor its bitmaps`, async (t) => {
    const d = await testDomain(t, "fj", [{}]);
    const mon = d.vm.monitor;
    (await d.checkpoints.create(d.client, "<domaincheckpoint><name>cp1</name></domaincheckpoint>"))._unsafeUnwrap();
    (await d.checkpoints.create(d.client, "<domaincheckpoint><name>cp2</name></domaincheckpoint>"))._unsafeUnwrap();
    await d.vm.write(0, 0x41, 0, MiB);
    await foreignJob(mon, kind);
    const top = (await mon.execute("query-block"))._unsafeUnwrap()[0]?.inserted?.["node-name"];
    t.not(top, "drive-vda", `query-block shows the filter (${top}) above the disk`);
    t.same(await diskList(d.client), [{ name: "vda", node: "drive-vda" }], "the disk is the node below the filter");

    const a = (await d.checkpoints.reconcile(d.client))._unsafeUnwrap();
    t.same(a.problems.get("cp1"), [], "cp1 valid while the foreign job runs");
    t.same(a.problems.get("cp2"), [], "cp2 valid while the foreign job runs");
    const xml = (await d.checkpoints.xml(d.client, "cp1", { size: true }))._unsafeUnwrap();
    t.match(xml, /size=['"]1048576['"]/, "dumpxml --size counts the guest's write");

    (await d.checkpoints.delete(d.client, "cp1"))._unsafeUnwrap();
    const bitmaps = (await mon.execute("query-named-block-nodes", { flat: true }))
      ._unsafeUnwrap()
      .find((n) => n["node-name"] === "drive-vda")
      ?.["dirty-bitmaps"]?.flatMap((b) => (b.name === undefined ? [] : [b.name]));
    t.same(bitmaps, ["cp2"], "delete removed cp1's bitmap from the disk node");

    (await mon.executeRaw("block-job-cancel", { device: "foreign", force: true }))._unsafeUnwrap();
    await waitJob(mon, "foreign", "gone");
    const after = (await d.checkpoints.reconcile(d.client))._unsafeUnwrap();
    t.same(after.problems.get("cp2"), [], "cp2 still valid after the job ended");
    t.same(await diskList(d.client), [{ name: "vda", node: "drive-vda" }]);
  });
}
