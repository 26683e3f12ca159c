/** Checkpoints against real QEMU: sizes, deletion keeping incrementals exact, reload, invalid bitmaps, quiesce. */
import { appendFileSync, readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { CheckpointManager } from "../../src/checkpoints/manager.js";
import { CheckpointStore } from "../../src/checkpoints/store.js";
import { descendants, leaves, renderTree, roots, topological } from "../../src/checkpoints/tree.js";
import { QmpClient } from "../../src/qmp/index.js";
import { allocatedRanges, handBackups, rebaseOnto } from "../helpers/backup.js";
import { startFakeAgent } from "../helpers/fake-agent.js";
import { imagesIdentical, silentLogger, startVm, type Teardown, tempDir } from "../helpers/qemu.js";

const KiB = 1024;
const MiB = 1024 * KiB;

async function setup(
  t: Teardown & { teardown(fn: () => unknown): void },
  opts: { disks?: number; agentPath?: string; stateDir?: string } = {},
) {
  const vm = await startVm(t, { disks: Array.from({ length: opts.disks ?? 1 }, () => ({ size: "32M" })) });
  const client = (await QmpClient.connect({ path: vm.qmpPath }, { logger: silentLogger }))._unsafeUnwrap();
  t.teardown(() => client.close());
  const stateDir = opts.stateDir ?? tempDir(t);
  const store = (await CheckpointStore.open(stateDir, "vm1", silentLogger))._unsafeUnwrap();
  let clock = 1_700_000_000;
  const mgr = new CheckpointManager(store, { logger: silentLogger, agentPath: opts.agentPath, now: () => clock++ });
  return { vm, client, store, mgr, stateDir };
}

const cp = (name: string) => `<domaincheckpoint><name>${name}</name></domaincheckpoint>`;

t.test("three checkpoints: sizes track writes; deleting the middle keeps the first's incremental exact", async (t) => {
  const { vm, client, mgr, store } = await setup(t, { disks: 2 });
  const [vda, vdb] = vm.disks;
  await vm.write(0, 0x11, 0, MiB);
  await vm.write(1, 0x21, 0, MiB);
  (await mgr.create(client, cp("c1")))._unsafeUnwrap();
  // the full backup at c1's point in time (nothing was written since c1)
  const full = join(vm.dir, "full-vda.qcow2");
  await handBackups(client, "32M", [{ node: vda!.node, target: full, sync: "full" }]);

  await vm.write(0, 0x12, MiB, 256 * KiB); // 256K
  (await mgr.create(client, cp("c2")))._unsafeUnwrap();
  await vm.write(0, 0x13, 4 * MiB, 64 * KiB); // 64K
  await vm.write(0, 0x14, 8 * MiB + 100, 10); // 10 bytes → one 64K cluster
  await vm.write(1, 0x22, 2 * MiB, 64 * KiB);
  (await mgr.create(client, cp("c3")))._unsafeUnwrap();
  await vm.write(0, 0x15, 2 * MiB, 128 * KiB); // 128K

  t.same(
    store.list().map((c) => [c.name, c.parent]),
    [
      ["c1", undefined],
      ["c2", "c1"],
      ["c3", "c2"],
    ],
  );
  t.equal(store.current, "c3");
  const size = async (name: string) =>
    Object.fromEntries((await mgr.sizes(client, store.get(name)!))._unsafeUnwrap().disks.map((d) => [d.name, d.size]));
  t.same(await size("c1"), { vda: 512 * KiB, vdb: 64 * KiB }, "c1: everything written since c1, rounded to 64K");
  t.same(await size("c2"), { vda: 256 * KiB, vdb: 64 * KiB });
  t.same(await size("c3"), { vda: 128 * KiB, vdb: 0 });
  const xml = (await mgr.xml(client, "c2", { size: true }))._unsafeUnwrap();
  t.match(xml, /<disk name='vda' checkpoint='bitmap' bitmap='c2' size='262144'\/>/);

  // delete the middle one
  t.same((await mgr.delete(client, "c2"))._unsafeUnwrap(), ["c2"]);
  t.equal(store.get("c3")?.parent, "c1", "c3 re-parented to c1");
  const left = (await client.execute("query-block"))
    ._unsafeUnwrap()[0]!
    .inserted!["dirty-bitmaps"]!.map((b) => b.name)
    .sort();
  t.same(left, ["c1", "c3"], "c2's bitmap is gone from QEMU");

  // incremental since c1, and a full of now, at the same point in time
  const inc = join(vm.dir, "inc-vda.qcow2");
  const now = join(vm.dir, "now-vda.qcow2");
  await handBackups(client, "32M", [
    { node: vda!.node, target: inc, sync: "incremental", since: ["c1"] },
    { node: vda!.node, target: now, sync: "full" },
  ]);
  t.same(
    await allocatedRanges(inc),
    [
      [MiB, 256 * KiB],
      [2 * MiB, 128 * KiB],
      [4 * MiB, 64 * KiB],
      [8 * MiB, 64 * KiB],
    ],
    "the incremental holds exactly the dirty clusters",
  );
  await rebaseOnto(inc, full);
  const cmp = await imagesIdentical(inc, now);
  t.ok(cmp.identical, `full(c1) + incremental(c1) equals the disk now: ${cmp.output}`);
  // and it is not trivially so: the full alone differs
  t.notOk((await imagesIdentical(full, now)).identical, "the full alone differs from now");
  void vdb;
});

t.test("delete with children, children-only, metadata-only", async (t) => {
  const { client, mgr, store } = await setup(t);
  for (const n of ["a", "b", "c", "d"]) (await mgr.create(client, cp(n)))._unsafeUnwrap();
  // a → b → c → d ; delete b's children only
  t.same((await mgr.delete(client, "b", { childrenOnly: true }))._unsafeUnwrap(), ["c", "d"]);
  t.same(
    store.list().map((c) => c.name),
    ["a", "b"],
  );
  t.equal(store.current, "b", "current moves to the surviving ancestor");
  (await mgr.create(client, cp("e")))._unsafeUnwrap();
  t.same((await mgr.delete(client, "b", { children: true }))._unsafeUnwrap(), ["b", "e"]);
  t.equal(store.current, "a");
  (await mgr.delete(client, "a", { metadataOnly: true }))._unsafeUnwrap();
  t.equal(store.size, 0);
  const bitmaps = (await client.execute("query-block"))._unsafeUnwrap()[0]!.inserted!["dirty-bitmaps"]!.map((b) => b.name);
  t.same(bitmaps, ["a"], "metadata-only leaves the bitmap in QEMU");
  const a = (await mgr.reconcile(client))._unsafeUnwrap();
  t.same(a.unclaimed, [{ disk: "vda", bitmap: "a", persistent: true }], "and it is reported as unclaimed");
  t.match((await mgr.delete(client, "zz"))._unsafeUnwrapErr(), { code: "not-found" });
});

t.test("bad requests are refused before QEMU is touched", async (t) => {
  const { client, mgr } = await setup(t);
  (await mgr.create(client, cp("x")))._unsafeUnwrap();
  t.match((await mgr.create(client, cp("x")))._unsafeUnwrapErr(), { code: "duplicate", message: /'x' already exists/ });
  t.match((await mgr.create(client, cp(".hidden")))._unsafeUnwrapErr(), { code: "invalid-name", message: /must not start with '\.'/ });
  t.match((await mgr.create(client, "<domaincheckpoint><disks><disk name='vdq'/></disks></domaincheckpoint>"))._unsafeUnwrapErr(), {
    code: "unknown-disk",
    message: /vdq/,
  });
  t.match((await mgr.create(client, "<domaincheckpoint>"))._unsafeUnwrapErr(), { code: "xml-malformed" });
});

t.test("a raw disk holds a volatile checkpoint bitmap; other formats none", async (t) => {
  const vm = await startVm(t, { disks: [{ size: "16M" }, { size: "16M", format: "raw" }] });
  const client = (await QmpClient.connect({ path: vm.qmpPath }, { logger: silentLogger }))._unsafeUnwrap();
  t.teardown(() => client.close());
  const store = (await CheckpointStore.open(tempDir(t), "vm1", silentLogger))._unsafeUnwrap();
  const mgr = new CheckpointManager(store, { logger: silentLogger });
  const only = (
    await mgr.create(client, "<domaincheckpoint><name>r</name><disks><disk name='vdb'/></disks></domaincheckpoint>")
  )._unsafeUnwrap();
  t.same(only.disks, [
    { name: "vdb", checkpoint: "bitmap", bitmap: "r", volatile: true },
    { name: "vda", checkpoint: "no" },
  ]);
  const def = (await mgr.create(client, undefined))._unsafeUnwrap();
  t.same(def.disks, [
    { name: "vda", checkpoint: "bitmap", bitmap: def.name },
    { name: "vdb", checkpoint: "bitmap", bitmap: def.name, volatile: true },
  ]);
  t.match(def.name, /^\d+$/, "name defaults to the Unix time");
  const nodes = (await client.execute("query-named-block-nodes", { flat: true }))._unsafeUnwrap();
  const vdb = nodes.find((n) => n["node-name"] === vm.disks[1]!.node)?.["dirty-bitmaps"] ?? [];
  t.same(
    vdb
      .filter((b) => !b.name?.startsWith("qbk-live-"))
      .map((b) => [b.name, b.persistent])
      .sort(),
    [
      [def.name, false],
      ["r", false],
    ],
    "non-persistent in QEMU",
  );
  t.same(
    vdb.filter((b) => b.name?.startsWith("qbk-live-")).map((b) => [b.persistent, b.recording, b.count]),
    [
      [false, false, 0],
      [false, false, 0],
    ],
    "each with its live marker: volatile, empty, not recording",
  );
  t.same((await mgr.reconcile(client))._unsafeUnwrap().unclaimed, [], "the markers are claimed by their checkpoints");
  t.same((await mgr.reconcile(client))._unsafeUnwrap().problems.get("r"), [], "valid while that QEMU lives");
});

t.test("a new store on the same directory reloads the tree; a corrupt file is skipped", async (t) => {
  const { client, mgr, stateDir } = await setup(t);
  for (const n of ["r1", "r2", "r3"]) (await mgr.create(client, cp(n)))._unsafeUnwrap();
  const dir = join(stateDir, "checkpoint", "vm1");
  t.same(readdirSync(dir).sort(), [".bitmaps.json", ".current", "r1.xml", "r2.xml", "r3.xml"]);
  // truncate r2 (as a crash without our atomic writes would) and add garbage
  const r2 = join(dir, "r2.xml");
  writeFileSync(r2, "<domaincheckpoint><name>r2</na");
  writeFileSync(join(dir, "junk.xml"), "not xml at all");
  appendFileSync(join(dir, ".tmp-r4.xml.abc"), "half a write");
  const again = (await CheckpointStore.open(stateDir, "vm1", silentLogger))._unsafeUnwrap();
  t.same(
    again.list().map((c) => c.name),
    ["r1", "r3"],
  );
  t.equal(again.current, "r3");
  t.same(again.loadReport.skipped.map((s) => s.file).sort(), [join(dir, "junk.xml"), r2]);
  t.match(again.loadReport.problems, [/'r3' names parent 'r2', which does not exist/]);
  t.notOk(
    readdirSync(dir).some((f) => f.startsWith(".tmp-")),
    "temp file of an interrupted write removed",
  );
});

t.test("bitmap removed behind our back, or inconsistent after a QEMU crash: checkpoint invalid, incremental refused", async (t) => {
  const { vm, client, mgr, store } = await setup(t);
  (await mgr.create(client, cp("good")))._unsafeUnwrap();
  (await mgr.create(client, cp("gone")))._unsafeUnwrap();
  (await vm.monitor.execute("block-dirty-bitmap-remove", { node: vm.disks[0]!.node, name: "gone" }))._unsafeUnwrap();
  const a = (await mgr.reconcile(client))._unsafeUnwrap();
  t.same(a.problems.get("good"), []);
  t.same(a.problems.get("gone"), ["bitmap 'gone' on disk 'vda' is missing"]);
  t.same(mgr.problemsOf("gone"), ["bitmap 'gone' on disk 'vda' is missing"]);
  const refused = (await mgr.requireValid(client, "gone"))._unsafeUnwrapErr();
  t.match(refused, { code: "checkpoint-invalid", message: /checkpoint 'gone' cannot be used: bitmap 'gone' on disk 'vda' is missing/ });
  t.ok((await mgr.requireValid(client, "good")).isOk());

  // Persistent bitmaps reach the qcow2 file when QEMU closes the image. A
  // clean restart keeps them; a crash afterwards leaves them marked in-use,
  // and the next QEMU loads them as inconsistent.
  const images = vm.disks.map((d) => d.path);
  await client.close();
  (await vm.monitor.execute("quit"))._unsafeUnwrap();
  await vm.exited;
  const vm2 = await startVm(t, { images, dir: vm.dir });
  const c2 = (await QmpClient.connect({ path: vm2.qmpPath }, { logger: silentLogger }))._unsafeUnwrap();
  t.same((await mgr.reconcile(c2))._unsafeUnwrap().problems.get("good"), [], "valid after a clean restart");
  (await mgr.create(c2, cp("unsaved")))._unsafeUnwrap();
  await vm2.write(0, 0x5a, 0, 64 * KiB);
  await c2.close();
  await vm2.kill("SIGKILL");
  const vm3 = await startVm(t, { images, dir: vm.dir });
  const c3 = (await QmpClient.connect({ path: vm3.qmpPath }, { logger: silentLogger }))._unsafeUnwrap();
  t.teardown(() => c3.close());
  const b = (await mgr.reconcile(c3))._unsafeUnwrap();
  t.match(b.problems.get("good"), [/bitmap 'good' on disk 'vda' is inconsistent/]);
  t.match(
    b.problems.get("unsaved"),
    [/bitmap 'unsaved' on disk 'vda' is missing/],
    "a bitmap never written to the image is lost in a crash",
  );
  t.match((await mgr.requireValid(c3, "good"))._unsafeUnwrapErr(), { code: "checkpoint-invalid", message: /inconsistent/ });
  // a new checkpoint starts a valid chain again
  (await mgr.create(c3, cp("fresh")))._unsafeUnwrap();
  t.ok((await mgr.requireValid(c3, "fresh")).isOk());
  t.equal(store.current, "fresh");
});

t.test("redefine restores metadata and names missing bitmaps", async (t) => {
  const { client, mgr, store, vm } = await setup(t);
  (await mgr.create(client, cp("base")))._unsafeUnwrap();
  const xml = (await mgr.xml(client, "base"))._unsafeUnwrap();
  (await mgr.delete(client, "base", { metadataOnly: true }))._unsafeUnwrap();
  t.equal(store.size, 0);
  const back = (await mgr.redefine(client, xml))._unsafeUnwrap();
  t.equal(back.name, "base");
  t.equal(store.current, "base");
  t.equal((await mgr.xml(client, "base"))._unsafeUnwrap(), xml, "same XML as before");
  const missing = xml.replace(/base/g, "other");
  const e = (await mgr.redefine(client, missing))._unsafeUnwrapErr();
  t.match(e, { code: "bitmap-missing", message: /bitmap 'other' on disk 'vda'/ });
  t.match(
    (await mgr.redefine(client, xml.replace("<name>base</name>", "<name>kid</name><parent><name>nope</name></parent>")))._unsafeUnwrapErr(),
    {
      code: "not-found",
      message: /parent checkpoint 'nope'/,
    },
  );
  void vm;
});

t.test("quiesce: freeze before the transaction, thaw after, thaw also when it fails", async (t) => {
  const agent = await startFakeAgent(t);
  const { client, mgr, vm, store } = await setup(t, { agentPath: agent.path });
  (await mgr.create(client, cp("q1"), { quiesce: true }))._unsafeUnwrap();
  t.same(agent.log, ["guest-sync-delimited", "guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]);
  t.equal(agent.state, "thawed");
  // make the transaction fail: a conflicting bitmap appears while the guest is frozen
  agent.log.length = 0;
  agent.onFreeze = async () => {
    (await vm.monitor.execute("block-dirty-bitmap-add", { node: vm.disks[0]!.node, name: "q2" }))._unsafeUnwrap();
  };
  const e = (await mgr.create(client, cp("q2"), { quiesce: true }))._unsafeUnwrapErr();
  t.match(e, { code: "qmp", message: /cannot create bitmaps for checkpoint 'q2'/ });
  t.same(agent.log, ["guest-sync-delimited", "guest-fsfreeze-freeze", "guest-fsfreeze-thaw"], "thawed after the failure");
  t.equal(agent.state, "thawed");
  t.equal(store.get("q2"), undefined, "no metadata for a failed checkpoint");
  // no agent configured
  const { client: c2, mgr: noAgent } = await setup(t);
  t.match((await noAgent.create(c2, cp("q3"), { quiesce: true }))._unsafeUnwrapErr(), { code: "agent", message: /needs a guest agent/ });
});

t.test("tree queries", async (t) => {
  const mk = (name: string, parent: string | undefined, time: number) => ({
    name,
    creationTime: time,
    disks: [],
    ...(parent ? { parent } : {}),
  });
  const all = new Map(
    [mk("a", undefined, 1), mk("b", "a", 2), mk("c", "b", 3), mk("d", "a", 4), mk("e", undefined, 5), mk("f", "d", 6)].map((c) => [
      c.name,
      c,
    ]),
  );
  t.same(
    roots(all).map((c) => c.name),
    ["a", "e"],
  );
  t.same(
    leaves(all).map((c) => c.name),
    ["c", "e", "f"],
  );
  t.same(
    descendants(all, "a", false).map((c) => c.name),
    ["b", "d"],
  );
  t.same(
    descendants(all, "a", true).map((c) => c.name),
    ["b", "c", "d", "f"],
  );
  t.same(
    topological(all).map((c) => c.name),
    ["a", "b", "c", "d", "f", "e"],
  );
  t.equal(renderTree(all), "a\n├─ b\n│  └─ c\n└─ d\n   └─ f\ne\n");
});
