/**
 * Checkpoint bitmaps changed behind the daemon's back, on real QEMU: the
 * test tampers through its own monitor (remove and re-add, clear,
 * disable/enable) as another QMP client would, and the checkpoint must
 * show invalid and refuse to be the base of an incremental, with the
 * reason, even once the bitmap looks healthy again; and normal use must
 * never be refused.
 */
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { CheckpointManager } from "../../src/checkpoints/manager.js";
import { CheckpointStore } from "../../src/checkpoints/store.js";
import { ApiClient } from "../../src/cli/client.js";
import { QmpClient } from "../../src/qmp/index.js";
import { handBackups } from "../helpers/backup.js";
import { startDaemon } from "../helpers/daemon.js";
import { jobManager, leftovers, settledBackup, testDomain } from "../helpers/domain.js";
import { createImage, type QemuProcess, silentLogger, startVm, type Teardown, tempDir } from "../helpers/qemu.js";

const KiB = 1024;
const MiB = 1024 * KiB;

async function managerOn(stateDir: string): Promise<{ store: CheckpointStore; mgr: CheckpointManager }> {
  const store = (await CheckpointStore.open(stateDir, "vm1", silentLogger))._unsafeUnwrap();
  let clock = 1_700_000_000;
  const mgr = new CheckpointManager(store, { logger: silentLogger, now: () => clock++ });
  return { store, mgr };
}

async function setup(t: Teardown, disks = 1) {
  const vm = await startVm(t, { disks: Array.from({ length: disks }, () => ({ size: "64M" })) });
  const client = (await QmpClient.connect({ path: vm.qmpPath }, { logger: silentLogger }))._unsafeUnwrap();
  t.teardown(() => client.close());
  const stateDir = tempDir(t);
  return { vm, client, stateDir, ...(await managerOn(stateDir)) };
}

const cp = (name: string) => `<domaincheckpoint><name>${name}</name></domaincheckpoint>`;

/** The test's own monitor doing what another QMP client could. */
async function tamper(vm: QemuProcess, command: string, args: Record<string, unknown>): Promise<void> {
  (await vm.monitor.execute(command as "block-dirty-bitmap-add", args as never))._unsafeUnwrap();
}

async function count(vm: QemuProcess, bitmap: string): Promise<number> {
  const blocks = (await vm.monitor.execute("query-block"))._unsafeUnwrap();
  return blocks[0]!.inserted!["dirty-bitmaps"]!.find((b) => b.name === bitmap)!.count;
}

t.test(
  "c1 removed and re-added (persistent) after a check: refused, also once the count is higher again, also after a restart",
  async (t) => {
    const { vm, client, mgr, stateDir } = await setup(t);
    const node = vm.disks[0]!.node;
    (await mgr.create(client, cp("c1")))._unsafeUnwrap();
    await vm.write(0, 0x11, 0, 8 * MiB);
    t.ok((await mgr.requireValid(client, "c1")).isOk(), "valid after 8 MiB of writes");
    await tamper(vm, "block-dirty-bitmap-remove", { node, name: "c1" });
    await tamper(vm, "block-dirty-bitmap-add", { node, name: "c1", persistent: true });
    await vm.write(0, 0x12, 16 * MiB, MiB);
    t.equal(await count(vm, "c1"), MiB, "QEMU's c1 now holds 1 MiB of the 9 written since the checkpoint");
    const e = (await mgr.requireValid(client, "c1"))._unsafeUnwrapErr();
    t.match(e, {
      code: "checkpoint-invalid",
      message:
        /checkpoint 'c1' cannot be used: bitmap 'c1' on disk 'vda' cannot be trusted: .*dirty count fell from 8388608 to 1048576 bytes/,
    });
    t.match(mgr.problemsOf("c1"), [/dirty count fell/], "the listing shows it invalid, with the reason");

    // writes push the new bitmap's count above anything seen before: still refused
    await vm.write(0, 0x13, 24 * MiB, 16 * MiB);
    t.match((await mgr.requireValid(client, "c1"))._unsafeUnwrapErr(), { code: "checkpoint-invalid", message: /dirty count fell/ });
    // a restarted daemon (new store and manager on the same state directory) remembers
    const again = await managerOn(stateDir);
    const a = (await again.mgr.reconcile(client))._unsafeUnwrap();
    t.match(a.problems.get("c1"), [/dirty count fell from 8388608 to 1048576 bytes/]);
    t.match((await again.mgr.requireValid(client, "c1"))._unsafeUnwrapErr(), { code: "checkpoint-invalid" });
    const file = JSON.parse(readFileSync(join(stateDir, "checkpoint", "vm1", ".bitmaps.json"), "utf8"));
    t.match(file.checkpoints.c1.disks.vda, { bitmap: "c1", taint: { reason: /dirty count fell/ } }, "the evidence is on disk");
    // a new checkpoint starts a valid chain
    (await mgr.create(client, cp("c2")))._unsafeUnwrap();
    t.ok((await mgr.requireValid(client, "c2")).isOk());
  },
);

t.test("c1 seen missing, then re-added and written above its old count: refused", async (t) => {
  const { vm, client, mgr } = await setup(t);
  const node = vm.disks[0]!.node;
  (await mgr.create(client, cp("c1")))._unsafeUnwrap();
  await vm.write(0, 0x11, 0, MiB);
  (await mgr.reconcile(client))._unsafeUnwrap();
  await tamper(vm, "block-dirty-bitmap-remove", { node, name: "c1" });
  t.match((await mgr.reconcile(client))._unsafeUnwrap().problems.get("c1"), [/is missing/]);
  await tamper(vm, "block-dirty-bitmap-add", { node, name: "c1", persistent: true });
  await vm.write(0, 0x12, 8 * MiB, 4 * MiB);
  t.match((await mgr.requireValid(client, "c1"))._unsafeUnwrapErr(), {
    code: "checkpoint-invalid",
    message: /cannot be trusted: it was missing/,
  });
});

t.test("c1 re-added with another granularity and written above its old count: refused", async (t) => {
  const { vm, client, mgr } = await setup(t);
  const node = vm.disks[0]!.node;
  (await mgr.create(client, cp("c1")))._unsafeUnwrap();
  await vm.write(0, 0x11, 0, MiB);
  (await mgr.reconcile(client))._unsafeUnwrap();
  await tamper(vm, "block-dirty-bitmap-remove", { node, name: "c1" });
  await tamper(vm, "block-dirty-bitmap-add", { node, name: "c1", persistent: true, granularity: 128 * KiB });
  await vm.write(0, 0x12, 8 * MiB, 4 * MiB);
  t.match((await mgr.requireValid(client, "c1"))._unsafeUnwrapErr(), {
    code: "checkpoint-invalid",
    message: /granularity changed from 65536 to 131072 bytes/,
  });
});

t.test("the disk shrunk (block_resize) after a check, then grown back: refused for good", async (t) => {
  // the cut part's bits are dropped, and the part grown back reads zeros without a bit in any bitmap: an
  // incremental would restore the full backup's old data there. With no dirty bit beyond the new end, the
  // count does not fall: only the size seen shrinking tells.
  const { vm, client, mgr } = await setup(t);
  const node = vm.disks[0]!.node;
  await vm.write(0, 0x21, 40 * MiB, MiB); // before c1: in the full backup, in no bitmap
  (await mgr.create(client, cp("c1")))._unsafeUnwrap();
  await vm.write(0, 0x22, MiB, 64 * KiB);
  t.ok((await mgr.requireValid(client, "c1")).isOk(), "valid after a write");
  await tamper(vm, "block_resize", { "node-name": node, size: 32 * MiB });
  t.match((await mgr.reconcile(client))._unsafeUnwrap().problems.get("c1"), [
    /cannot be trusted: the disk shrank from 67108864 to 33554432 bytes/,
  ]);
  await tamper(vm, "block_resize", { "node-name": node, size: 64 * MiB });
  t.equal(await count(vm, "c1"), 64 * KiB, "QEMU's c1 looks as before");
  t.match((await mgr.requireValid(client, "c1"))._unsafeUnwrapErr(), { code: "checkpoint-invalid", message: /the disk shrank/ });
});

t.test("block-dirty-bitmap-clear c2 after a check: refused; c1 stays valid", async (t) => {
  const { vm, client, mgr } = await setup(t);
  const node = vm.disks[0]!.node;
  (await mgr.create(client, cp("c1")))._unsafeUnwrap();
  await vm.write(0, 0x11, 0, 4 * MiB);
  (await mgr.create(client, cp("c2")))._unsafeUnwrap();
  await vm.write(0, 0x12, 8 * MiB, 6 * MiB);
  t.equal(mgr.problemsOf("c2")?.length ?? 0, 0);
  t.same((await mgr.reconcile(client))._unsafeUnwrap().problems.get("c2"), [], "a listing: c2 valid, 6 MiB dirty");
  await tamper(vm, "block-dirty-bitmap-clear", { node, name: "c2" });
  await vm.write(0, 0x13, 20 * MiB, 2 * MiB);
  t.equal(await count(vm, "c2"), 2 * MiB, "QEMU's c2 holds 2 MiB of the 8 written since it");
  t.match((await mgr.requireValid(client, "c2"))._unsafeUnwrapErr(), {
    code: "checkpoint-invalid",
    message: /bitmap 'c2' on disk 'vda' cannot be trusted: its dirty count fell from 6291456 to 2097152 bytes/,
  });
  t.ok((await mgr.requireValid(client, "c1")).isOk(), "c1's own bitmap was not touched: incrementals from c1 go on");
});

t.test("c1 disabled, written, re-enabled: refused when a newer checkpoint's bitmap saw the write", async (t) => {
  const { vm, client, mgr } = await setup(t);
  const node = vm.disks[0]!.node;
  (await mgr.create(client, cp("c1")))._unsafeUnwrap();
  await vm.write(0, 0x11, 0, MiB);
  (await mgr.create(client, cp("c2")))._unsafeUnwrap();
  await tamper(vm, "block-dirty-bitmap-disable", { node, name: "c1" });
  await vm.write(0, 0x12, 8 * MiB, 2 * MiB);
  await tamper(vm, "block-dirty-bitmap-enable", { node, name: "c1" });
  t.equal(await count(vm, "c1"), MiB, "QEMU's c1 lacks the write");
  t.match((await mgr.requireValid(client, "c1"))._unsafeUnwrapErr(), {
    code: "checkpoint-invalid",
    message: /bitmap 'c1' on disk 'vda' cannot be trusted: it has 1048576 dirty bytes .*fewer than the 2097152 of checkpoint 'c2'/,
  });
  t.ok((await mgr.requireValid(client, "c2")).isOk(), "c2 saw every write");
});

t.test("c1 disabled, seen by a check while disabled, written, re-enabled: refused for good", async (t) => {
  const { vm, client, mgr } = await setup(t);
  const node = vm.disks[0]!.node;
  (await mgr.create(client, cp("c1")))._unsafeUnwrap();
  await vm.write(0, 0x11, 0, MiB);
  await tamper(vm, "block-dirty-bitmap-disable", { node, name: "c1" });
  t.match((await mgr.reconcile(client))._unsafeUnwrap().problems.get("c1"), [/is not recording/], "a listing while it is disabled");
  await vm.write(0, 0x12, 8 * MiB, 2 * MiB);
  await tamper(vm, "block-dirty-bitmap-enable", { node, name: "c1" });
  await vm.write(0, 0x13, 16 * MiB, 4 * MiB);
  t.match((await mgr.requireValid(client, "c1"))._unsafeUnwrapErr(), {
    code: "checkpoint-invalid",
    message: /cannot be trusted: it was not recording at .*: it was disabled behind qbackupd's back/,
  });
});

t.test("normal use is never refused: checkpoints, writes, incrementals, delete, concurrent checks, daemon and QEMU restart", async (t) => {
  const { vm, client, mgr, stateDir } = await setup(t, 2);
  const [vda, vdb] = vm.disks;
  const ok = async (m: CheckpointManager, c: QmpClient, names: string[], what: string) => {
    for (const n of names) {
      const r = await m.requireValid(c, n);
      t.ok(r.isOk(), `${what}: ${n} valid${r.isErr() ? ` (${r.error.message})` : ""}`);
    }
  };
  await vm.write(0, 0x11, 0, 2 * MiB);
  (await mgr.create(client, cp("c1")))._unsafeUnwrap();
  await vm.write(0, 0x12, 4 * MiB, MiB);
  await vm.write(1, 0x21, 0, 3 * MiB);
  await ok(mgr, client, ["c1"], "after writes");
  await handBackups(client, "64M", [{ node: vda!.node, target: join(vm.dir, "inc1.qcow2"), sync: "incremental", since: ["c1"] }]);
  await ok(mgr, client, ["c1"], "after an incremental");
  // a checkpoint made as a backup job makes it: prepare, QEMU transaction, commit, with a listing racing it
  const disks = (await import("../../src/qmp/disks.js")).discoverDisks;
  const prepared = (await mgr.prepare({ name: "c2" }, (await disks(client))._unsafeUnwrap()))._unsafeUnwrap();
  const racing = mgr.reconcile(client);
  (await client.execute("transaction", { actions: prepared.actions }))._unsafeUnwrap();
  (await mgr.commit(prepared.def))._unsafeUnwrap();
  (await racing)._unsafeUnwrap();
  (await mgr.recordAfterBackup(client))._unsafeUnwrap();
  await vm.write(0, 0x13, 8 * MiB, 512 * KiB);
  await vm.write(1, 0x22, 8 * MiB, 64 * KiB);
  // checks racing checkpoint creation and more writes
  const checks = [mgr.reconcile(client), mgr.requireValid(client, "c1"), mgr.create(client, cp("c3")), mgr.reconcile(client)];
  for (const r of await Promise.all(checks)) t.ok(r.isOk(), `concurrent check: ${r.isErr() ? r.error.message : "ok"}`);
  await vm.write(0, 0x14, 12 * MiB, MiB);
  await ok(mgr, client, ["c1", "c2", "c3"], "three checkpoints");
  // delete the middle one; c1 and c3 go on
  t.same((await mgr.delete(client, "c2"))._unsafeUnwrap(), ["c2"]);
  await vm.write(1, 0x23, 16 * MiB, MiB);
  await ok(mgr, client, ["c1", "c3"], "after deleting c2");
  // a checkpoint of the same name again is a new bitmap, with no history of the old one
  (await mgr.create(client, cp("c2")))._unsafeUnwrap();
  await vm.write(0, 0x15, 20 * MiB, MiB);
  await ok(mgr, client, ["c1", "c2", "c3"], "c2 created again");
  t.same([...(await mgr.reconcile(client))._unsafeUnwrap().problems.values()].flat(), [], "a listing shows every checkpoint valid");

  // daemon restart: a new store and manager on the same state directory
  const d2 = await managerOn(stateDir);
  t.same([...(await d2.mgr.reconcile(client))._unsafeUnwrap().problems.values()].flat(), [], "valid after a daemon restart");
  await vm.write(0, 0x16, 24 * MiB, MiB);
  await ok(d2.mgr, client, ["c1", "c2", "c3"], "after a daemon restart");

  // clean QEMU restart: bitmaps are saved to the image and loaded again with their counts
  const images = vm.disks.map((d) => d.path);
  await client.close();
  (await vm.monitor.execute("quit"))._unsafeUnwrap();
  await vm.exited;
  const vm2 = await startVm(t, { images, dir: vm.dir });
  const c2 = (await QmpClient.connect({ path: vm2.qmpPath }, { logger: silentLogger }))._unsafeUnwrap();
  t.teardown(() => c2.close());
  t.same([...(await d2.mgr.reconcile(c2))._unsafeUnwrap().problems.values()].flat(), [], "valid after QEMU restarted");
  await vm2.write(0, 0x17, 28 * MiB, MiB);
  await ok(d2.mgr, c2, ["c1", "c2", "c3"], "after a QEMU restart");
  (await d2.mgr.delete(c2, "c1"))._unsafeUnwrap();
  await ok(d2.mgr, c2, ["c2", "c3"], "after deleting the oldest");
  void vdb;
});

t.test("through the job manager: c1 removed and re-added after an incremental checked it; the next incremental is refused", async (t) => {
  const d = await testDomain(t, "vm1", [{ size: "32M" }]);
  const jm = jobManager(d.backupDir);
  const node = d.vm.disks[0]!.node;
  const full = await settledBackup(jm, d, undefined, cp("c1"));
  t.equal(full.state, "ready", `full with c1: ${full.error ?? ""}`);
  await d.vm.write(0, 0x11, 0, 8 * MiB);
  const inc = await settledBackup(jm, d, "<domainbackup><incremental>c1</incremental></domainbackup>", undefined);
  t.equal(inc.state, "ready", `incremental from c1 (it checks c1: 8 MiB dirty): ${inc.error ?? ""}`);
  await tamper(d.vm, "block-dirty-bitmap-remove", { node, name: "c1" });
  await tamper(d.vm, "block-dirty-bitmap-add", { node, name: "c1", persistent: true });
  await d.vm.write(0, 0x12, 16 * MiB, MiB);
  const e = (await jm.begin(d.domain, "<domainbackup><incremental>c1</incremental></domainbackup>", undefined))._unsafeUnwrapErr();
  t.match(e, {
    code: "checkpoint-invalid",
    message: /bitmap 'c1' on disk 'vda' cannot be trusted: its dirty count fell from 8388608 to 1048576/,
  });
  t.same(await leftovers(d.client), [], "nothing started in QEMU");
});

t.test("through the daemon's API: a listing is a check, shows the reason, and the incremental is refused", async (t) => {
  const vm = await startVm(t, { disks: [{ size: "32M" }] });
  const daemon = await startDaemon(t);
  const api = new ApiClient(daemon.socket);
  const call = async (method: string, path: string, body?: unknown) => {
    const r = await api.request(method, path, body);
    if ("code" in r && !("status" in r)) throw new Error(r.message);
    return r as { status: number; body: unknown };
  };
  t.equal((await call("POST", "/v1/domains", { name: "vm1", qmp: vm.qmpPath })).status, 201);
  for (let i = 0; i < 200; i++) {
    const l = (await call("GET", "/v1/domains")).body as { state: string }[];
    if (l[0]?.state === "connected") break;
    await new Promise((r) => setTimeout(r, 50));
  }
  t.equal((await call("POST", "/v1/domains/vm1/checkpoints", { xml: cp("c1") })).status, 201);
  await vm.write(0, 0x11, 0, 4 * MiB);
  type Listed = { name: string; valid: boolean | null; problems: string[] };
  const list = async () => (await call("GET", "/v1/domains/vm1/checkpoints")).body as Listed[];
  t.match(await list(), [{ name: "c1", valid: true, problems: [] }]);
  const node = vm.disks[0]!.node;
  await tamper(vm, "block-dirty-bitmap-clear", { node, name: "c1" });
  await vm.write(0, 0x12, 8 * MiB, MiB);
  t.match(await list(), [
    { name: "c1", valid: false, problems: [/cannot be trusted: its dirty count fell from 4194304 to 1048576 bytes/] },
  ]);
  const r = await call("POST", "/v1/domains/vm1/backup", { backupXml: "<domainbackup><incremental>c1</incremental></domainbackup>" });
  t.match(r, { status: 409, body: { code: "checkpoint-invalid", message: /dirty count fell/ } });
  // a daemon restart keeps the verdict
  await daemon.stop();
  const again = await startDaemon(t, { dir: daemon.dir });
  const api2 = new ApiClient(again.socket);
  for (let i = 0; i < 200; i++) {
    const r2 = await api2.request("GET", "/v1/domains");
    if ("status" in r2 && (r2.body as { state: string }[])[0]?.state === "connected") break;
    await new Promise((r) => setTimeout(r, 50));
  }
  const r3 = await api2.request("GET", "/v1/domains/vm1/checkpoints");
  t.match(r3, { status: 200, body: [{ name: "c1", valid: false, problems: [/dirty count fell/] }] });
});

t.test("c1 cleared while the daemon is down: the reconcile on connect catches it against the evidence on disk", async (t) => {
  const { vm, client, mgr, stateDir } = await setup(t);
  const node = vm.disks[0]!.node;
  (await mgr.create(client, cp("c1")))._unsafeUnwrap();
  await vm.write(0, 0x11, 0, 3 * MiB);
  t.same((await mgr.reconcile(client))._unsafeUnwrap().problems.get("c1"), []);
  // the daemon stops; meanwhile someone clears c1 and the guest writes on
  await tamper(vm, "block-dirty-bitmap-clear", { node, name: "c1" });
  await vm.write(0, 0x12, 8 * MiB, MiB);
  const restarted = await managerOn(stateDir);
  t.match((await restarted.mgr.reconcile(client))._unsafeUnwrap().problems.get("c1"), [
    /bitmap 'c1' on disk 'vda' cannot be trusted: its dirty count fell from 3145728 to 1048576 bytes/,
  ]);
  t.match((await restarted.mgr.requireValid(client, "c1"))._unsafeUnwrapErr(), { code: "checkpoint-invalid" });
});

t.test("an unreadable evidence file is logged and rebuilt from what QEMU shows; nothing is refused for it", async (t) => {
  const { vm, client, mgr, stateDir } = await setup(t);
  (await mgr.create(client, cp("c1")))._unsafeUnwrap();
  await vm.write(0, 0x11, 0, MiB);
  const file = join(stateDir, "checkpoint", "vm1", ".bitmaps.json");
  writeFileSync(file, '{"version":1,"gen":');
  const restarted = await managerOn(stateDir);
  t.same((await restarted.mgr.reconcile(client))._unsafeUnwrap().problems.get("c1"), []);
  t.ok((await restarted.mgr.requireValid(client, "c1")).isOk());
  t.match(JSON.parse(readFileSync(file, "utf8")), { version: 1, checkpoints: { c1: { disks: { vda: { seen: { count: MiB } } } } } });
});

t.test("an external snapshot and its active commit: refused while the overlay is on top, valid again after the commit", async (t) => {
  const { vm, client, mgr } = await setup(t);
  const vda = vm.disks[0]!;
  (await mgr.create(client, cp("c1")))._unsafeUnwrap();
  await vm.write(0, 0x11, 0, MiB);
  t.ok((await mgr.requireValid(client, "c1")).isOk());
  const overlay = join(vm.dir, "overlay.qcow2");
  await createImage(overlay, "64M", "qcow2", ["-u", "-b", vda.path, "-F", "qcow2"]);
  await tamper(vm, "blockdev-add", { "node-name": "ovl", driver: "qcow2", file: { driver: "file", filename: overlay }, backing: null });
  await tamper(vm, "blockdev-snapshot", { node: vda.node, overlay: "ovl" });
  await vm.write(0, 0x12, 8 * MiB, 2 * MiB);
  t.match(
    (await mgr.reconcile(client))._unsafeUnwrap().problems.get("c1"),
    [/bitmap 'c1' on disk 'vda' is on a backing layer/],
    "overlay on top: the bitmap below, with the reason",
  );
  await tamper(vm, "block-commit", { "job-id": "cm", device: "ovl", "base-node": vda.node });
  for (let i = 0; i < 400; i++) {
    const j = (await vm.monitor.execute("query-jobs"))._unsafeUnwrap().find((x) => x.id === "cm");
    if (j === undefined) break; // completed and dismissed
    if (j.status === "ready") await tamper(vm, "job-complete", { id: "cm" });
    await new Promise((r) => setTimeout(r, 25));
  }
  t.same((await mgr.reconcile(client))._unsafeUnwrap().problems.get("c1"), [], "the base and its bitmaps are back");
  t.equal(await count(vm, "c1"), 3 * MiB, "and c1 holds the committed writes");
  t.ok((await mgr.requireValid(client, "c1")).isOk(), "incrementals from c1 go on");
});

t.test(
  "a live migration: no bitmaps on the incoming QEMU until it takes over, none on the source after; not recorded, valid after",
  async (t) => {
    const { vm, client, mgr } = await setup(t);
    (await mgr.create(client, cp("c1")))._unsafeUnwrap();
    await vm.write(0, 0x11, 0, MiB);
    t.ok((await mgr.requireValid(client, "c1")).isOk());
    // the same images (shared storage), a second QEMU waiting for the migration
    const target = await startVm(t, { images: vm.disks.map((d) => d.path), extraArgs: ["-incoming", "defer"] });
    const c2 = (await QmpClient.connect({ path: target.qmpPath }, { logger: silentLogger }))._unsafeUnwrap();
    t.teardown(() => c2.close());
    t.match((await mgr.reconcile(c2))._unsafeUnwrap().problems.get("c1"), [/is missing/], "the incoming QEMU has not loaded them yet");
    const uri = `unix:${join(target.dir, "migration.sock")}`;
    await tamper(target, "migrate-incoming", { uri });
    await tamper(vm, "migrate", { uri });
    for (let i = 0; i < 400; i++) {
      const s = (await c2.execute("query-status"))._unsafeUnwrap().status;
      if (s !== "inmigrate") break;
      await new Promise((r) => setTimeout(r, 25));
    }
    t.match((await mgr.reconcile(client))._unsafeUnwrap().problems.get("c1"), [/is missing/], "the source handed them over");
    // QEMU 10 keeps the target's images inactive (bitmaps not loaded) until the guest runs; 7.2 activates them at once
    t.ok((await mgr.reconcile(c2)).isOk(), "a check on the migrated, still paused target");
    await tamper(target, "cont", {});
    t.same((await mgr.reconcile(c2))._unsafeUnwrap().problems.get("c1"), [], "the running target has them, with their count");
    t.equal(await count(target, "c1"), MiB);
    t.ok((await mgr.requireValid(c2, "c1")).isOk(), "incrementals from c1 go on, on the target");
  },
);

t.test("c1 disabled, written, re-enabled while its count stays above c2's: the bits, not the counts, give it away", async (t) => {
  const { vm, client, mgr, store } = await setup(t);
  const node = vm.disks[0]!.node;
  (await mgr.create(client, cp("c1")))._unsafeUnwrap();
  await vm.write(0, 0x11, 0, 4 * MiB);
  (await mgr.create(client, cp("c2")))._unsafeUnwrap();
  await vm.write(0, 0x12, 8 * MiB, MiB);
  await tamper(vm, "block-dirty-bitmap-disable", { node, name: "c1" });
  await vm.write(0, 0x13, 16 * MiB, MiB);
  await tamper(vm, "block-dirty-bitmap-enable", { node, name: "c1" });
  t.same([await count(vm, "c1"), await count(vm, "c2")], [5 * MiB, 2 * MiB], "c1's count is still the larger");
  t.same((await mgr.reconcile(client))._unsafeUnwrap().problems.get("c1"), [], "a listing (counts only) cannot tell");
  t.match((await mgr.requireValid(client, "c1"))._unsafeUnwrapErr(), {
    code: "checkpoint-invalid",
    message: /bitmap 'c1' on disk 'vda' cannot be trusted: it lacks 1048576 dirty bytes .* \('c2'\) hold: it missed guest writes/,
  });
  t.match(mgr.problemsOf("c1"), [/it lacks 1048576 dirty bytes/], "and listings show it from now on");
  t.ok((await mgr.requireValid(client, "c2")).isOk(), "c2 is fine");
  const names = (await vm.monitor.execute("query-block"))._unsafeUnwrap()[0]!.inserted!["dirty-bitmaps"]!.map((b) => b.name);
  t.same(names.sort(), ["c1", "c2"], "the check's temporary bitmaps are gone");
  void store;
});
