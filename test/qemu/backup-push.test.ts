/** Push backups on real QEMU with 2 disks: point in time, chains, abort, failure, isolation. */
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t from "tap";
import { allocatedRanges, handBackups, rebaseOnto } from "../helpers/backup.js";
import { bitmapNames, jobManager, leftovers, testDomain } from "../helpers/domain.js";
import { execFileP, imagesIdentical, rangeHolds } from "../helpers/qemu.js";

const KiB = 1024;
const MiB = 1024 * KiB;
const DISKS = [{ size: "16M" }, { size: "16M" }];

t.test("full push: each target is its disk at begin time, guest writes during the job are not in it", async (t) => {
  const d = await testDomain(t, "vm1", DISKS);
  const jm = jobManager(d.backupDir);
  // 1 MiB pieces with gaps, so the rate-limited job copies many chunks and is
  // certainly still running while the guest writes below
  for (let off = 0; off < 16 * MiB; off += 2 * MiB) await d.vm.write(0, 0x11, off, MiB);
  await d.vm.write(1, 0x21, 2 * MiB, MiB);
  const info = (await jm.begin(d.domain, undefined, undefined, { bandwidth: 128 * KiB }))._unsafeUnwrap();
  t.equal(info.state, "inprogress");
  t.equal(info.disks.length, 2);
  t.match((await jm.begin(d.domain, undefined, undefined))._unsafeUnwrapErr(), { code: "busy" }, "one backup per domain");
  await d.vm.write(0, 0x12, 14 * MiB, 64 * KiB); // overwrite data the backup has to keep
  await d.vm.write(0, 0x13, 9 * MiB, MiB); // new data in a gap
  await d.vm.write(1, 0x22, 2 * MiB, 64 * KiB);
  const running = (await jm.info("vm1"))._unsafeUnwrap();
  t.equal(running.state, "inprogress");
  const events: string[] = [];
  jm.subscribe((e) => events.push(e.type));
  (await jm.setBandwidth("vm1", 0))._unsafeUnwrap();
  const done = (await jm.wait("vm1", 30_000))._unsafeUnwrap();
  t.equal(done.state, "ready", `push ready: ${done.error ?? ""}`);
  t.equal(done.bytesDone, done.bytesTotal);
  t.equal(done.active, false);
  const [ta, tb] = done.disks.map((x) => x.file);
  for (let off = 0; off < 16 * MiB; off += 2 * MiB)
    t.ok(await rangeHolds(ta!, "qcow2", 0x11, off, MiB), `vda: data from before begin at ${off / MiB} MiB`);
  t.ok(await rangeHolds(ta!, "qcow2", 0, 9 * MiB, MiB), "vda: data written after begin is absent");
  t.ok(await rangeHolds(tb!, "qcow2", 0x21, 2 * MiB, MiB), "vdb: data from before begin");
  t.same(await leftovers(d.client), [], "nothing left in QEMU");
  t.same(
    events.filter((e) => e !== "progress"),
    ["ready", "ended"],
    "subscribers see ready, then ended",
  );
  t.match((await jm.info("vm1", { completed: true }))._unsafeUnwrap(), { state: "ready", mode: "push" });
  t.match((await jm.info("vm1"))._unsafeUnwrapErr(), { code: "no-job" });
  // the target files are private
  const { stat } = await import("node:fs/promises");
  t.equal((await stat(ta!)).mode & 0o777, 0o600);
  // once QEMU is gone, the untouched-since disk compares equal byte for byte
  (await d.vm.monitor.execute("quit"))._unsafeUnwrap();
  await d.vm.exited;
  await execFileP("qemu-io", ["-f", "qcow2", "-c", "write -P 0x21 2M 64k", d.vm.disks[1]!.path]); // undo the later vdb write
  const cmp = await imagesIdentical(tb!, d.vm.disks[1]!.path);
  t.ok(cmp.identical, cmp.output);
});

t.test("full → incremental → incremental chain, restored with rebase, equals the disk at each checkpoint", async (t) => {
  const d = await testDomain(t, "vm1", DISKS);
  const jm = jobManager(d.backupDir);
  const snap = async (name: string) => {
    const files = d.vm.disks.map((x) => join(d.vm.dir, `${name}-${x.id}.qcow2`));
    await handBackups(
      d.client,
      "16M",
      d.vm.disks.map((x, i) => ({ node: x.node, target: files[i]!, sync: "full" as const })),
    );
    return files;
  };
  const push = async (backupXml: string | undefined, cp: string) => {
    (await jm.begin(d.domain, backupXml, `<domaincheckpoint><name>${cp}</name></domaincheckpoint>`))._unsafeUnwrap();
    const r = (await jm.wait("vm1", 30_000))._unsafeUnwrap();
    t.equal(r.state, "ready", `${cp}: ${r.error ?? ""}`);
    return r.disks.map((x) => x.file);
  };
  await d.vm.write(0, 0x31, 0, 2 * MiB);
  await d.vm.write(1, 0x41, MiB, MiB);
  const full = await push(undefined, "c1");
  const at1 = await snap("at1");
  await d.vm.write(0, 0x32, 3 * MiB, 128 * KiB);
  await d.vm.write(1, 0x42, 0, 64 * KiB);
  const inc1 = await push("<domainbackup><incremental>c1</incremental></domainbackup>", "c2");
  const at2 = await snap("at2");
  await d.vm.write(0, 0x33, 10 * MiB + 5, 100);
  const inc2 = await push("<domainbackup><incremental>c2</incremental></domainbackup>", "c3");
  const at3 = await snap("at3");
  t.same(await allocatedRanges(inc1[0]!), [[3 * MiB, 128 * KiB]], "inc1 vda: exactly the dirty clusters");
  t.same(await allocatedRanges(inc1[1]!), [[0, 64 * KiB]], "inc1 vdb");
  t.same(await allocatedRanges(inc2[0]!), [[10 * MiB, 64 * KiB]], "inc2 vda");
  t.same(await allocatedRanges(inc2[1]!), [], "inc2 vdb: nothing changed");
  for (let i = 0; i < 2; i++) {
    t.ok((await imagesIdentical(full[i]!, at1[i]!)).identical, `full = disk at c1 (disk ${i})`);
    await rebaseOnto(inc1[i]!, full[i]!);
    t.ok((await imagesIdentical(inc1[i]!, at2[i]!)).identical, `full+inc1 = disk at c2 (disk ${i})`);
    await rebaseOnto(inc2[i]!, inc1[i]!);
    t.ok((await imagesIdentical(inc2[i]!, at3[i]!)).identical, `full+inc1+inc2 = disk at c3 (disk ${i})`);
  }
  t.same(
    d.checkpoints.store.list().map((c) => [c.name, c.parent]),
    [
      ["c1", undefined],
      ["c2", "c1"],
      ["c3", "c2"],
    ],
  );
  t.same(await leftovers(d.client), []);
});

t.test("abort mid-push: cancelled, nothing left, no checkpoint claims it; refusals before anything is touched", async (t) => {
  const d = await testDomain(t, "vm1", DISKS);
  const jm = jobManager(d.backupDir);
  for (let off = 0; off < 8 * MiB; off += 2 * MiB) await d.vm.write(0, 0x51, off, MiB);
  (await jm.begin(d.domain, undefined, "<domaincheckpoint><name>x1</name></domaincheckpoint>", { bandwidth: 64 * KiB }))._unsafeUnwrap();
  t.equal(d.checkpoints.store.current, "x1");
  const ended = (await jm.end("vm1"))._unsafeUnwrap();
  t.equal(ended.state, "cancelled");
  t.equal(d.checkpoints.store.get("x1"), undefined, "checkpoint created with the aborted backup is gone");
  t.equal(d.checkpoints.store.current, undefined);
  t.same(await leftovers(d.client), []);
  t.same(await bitmapNames(d.client), [], "no bitmap left");
  t.same(readdirSync(join(d.backupDir, "vm1")), [], "partial targets removed");

  // refusals
  const outside = `<domainbackup><disks><disk name='vda'><target file='/etc/qbk-evil.qcow2'/></disk><disk name='vdb' backup='no'/></disks></domainbackup>`;
  t.match((await jm.begin(d.domain, outside, undefined))._unsafeUnwrapErr(), {
    code: "path-refused",
    message: /outside the allowed directories/,
  });
  const rel = `<domainbackup><disks><disk name='vda'><target file='${d.backupDir}/../escape.qcow2'/></disk></disks></domainbackup>`;
  t.match((await jm.begin(d.domain, rel, undefined))._unsafeUnwrapErr(), { code: "path-refused" });
  const existing = join(d.backupDir, "exists.qcow2");
  await execFileP("qemu-img", ["create", "-q", "-f", "qcow2", existing, "16M"]);
  const ex = `<domainbackup><disks><disk name='vda'><target file='${existing}'/></disk><disk name='vdb' backup='no'/></disks></domainbackup>`;
  t.match((await jm.begin(d.domain, ex, undefined))._unsafeUnwrapErr(), { code: "target-exists" });
  t.match((await jm.begin(d.domain, "<domainbackup><incremental>nope</incremental></domainbackup>", undefined))._unsafeUnwrapErr(), {
    code: "not-found",
    message: /'nope'/,
  });
  t.match((await jm.begin(d.domain, "<domainbackup><disks><disk name='vdz'/></disks></domainbackup>", undefined))._unsafeUnwrapErr(), {
    code: "unknown-disk",
  });
  // reuse: the caller's file is used and kept
  (await jm.begin(d.domain, ex, undefined, { reuseExternal: true }))._unsafeUnwrap();
  t.equal((await jm.wait("vm1", 30_000))._unsafeUnwrap().state, "ready");
  t.ok(await rangeHolds(existing, "qcow2", 0x51, 0, MiB));
  t.ok(await rangeHolds(existing, "qcow2", 0x51, 6 * MiB, MiB));
  t.same(await leftovers(d.client), []);
});

t.test("incremental from an invalid checkpoint is refused", async (t) => {
  const d = await testDomain(t, "vm1", DISKS);
  const jm = jobManager(d.backupDir);
  (await d.checkpoints.create(d.client, "<domaincheckpoint><name>k1</name></domaincheckpoint>"))._unsafeUnwrap();
  (await d.vm.monitor.execute("block-dirty-bitmap-remove", { node: d.vm.disks[1]!.node, name: "k1" }))._unsafeUnwrap();
  const e = (await jm.begin(d.domain, "<domainbackup><incremental>k1</incremental></domainbackup>", undefined))._unsafeUnwrapErr();
  t.match(e, { code: "checkpoint-invalid", message: /bitmap 'k1' on disk 'vdb' is missing/ });
  t.same(readdirSync(join(d.backupDir, "vm1")), [], "nothing created");
});

t.test("a target that fills up fails the whole backup, cleans up, and another domain keeps backing up", async (t) => {
  // a 3 MiB filesystem for 16 MiB disks holding 8 MiB (root only: CI runs as root)
  const base = mkdtempSync(join(tmpdir(), "qbk-tiny-"));
  await execFileP("mount", ["-t", "tmpfs", "-o", "size=3m", "tmpfs", base]);
  t.teardown(async () => {
    await execFileP("umount", ["-l", base]).catch(() => {});
    rmSync(base, { recursive: true, force: true });
  });
  const bad = await testDomain(t, "vmbad", DISKS, base);
  const good = await testDomain(t, "vmgood", DISKS);
  await bad.vm.write(0, 0x61, 0, 8 * MiB);
  await good.vm.write(0, 0x71, 0, 8 * MiB);
  const jmBad = jobManager(bad.backupDir);
  const jmGood = jobManager(good.backupDir);
  (await jmBad.begin(bad.domain, undefined, "<domaincheckpoint><name>b1</name></domaincheckpoint>"))._unsafeUnwrap();
  (await jmGood.begin(good.domain, undefined, undefined))._unsafeUnwrap();
  const [rb, rg] = await Promise.all([jmBad.wait("vmbad", 30_000), jmGood.wait("vmgood", 30_000)]);
  const b = rb._unsafeUnwrap();
  t.equal(b.state, "failed");
  t.match(b.error, /No space left on device|ENOSPC/);
  t.equal(bad.checkpoints.store.get("b1"), undefined, "no checkpoint claims the failed backup");
  t.same(await leftovers(bad.client), []);
  t.same(readdirSync(join(bad.backupDir, "vmbad")), [], "partial targets removed");
  const g = rg._unsafeUnwrap();
  t.equal(g.state, "ready");
  t.ok(await rangeHolds(g.disks[0]!.file, "qcow2", 0x71, 0, 8 * MiB));
  t.ok(existsSync(g.disks[1]!.file));
});

t.test("quiesce: the guest is frozen around the backup's transaction and thawed after", async (t) => {
  const { startFakeAgent } = await import("../helpers/fake-agent.js");
  const agent = await startFakeAgent(t);
  const d = await testDomain(t, "vm1", DISKS);
  const jm = jobManager(d.backupDir);
  const domain = { ...d.domain, name: d.domain.name, client: d.domain.client, agentPath: agent.path };
  (await jm.begin(domain, undefined, "<domaincheckpoint><name>q</name></domaincheckpoint>", { quiesce: true }))._unsafeUnwrap();
  t.same(agent.log, ["guest-sync-delimited", "guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]);
  t.equal(agent.state, "thawed");
  t.equal((await jm.wait("vm1", 30_000))._unsafeUnwrap().state, "ready");
  // freeze refused: nothing is started, nothing left
  agent.failFreeze = "guest-fsfreeze-freeze not supported";
  const e = (
    await jm.begin(domain, undefined, "<domaincheckpoint><name>q2</name></domaincheckpoint>", { quiesce: true })
  )._unsafeUnwrapErr();
  t.match(e, { code: "agent", message: /cannot quiesce the guest: guest-fsfreeze-freeze: guest-fsfreeze-freeze not supported/ });
  t.equal(d.checkpoints.store.get("q2"), undefined);
  t.same(await leftovers(d.client), []);
  t.same(readdirSync(join(d.backupDir, "vm1")).length, 2, "only the first backup's targets remain");
});

t.test("raw targets: formatted by QEMU (blockdev-create), 0600, byte-exact; qcow2 ones get the source's cluster size", async (t) => {
  const d = await testDomain(t, "vm1", [{ size: "16M" }, { size: "16M", clusterSize: 131072 }]);
  const jm = jobManager(d.backupDir);
  await d.vm.write(0, 0x71, 3 * MiB, 2 * MiB);
  await d.vm.write(1, 0x72, 0, MiB);
  const xml = `<domainbackup><disks>
    <disk name='vda'><driver type='raw'/></disk>
    <disk name='vdb'/>
  </disks></domainbackup>`;
  (await jm.begin(d.domain, xml, undefined))._unsafeUnwrap();
  const done = (await jm.wait("vm1", 30_000))._unsafeUnwrap();
  t.equal(done.state, "ready", done.error ?? "");
  const [ra, qb] = done.disks.map((x) => x.file);
  const infoA = JSON.parse((await execFileP("qemu-img", ["info", "--output=json", ra!])).stdout) as {
    format: string;
    "virtual-size": number;
  };
  t.match(infoA, { format: "raw", "virtual-size": 16 * MiB });
  const infoB = JSON.parse((await execFileP("qemu-img", ["info", "--output=json", qb!])).stdout) as {
    format: string;
    "cluster-size": number;
  };
  t.match(infoB, { format: "qcow2", "cluster-size": 131072 }, "the source's cluster size");
  const { stat } = await import("node:fs/promises");
  for (const f of [ra!, qb!]) t.equal((await stat(f)).mode & 0o777, 0o600, `${f} is 0600`);
  t.ok(await rangeHolds(ra!, "raw", 0x71, 3 * MiB, 2 * MiB));
  t.ok(await rangeHolds(ra!, "raw", 0, 0, 3 * MiB));
  t.ok(await rangeHolds(qb!, "qcow2", 0x72, 0, MiB));
  t.same(await leftovers(d.client), [], "no create job or node left");
});

t.test("an image QEMU cannot format: clear error, the file removed, nothing left in QEMU", async (t) => {
  const d = await testDomain(t, "vm1", DISKS);
  const { imageCreate } = await import("../../src/jobs/images.js");
  const path = join(d.backupDir, "bad.qcow2");
  const r = await imageCreate(d.client, { path, format: "qcow2", size: 16 * MiB, clusterSize: 1000, jobId: "qbk-c9" });
  t.match(r._unsafeUnwrapErr(), { code: "image", message: new RegExp(`cannot create ${path}: .*[Cc]luster size`) });
  t.notOk(existsSync(path), "file removed");
  t.same(await leftovers(d.client), []);
  const taken = await imageCreate(d.client, { path: d.vm.disks[0]!.path, format: "qcow2", size: 16 * MiB, jobId: "qbk-c9" });
  t.match(taken._unsafeUnwrapErr(), { code: "image", message: /EEXIST/ }, "an existing file is never formatted over");
});

t.test("one disk's target cannot be opened: the others' nodes and files, added at the same time, are undone", async (t) => {
  const d = await testDomain(t, "vm1", DISKS);
  const jm = jobManager(d.backupDir);
  const garbage = join(d.backupDir, "not-an-image.qcow2");
  writeFileSync(garbage, "this is not a qcow2 image\n");
  const xml = `<domainbackup><disks><disk name='vda'/><disk name='vdb'><target file='${garbage}'/></disk></disks></domainbackup>`;
  const e = (
    await jm.begin(d.domain, xml, "<domaincheckpoint><name>z1</name></domaincheckpoint>", { reuseExternal: true })
  )._unsafeUnwrapErr();
  t.match(e, { code: "job-failed", message: /cannot open .*not-an-image\.qcow2 for disk 'vdb'/ });
  t.same(await leftovers(d.client), [], "vda's node removed too");
  t.same(readdirSync(join(d.backupDir, "vm1")), [], "vda's new target removed");
  t.equal(readFileSync(garbage, "utf8"), "this is not a qcow2 image\n", "the caller's file is kept as it was");
  t.equal(d.checkpoints.store.get("z1"), undefined);
});
