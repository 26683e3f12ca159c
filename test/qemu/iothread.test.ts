/**
 * Disks in iothreads, as production storage runs them (virtio-blk
 * dataplane, libvirt's <driver iothread='1'>, a qemu-storage-daemon serving
 * vhost-user-blk). On QEMU 7.2 a pull of such a disk aborts QEMU, and so does
 * a FUSE export's write from an iothread after a push (see
 * src/qmp/iothreads.ts): both are refused, QEMU untouched. A push works.
 *
 * The qemu-storage-daemon runs each disk in an iothread of its own, moved
 * there by an export in that iothread (startStorageDaemon's `iothreads`). A
 * VM without a guest never starts virtio-blk's dataplane, so its disks stay
 * in the main loop whatever their device says; there the refusal follows the
 * device's configuration.
 */
import { readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import type { QmpClient } from "../../src/qmp/index.js";
import { iothreadVerdict } from "../../src/qmp/iothread-hazards.js";
import { allocatedRanges } from "../helpers/backup.js";
import { addDomain, cli, startDaemon } from "../helpers/daemon.js";
import { jobManager, leftovers, settledBackup, type TestDomain, testDomain } from "../helpers/domain.js";
import { createImage, execFileP, type QemuProcess, rangeHolds, startStorageDaemon, type Teardown, tempDir } from "../helpers/qemu.js";

const MiB = 1024 * 1024;
const DISKS = [{ size: "16M" }, { size: "16M" }];

/** A storage daemon serving its disks as vhost-user-blk from iothreads, with data written before it opened them. */
const servedOpts = {
  iothreads: "vhost-user-blk",
  prepare: (image: string, i: number) => execFileP("qemu-io", ["-f", "qcow2", "-c", `write -P ${0x11 + i} ${i * MiB} ${2 * MiB}`, image]),
} as const;
const served = (t: Teardown): Promise<TestDomain> => testDomain(t, "vm1", DISKS, undefined, { storageDaemon: true, ...servedOpts });
/** leftovers() but for the exports the storage daemon serves its "guest" with. */
const ours = async (d: TestDomain) => (await leftovers(d.client)).filter((x) => !/^export guest\d$/.test(x));
const alive = (vm: QemuProcess) => vm.proc.exitCode === null && vm.proc.signalCode === null;
/** Whether this QEMU runs a push of a disk in an iothread (as tried on its version; test/qemu/iothread-probe.test.ts checks the table). */
const pushRuns = (client: QmpClient) => iothreadVerdict(client.version.qemu, "push").safe;
const pullRuns = (client: QmpClient) => iothreadVerdict(client.version.qemu, "pull").safe;
const pullXml = (d: TestDomain) =>
  `<domainbackup mode='pull'><server transport='unix' socket='${join(d.backupDir, "nbd.sock")}'/></domainbackup>`;

t.test("a push of disks in iothreads is refused on a QEMU that aborts on it; checkpoints still work", async (t) => {
  const d = await served(t);
  if (pushRuns(d.client)) return t.pass("this QEMU runs the push: see the next test");
  const jm = jobManager(d.backupDir);
  const e = (await jm.begin(d.domain, undefined, "<domaincheckpoint><name>c1</name></domaincheckpoint>"))._unsafeUnwrapErr();
  t.equal(e.code, "unsupported", e.message);
  t.match(
    e.message,
    /push backups of disks in an iothread are refused on QEMU \d+\.\d+\.\d+: .*In an iothread: 'disk0' \(maybe: .*\), 'disk1'/,
  );
  t.same(await ours(d), [], "nothing added to QEMU");
  t.same(readdirSync(join(d.backupDir, "vm1")), [], "no target file");
  t.notOk(d.checkpoints.store.get("c1"), "no checkpoint");
  (await d.checkpoints.create(d.client, "<domaincheckpoint><name>c3</name></domaincheckpoint>"))._unsafeUnwrap();
  (await d.checkpoints.create(d.client, "<domaincheckpoint><name>c4</name></domaincheckpoint>"))._unsafeUnwrap();
  t.same((await d.checkpoints.delete(d.client, "c3"))._unsafeUnwrap(), ["c3"], "a checkpoint merged into its child");
  (await d.checkpoints.requireValid(d.client, "c4"))._unsafeUnwrap();
  t.ok(alive(d.vm), "QEMU runs");
});

t.test("push full and incremental, checkpoints, of disks in iothreads", async (t) => {
  const d = await served(t);
  if (!pushRuns(d.client)) return t.pass("refused on this QEMU: see the previous test");
  const jm = jobManager(d.backupDir);
  const full = await settledBackup(jm, d, undefined, "<domaincheckpoint><name>c1</name></domaincheckpoint>");
  t.equal(full.state, "ready", full.error ?? "");
  t.ok(await rangeHolds(full.disks[0]!.file, "qcow2", 0x11, 0, 2 * MiB), "disk0's data");
  t.ok(await rangeHolds(full.disks[0]!.file, "qcow2", 0, 2 * MiB, 14 * MiB), "and nothing else");
  t.ok(await rangeHolds(full.disks[1]!.file, "qcow2", 0x12, MiB, 2 * MiB), "disk1's data");
  const inc = await settledBackup(
    jm,
    d,
    "<domainbackup><incremental>c1</incremental></domainbackup>",
    "<domaincheckpoint><name>c2</name></domaincheckpoint>",
  );
  t.equal(inc.state, "ready", inc.error ?? "");
  for (const x of inc.disks) t.same(await allocatedRanges(x.file), [], `${x.name}: nothing changed since c1, nothing copied`);
  // checkpoints on their own: create, then delete one in the middle (its bitmap merged into its child's)
  (await d.checkpoints.create(d.client, "<domaincheckpoint><name>c3</name></domaincheckpoint>"))._unsafeUnwrap();
  t.same((await d.checkpoints.delete(d.client, "c2"))._unsafeUnwrap(), ["c2"]);
  (await d.checkpoints.requireValid(d.client, "c3"))._unsafeUnwrap();
  const nodes = (await d.client.execute("query-named-block-nodes", { flat: true }))._unsafeUnwrap();
  const bitmaps = (node: string) => (nodes.find((n) => n["node-name"] === node)?.["dirty-bitmaps"] ?? []).map((b) => b.name).sort();
  t.same(
    [bitmaps("disk0"), bitmaps("disk1")],
    [
      ["c1", "c3"],
      ["c1", "c3"],
    ],
    "c2's bitmaps gone from both disks",
  );
  t.same(await ours(d), [], "nothing left in QEMU");
  t.ok(alive(d.vm), "QEMU runs");
});

t.test("abort mid-push of disks in iothreads: cancelled, nothing left, QEMU runs", async (t) => {
  const d = await served(t);
  if (!pushRuns(d.client)) return t.pass("a push is refused on this QEMU: nothing to abort");
  const jm = jobManager(d.backupDir);
  (await jm.begin(d.domain, undefined, "<domaincheckpoint><name>x1</name></domaincheckpoint>", { bandwidth: 64 * 1024 }))._unsafeUnwrap();
  const ended = (await jm.end("vm1"))._unsafeUnwrap();
  t.equal(ended.state, "cancelled");
  t.notOk(d.checkpoints.store.get("x1"), "no checkpoint claims it");
  t.same(await ours(d), []);
  t.same(readdirSync(join(d.backupDir, "vm1")), [], "partial targets removed");
  t.ok(alive(d.vm), "QEMU runs");
});

t.test("a pull of disks in iothreads runs where QEMU runs it (10.0): point-in-time data, a reader comes and goes", async (t) => {
  const d = await served(t);
  if (!pullRuns(d.client)) return t.pass("refused on this QEMU: see the next test");
  const jm = jobManager(d.backupDir);
  const info = (await jm.begin(d.domain, pullXml(d), "<domaincheckpoint><name>p1</name></domaincheckpoint>"))._unsafeUnwrap();
  t.equal(info.state, "ready", info.error ?? "");
  const sock = join(d.backupDir, "nbd.sock");
  for (const [i, name] of ["disk0", "disk1"].entries()) {
    const url = `nbd+unix:///${name}?socket=${sock}`;
    t.ok(await rangeHolds(url, "raw", 0x11 + i, i * MiB, 2 * MiB), `${name}'s data over NBD`);
    t.ok(await rangeHolds(url, "raw", 0, (i + 2) * MiB, (14 - i) * MiB), `${name}: nothing else`);
  }
  t.ok(alive(d.vm), "QEMU runs after NBD clients left");
  (await jm.end("vm1"))._unsafeUnwrap();
  t.same(await ours(d), [], "nothing left in QEMU");
  (await d.checkpoints.requireValid(d.client, "p1"))._unsafeUnwrap();
  t.ok(alive(d.vm), "QEMU runs");
});

t.test("a pull of disks in iothreads is refused where QEMU aborts on it (7.2), before QEMU is touched", async (t) => {
  const d = await served(t);
  if (pullRuns(d.client)) return t.pass("this QEMU runs the pull: see the previous test");
  const jm = jobManager(d.backupDir);
  const r = await jm.begin(d.domain, pullXml(d), "<domaincheckpoint><name>p1</name></domaincheckpoint>");
  const e = r._unsafeUnwrapErr();
  t.equal(e.code, "unsupported", e.message);
  t.match(e.message, /refused on QEMU \d+\.\d+\.\d+.*In an iothread: 'disk0' \(maybe: .*\), 'disk1' \(maybe: .*\)\./);
  if (pushRuns(d.client)) t.match(e.message, /Use a push backup/, "where a push runs, it is suggested");
  else t.notMatch(e.message, /Use a push backup/, "where a push aborts too, it is not suggested");
  t.same(await ours(d), [], "nothing added to QEMU");
  t.same(readdirSync(join(d.backupDir, "vm1")), [], "no scratch file");
  t.notOk(d.checkpoints.store.get("p1"), "no checkpoint");
  t.ok(alive(d.vm), "QEMU runs");
});

t.test("through the daemon and CLI: what this QEMU aborts on is refused with exit code 2 and the reason; the rest runs", async (t) => {
  // the daemon is the QMP socket's only client here
  const qsd = await startStorageDaemon(t, { disks: DISKS, ...servedOpts });
  const daemon = await startDaemon(t);
  await addDomain(daemon, "qsd", qsd.qmpPath);
  const xml = join(qsd.dir, "pull.xml");
  writeFileSync(
    xml,
    `<domainbackup mode='pull'><server transport='unix' socket='${join(daemon.stateDir, "backups", "nbd.sock")}'/></domainbackup>`,
  );
  const client = qsd.monitor;
  const pull = await cli(daemon.socket, ["backup-begin", "qsd", xml]);
  if (pullRuns(client)) {
    t.equal(pull.code, 0, pull.stderr);
    t.equal((await cli(daemon.socket, ["domjobabort", "qsd"])).code, 0, "the pull ended");
  } else {
    t.equal(pull.code, 2, "exit code 2: refused as unsupported");
    t.match(pull.stderr, /pull backups of disks in an iothread are refused on QEMU \d+\.\d+/);
  }
  if (pushRuns(client)) {
    t.equal((await cli(daemon.socket, ["backup-begin", "qsd"])).code, 0);
    const waited = await cli(daemon.socket, ["wait", "qsd", "--timeout", "60"]);
    t.equal(waited.code, 0, waited.stderr);
  } else {
    const push = await cli(daemon.socket, ["backup-begin", "qsd"]);
    t.equal(push.code, 2, "the push too: exit code 2");
    t.match(push.stderr, /push backups of disks in an iothread are refused on QEMU \d+\.\d+/);
  }
  t.ok(alive(qsd), "QEMU runs");
});

t.test(
  "a push of disks a FUSE export serves from an iothread is refused (7.2: the export's next write aborts); the guest keeps writing",
  async (t) => {
    const d = await testDomain(t, "vm1", DISKS, undefined, { storageDaemon: true, iothreads: "fuse" });
    const jm = jobManager(d.backupDir);
    await d.vm.write(0, 0x21, 0, MiB);
    const e = (await jm.begin(d.domain, undefined, "<domaincheckpoint><name>c1</name></domaincheckpoint>"))._unsafeUnwrapErr();
    t.equal(e.code, "unsupported", e.message);
    t.match(e.message, /push backups of disks in an iothread are refused on QEMU .*'disk0' \(maybe: .*\), 'disk1' \(maybe: .*\)\./);
    if (pushRuns(d.client)) t.match(e.message, /FUSE export/, "refused for the FUSE export where a push itself runs");
    // had the backup run, this write would abort QEMU
    await d.vm.write(0, 0x22, 0, MiB);
    t.ok(alive(d.vm), "QEMU runs");
    t.same(await ours(d), []);
    t.notOk(d.checkpoints.store.get("c1"), "no checkpoint");
  },
);

t.test("a VM: refused for disks whose device or controller names an iothread, allowed for the others", async (t) => {
  const dir = tempDir(t);
  const scsi: string[] = [];
  for (const [id, controller] of [
    ["sda", "scsi0"],
    ["sdb", "scsi1"],
  ] as const) {
    const img = join(dir, `${id}.qcow2`);
    await createImage(img, "16M");
    const node = { "node-name": `drive-${id}`, driver: "qcow2", file: { driver: "file", filename: img } };
    scsi.push("-blockdev", JSON.stringify(node), "-device", `scsi-hd,drive=drive-${id},bus=${controller}.0,id=${id}`);
  }
  const d = await testDomain(t, "vm1", [{ size: "16M", iothread: "io0" }, { size: "16M" }], undefined, {
    extraArgs: [
      "-object",
      "iothread,id=io9",
      "-device",
      "virtio-scsi-pci,id=scsi0,iothread=io9",
      "-device",
      "virtio-scsi-pci,id=scsi1",
      ...scsi,
    ],
  });
  const jm = jobManager(d.backupDir);
  // the mode this QEMU aborts on: a pull on 7.2, a push on 10.0
  const refusedXml = pullRuns(d.client) ? "<domainbackup/>" : pullXml(d);
  const e = (await jm.begin(d.domain, refusedXml, undefined))._unsafeUnwrapErr();
  t.equal(e.code, "unsupported", e.message);
  t.match(
    e.message,
    /In an iothread: 'vda' \(\/objects\/io0\), 'sda' \(\/objects\/io9\)\./,
    "virtio-blk's own iothread; virtio-scsi's controller's",
  );
  await d.vm.write(1, 0x41, 0, MiB);
  const sock = join(d.backupDir, "nbd.sock");
  const others = `<domainbackup mode='pull'><server transport='unix' socket='${sock}'/><disks><disk name='vdb'/><disk name='sdb'/></disks></domainbackup>`;
  const info = (await jm.begin(d.domain, others, undefined))._unsafeUnwrap();
  t.equal(info.state, "ready", info.error ?? "");
  t.ok(await rangeHolds(`nbd+unix:///vdb?socket=${sock}`, "raw", 0x41, 0, MiB), "vdb served");
  (await jm.end("vm1"))._unsafeUnwrap();
  t.same(await leftovers(d.client), []);
});
