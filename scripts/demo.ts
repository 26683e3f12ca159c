/**
 * `npm run demo`: a short tour on real QEMU. Starts a throwaway VM with two
 * disks, connects the QMP client, probes capabilities, lists the disks and
 * their dirty bitmaps (adding one and writing through the guest device so
 * the count moves), then stops the VM and removes everything.
 */
import { discoverDisks, formatVersion, probeCapabilities, QmpClient, qmpErrorMessage } from "../src/qmp/index.js";
import { silentLogger, startVm } from "../test/helpers/qemu.js";
import { Cleanup } from "./lib/teardown.js";

function fail(what: string, e: Parameters<typeof qmpErrorMessage>[0]): never {
  throw new Error(`${what}: ${qmpErrorMessage(e)}`);
}

async function demo(c: Cleanup): Promise<void> {
  console.log("• starting a throwaway VM (qemu-system-x86_64 -S, no guest OS) with disks vda (64 MiB) and vdb (32 MiB)…");
  const vm = await startVm(c, { disks: [{ size: "64M" }, { size: "32M" }] });
  const client = (await QmpClient.connect({ path: vm.qmpPath }, { logger: silentLogger })).match(
    (x) => x,
    (e) => fail("connect", e),
  );
  c.teardown(() => client.close());
  const caps = (await probeCapabilities(client)).match(
    (x) => x,
    (e) => fail("probe", e),
  );
  console.log(`• connected over QMP to QEMU ${formatVersion(caps.version)} (${caps.package})`);
  console.log(
    `  x-perf for blockdev-backup: ${caps.backupPerf ? "yes" : "no"}; bitmap 'inconsistent' flag: ${caps.bitmapInconsistent ? "yes" : "no"}`,
  );

  const node = vm.disks[0]!.node;
  (await client.execute("block-dirty-bitmap-add", { node, name: "demo-checkpoint", persistent: true })).match(
    () => undefined,
    (e) => fail("bitmap add", e),
  );
  console.log("• added persistent dirty bitmap 'demo-checkpoint' on vda; writing 1 MiB at 4 MiB through the guest device…");
  await vm.write(0, 0xab, 4 << 20, 1 << 20);

  const disks = (await discoverDisks(client)).match(
    (x) => x,
    (e) => fail("discover", e),
  );
  console.log("• disks:");
  for (const d of disks) {
    console.log(`  ${d.name}: node ${d.nodeName}, ${d.format}, ${d.virtualSize >> 20} MiB, ${d.file}`);
    for (const b of d.bitmaps) {
      console.log(
        `    bitmap ${b.name}: ${b.count} dirty bytes, granularity ${b.granularity}, persistent=${b.persistent} recording=${b.recording} inconsistent=${b.inconsistent}`,
      );
    }
    if (d.bitmaps.length === 0) console.log("    (no bitmaps)");
  }
  (await client.execute("quit")).match(
    () => undefined,
    () => undefined,
  );
  await vm.exited;
  console.log("• VM stopped; cleaning up.");
}

const cleanup = new Cleanup();
try {
  await demo(cleanup);
  await cleanup.run();
  console.log("demo finished");
} catch (e) {
  await cleanup.run();
  console.error(`demo failed: ${(e as Error).message}`);
  process.exitCode = 1;
}
