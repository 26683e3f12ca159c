/**
 * Service figures: the daemon's idle RSS with 20 connected domains, and the
 * wall time of `qbackup backup-begin` (CLI start included) for a push of a
 * VM with 8 disks, median of several runs.
 *   node --import tsx scripts/bench-service.ts [--domains 20] [--disks 8] [--runs 5]
 * Goals (issue 5): RSS under 80 MiB; backup-begin under 300 ms.
 */
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";
import { cli, startDaemon } from "../test/helpers/daemon.js";
import { startVm } from "../test/helpers/qemu.js";
import { Cleanup } from "./lib/teardown.js";

const { values } = parseArgs({
  options: { domains: { type: "string", default: "20" }, disks: { type: "string", default: "8" }, runs: { type: "string", default: "5" } },
});
const N = Number(values.domains);
const DISKS = Number(values.disks);
const RUNS = Number(values.runs);

function rssMiB(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  const kb = Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? 0);
  return kb / 1024;
}

const cleanup = new Cleanup();
try {
  const d = await startDaemon(cleanup);
  const pid = d.proc.pid!;
  const baseRss = rssMiB(pid);
  const vms = [];
  for (let i = 0; i < N; i++) vms.push(await startVm(cleanup, { disks: [{ size: "64M" }] }));
  for (const [i, vm] of vms.entries()) {
    const r = await cli(d.socket, ["domain-add", `vm${i}`, "--qmp", vm.qmpPath]);
    if (r.code !== 0) throw new Error(r.stderr);
  }
  for (let k = 0; k < 200; k++) {
    const l = JSON.parse((await cli(d.socket, ["--json", "domain-list"])).stdout) as { state: string }[];
    if (l.filter((x) => x.state === "connected").length === N) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  await new Promise((r) => setTimeout(r, 2000)); // idle
  const idle = rssMiB(pid);

  const big = await startVm(cleanup, { disks: Array.from({ length: DISKS }, () => ({ size: "64M" })) });
  await cli(d.socket, ["domain-add", "big", "--qmp", big.qmpPath]);
  for (let k = 0; k < 200; k++) {
    const l = JSON.parse((await cli(d.socket, ["--json", "domain-list"])).stdout) as { name: string; state: string }[];
    if (l.find((x) => x.name === "big")?.state === "connected") break;
    await new Promise((r) => setTimeout(r, 50));
  }
  const times: number[] = [];
  for (let r = 0; r < RUNS; r++) {
    const s = process.hrtime.bigint();
    const res = await cli(d.socket, ["backup-begin", "big"]);
    times.push(Number(process.hrtime.bigint() - s) / 1e6);
    if (res.code !== 0) throw new Error(res.stderr);
    await cli(d.socket, ["wait", "big"]);
  }
  const helpTimes: number[] = [];
  for (let r = 0; r < RUNS; r++) {
    const s = process.hrtime.bigint();
    await cli(d.socket, ["domain-list"]);
    helpTimes.push(Number(process.hrtime.bigint() - s) / 1e6);
  }
  const med = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
  console.log(`daemon RSS: ${baseRss.toFixed(1)} MiB at start, ${idle.toFixed(1)} MiB idle with ${N} connected domains (goal < 80 MiB)`);
  console.log(
    `qbackup backup-begin, push of ${DISKS} disks, CLI start included: median ${med(times).toFixed(0)} ms of ${RUNS} (goal < 300 ms)`,
  );
  console.log(`  for scale: qbackup domain-list (CLI start + one request): median ${med(helpTimes).toFixed(0)} ms`);
} finally {
  await cleanup.run();
}
