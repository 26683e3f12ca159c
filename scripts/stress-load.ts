/**
 * Load with a restart: N VMs (default 20) back up at once, push: a quarter full,
 * a quarter incremental, a quarter incremental of raw disks (volatile bitmaps),
 * a quarter incremental of VMs shut down (offline, through a storage daemon);
 * the daemon is killed (-9) and restarted mid-way.
 *   node --import tsx scripts/stress-load.ts [--vms 20]
 */
import { parseArgs } from "node:util";
import { stress } from "./lib/stress.js";
import { Cleanup } from "./lib/teardown.js";

const { values } = parseArgs({ options: { vms: { type: "string", default: "20" } } });
const cleanup = new Cleanup();
try {
  const r = await stress(cleanup, Number(values.vms), (s) => console.log(`• ${s}`));
  console.log(`${r.vms} VMs, push (${JSON.stringify(r.kinds)}), daemon killed and restarted mid-way:`);
  console.log(`  wall time from begin to all ready: ${(r.wallMs / 1000).toFixed(1)} s`);
  console.log(`  daemon CPU: ${(r.daemonCpuMs / 1000).toFixed(2)} s; peak RSS: ${r.peakRssMiB.toFixed(1)} MiB`);
  console.log(r.failures.length === 0 ? "  every backup byte-exact, no leftovers" : `  FAILURES:\n  ${r.failures.join("\n  ")}`);
  if (r.failures.length > 0) process.exitCode = 1;
} finally {
  await cleanup.run();
}
