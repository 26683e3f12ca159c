/**
 * Many VMs backing up at once (push; a mix of full and incremental) with a
 * daemon kill -9 and restart in the middle: every backup must come out
 * byte-exact, nothing may be left behind. Used by scripts/stress-load (20
 * VMs) and, in a short form, by the test suite.
 */
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { handBackups, rebaseOnto } from "../../test/helpers/backup.js";
import { cli, type RunningDaemon, startDaemon } from "../../test/helpers/daemon.js";
import { leftovers } from "../../test/helpers/domain.js";
import { imagesIdentical, type QemuProcess, startVm, type Teardown, tempDir } from "../../test/helpers/qemu.js";

const MiB = 1 << 20;

export interface StressResult {
  readonly vms: number;
  readonly wallMs: number;
  readonly daemonCpuMs: number;
  readonly peakRssMiB: number;
  readonly failures: string[];
}

function cpuMs(pid: number): number {
  try {
    const st = readFileSync(`/proc/${pid}/stat`, "utf8");
    const f = st.slice(st.lastIndexOf(")") + 2).split(" ");
    return (Number(f[11]) + Number(f[12])) * 10;
  } catch {
    return 0;
  }
}

function hwmMiB(pid: number): number {
  try {
    return Number(/VmHWM:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))?.[1] ?? 0) / 1024;
  } catch {
    return 0;
  }
}

async function json<T>(d: RunningDaemon, args: string[]): Promise<T> {
  const r = await cli(d.socket, ["--json", ...args]);
  if (r.code !== 0) throw new Error(`qbackup ${args.join(" ")}: ${r.stderr.trim()}`);
  return JSON.parse(r.stdout) as T;
}

export async function stress(t: Teardown, n: number, log: (s: string) => void = () => {}): Promise<StressResult> {
  const failures: string[] = [];
  const dir = tempDir(t, "qbackupd-stress-");
  let d = await startDaemon(t, { dir });
  const vms: QemuProcess[] = [];
  for (let i = 0; i < n; i++) vms.push(await startVm(t, { disks: [{ size: "32M" }] }));
  for (const [i, vm] of vms.entries()) {
    for (let off = 0; off < 16 * MiB; off += 2 * MiB) await vm.write(0, (i % 200) + 1, off, MiB);
    const r = await cli(d.socket, ["domain-add", `vm${i}`, "--qmp", vm.qmpPath]);
    if (r.code !== 0) throw new Error(r.stderr);
  }
  for (let k = 0; k < 400; k++) {
    const l = await json<{ state: string }[]>(d, ["domain-list"]);
    if (l.filter((x) => x.state === "connected").length === n) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  // odd VMs get a full backup with checkpoint c0 first, then writes: their stressed backup is incremental
  const fulls = new Map<number, string>();
  const cp = join(dir, "c0.xml");
  writeFileSync(cp, "<domaincheckpoint><name>c0</name></domaincheckpoint>");
  const inc = join(dir, "inc.xml");
  writeFileSync(inc, "<domainbackup><incremental>c0</incremental></domainbackup>");
  for (const [i, vm] of vms.entries()) {
    if (i % 2 === 0) continue;
    await cli(d.socket, ["backup-begin", `vm${i}`, "", cp]);
    await cli(d.socket, ["wait", `vm${i}`]);
    fulls.set(i, (await json<{ disks: { file: string }[] }>(d, ["domjobinfo", `vm${i}`, "--completed"])).disks[0]!.file);
    await vm.write(0, 0xee, 3 * MiB, 512 * 1024);
  }
  log(`${n} VMs ready (${fulls.size} with a full backup and checkpoint c0); starting ${n} backups at once`);
  const cpu0 = cpuMs(d.proc.pid!);
  const start = Date.now();
  await Promise.all(
    vms.map((_, i) =>
      cli(
        d.socket,
        i % 2 === 0
          ? ["backup-begin", `vm${i}`, "--bandwidth", String(2 * MiB)]
          : ["backup-begin", `vm${i}`, inc, "--bandwidth", String(256 * 1024)],
      ),
    ),
  );
  // snapshots at the backups' point in time: nothing writes to the disks from here on
  const snaps = vms.map((vm) => join(vm.dir, "snap.qcow2"));
  for (const [i, vm] of vms.entries()) await handBackups(vm.monitor, "32M", [{ node: vm.disks[0]!.node, target: snaps[i]!, sync: "full" }]);
  let cpu = cpuMs(d.proc.pid!) - cpu0;
  let rss = hwmMiB(d.proc.pid!);
  log("killing the daemon (-9) mid-backup and starting it again");
  await d.stop("SIGKILL");
  d = await startDaemon(t, { dir });
  const cpu1 = cpuMs(d.proc.pid!);
  const waits = await Promise.all(
    vms.map(async (_, i) => {
      for (let k = 0; k < 400; k++) {
        // domjobinfo answers "Job type: None" (exit 0, as virsh) until the restarted daemon has adopted the job
        const some = async (...args: string[]) => {
          const r = await cli(d.socket, ["--json", "domjobinfo", `vm${i}`, ...args]);
          return r.code === 0 && (JSON.parse(r.stdout) as { type?: string }).type !== "None";
        };
        if ((await some()) || (await some("--completed"))) break;
        await new Promise((res) => setTimeout(res, 50));
      }
      await new (await import("../../src/cli/client.js")).ApiClient(d.socket).request("PUT", `/v1/domains/vm${i}/backup/bandwidth`, {
        bandwidth: 0,
      });
      return cli(d.socket, ["wait", `vm${i}`, "--timeout", "120"]);
    }),
  );
  const wallMs = Date.now() - start;
  cpu += cpuMs(d.proc.pid!) - cpu1;
  rss = Math.max(rss, hwmMiB(d.proc.pid!));
  for (const [i, w] of waits.entries()) if (w.code !== 0) failures.push(`vm${i}: wait exited ${w.code}: ${w.stdout}${w.stderr}`);
  for (const [i, vm] of vms.entries()) {
    const info = await json<{ state: string; disks: { file: string }[] }>(d, ["domjobinfo", `vm${i}`, "--completed"]);
    if (info.state !== "ready") {
      failures.push(`vm${i}: ${info.state}`);
      continue;
    }
    const target = info.disks[0]!.file;
    if (fulls.has(i)) await rebaseOnto(target, fulls.get(i)!);
    const cmp = await imagesIdentical(target, snaps[i]!);
    if (!cmp.identical) failures.push(`vm${i}: ${fulls.has(i) ? "full+incremental" : "full"} differs from the disk: ${cmp.output.trim()}`);
    const left = await leftovers(vm.monitor);
    if (left.length > 0) failures.push(`vm${i}: leftovers ${left.join(", ")}`);
  }
  return { vms: n, wallMs, daemonCpuMs: cpu, peakRssMiB: rss, failures };
}
