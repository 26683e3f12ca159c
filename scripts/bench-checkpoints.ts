/**
 * Checkpoint benchmark on real QEMU: N checkpoints on one domain (default
 * 1,000): create each (bitmap transaction + durable metadata), then list,
 * tree, XML with sizes, delete the oldest, and load the store from disk.
 *   node --import tsx scripts/bench-checkpoints.ts [--count N]
 * Goals (issue 3): store load under 1 s, list under 50 ms.
 */
import { parseArgs } from "node:util";
import { CheckpointManager } from "../src/checkpoints/manager.js";
import { CheckpointStore } from "../src/checkpoints/store.js";
import { renderTree, topological } from "../src/checkpoints/tree.js";
import { QmpClient } from "../src/qmp/index.js";
import { silentLogger, startVm, tempDir } from "../test/helpers/qemu.js";
import { Cleanup } from "./lib/teardown.js";

const { values } = parseArgs({ options: { count: { type: "string", default: "1000" } } });
const N = Number(values.count);

function ms(start: bigint): number {
  return Number(process.hrtime.bigint() - start) / 1e6;
}

const cleanup = new Cleanup();
try {
  const vm = await startVm(cleanup, { disks: [{ size: "1G" }] });
  const client = (await QmpClient.connect({ path: vm.qmpPath }, { logger: silentLogger }))._unsafeUnwrap();
  cleanup.teardown(() => client.close());
  const stateDir = tempDir(cleanup, "qbackupd-bench-");
  const store = (await CheckpointStore.open(stateDir, "bench", silentLogger))._unsafeUnwrap();
  let clock = 1_700_000_000;
  const mgr = new CheckpointManager(store, { logger: silentLogger, now: () => clock++ });

  const createTimes: number[] = [];
  let s = process.hrtime.bigint();
  for (let i = 0; i < N; i++) {
    const one = process.hrtime.bigint();
    (await mgr.create(client, `<domaincheckpoint><name>cp${String(i).padStart(5, "0")}</name></domaincheckpoint>`))._unsafeUnwrap();
    createTimes.push(ms(one));
    if (i % 50 === 0) await vm.write(0, i % 256, (i * 65536) % (1 << 30), 4096);
  }
  const createAll = ms(s);
  createTimes.sort((a, b) => a - b);

  s = process.hrtime.bigint();
  const listed = store.list();
  const listMs = ms(s);
  s = process.hrtime.bigint();
  const topo = topological(store.all);
  const topoMs = ms(s);
  s = process.hrtime.bigint();
  const tree = renderTree(store.all);
  const treeMs = ms(s);
  s = process.hrtime.bigint();
  (await mgr.xml(client, "cp00000", { size: true }))._unsafeUnwrap();
  const xmlMs = ms(s);
  s = process.hrtime.bigint();
  (await mgr.delete(client, "cp00000"))._unsafeUnwrap();
  const deleteMs = ms(s);
  s = process.hrtime.bigint();
  const reloaded = (await CheckpointStore.open(stateDir, "bench", silentLogger))._unsafeUnwrap();
  const loadMs = ms(s);
  s = process.hrtime.bigint();
  (await mgr.reconcile(client))._unsafeUnwrap();
  const reconcileMs = ms(s);

  if (listed.length !== N || topo.length !== N || reloaded.size !== N - 1 || tree.split("\n").length < N)
    throw new Error("counts do not add up");
  const f = (x: number) => x.toFixed(1);
  console.log(`${N} checkpoints on one domain (1 GiB qcow2 disk, QEMU ${vm.monitor.version.qemu.major}.${vm.monitor.version.qemu.minor})`);
  console.log(
    `  create all        ${f(createAll)} ms  (per checkpoint p50 ${f(createTimes[N >> 1]!)} ms, p99 ${f(createTimes[Math.floor(N * 0.99)]!)} ms)`,
  );
  console.log(`  list (by age)     ${f(listMs)} ms   (goal < 50 ms)`);
  console.log(`  topological       ${f(topoMs)} ms`);
  console.log(`  tree rendering    ${f(treeMs)} ms`);
  console.log(`  XML with sizes    ${f(xmlMs)} ms`);
  console.log(`  delete oldest     ${f(deleteMs)} ms`);
  console.log(`  store load        ${f(loadMs)} ms   (goal < 1000 ms)`);
  console.log(`  reconcile w/ QEMU ${f(reconcileMs)} ms`);
} finally {
  await cleanup.run();
}
