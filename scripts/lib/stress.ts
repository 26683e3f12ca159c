/**
 * Many VMs backing up at once (push) with a daemon kill -9 and restart in
 * the middle: every backup must come out byte-exact, nothing may be left
 * behind. Four kinds of VM, by index modulo 4: a running qcow2 disk backed
 * up in full; a running qcow2 disk backed up incrementally; a running raw
 * disk backed up incrementally (a volatile bitmap); a qcow2 disk of a VM
 * shut down after its first full, backed up incrementally offline through a
 * qemu-storage-daemon. Used by scripts/stress-load (20 VMs) and, in a short
 * form, by the test suite.
 */
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { handBackups, rebaseOnto } from "../../test/helpers/backup.js";
import { cli, type RunningDaemon, startDaemon } from "../../test/helpers/daemon.js";
import { leftovers } from "../../test/helpers/domain.js";
import { storageDaemons } from "../../test/helpers/offline.js";
import { execFileP, imagesIdentical, type QemuProcess, startVm, type Teardown, tempDir } from "../../test/helpers/qemu.js";

const MiB = 1 << 20;

export interface StressResult {
  readonly vms: number;
  readonly wallMs: number;
  readonly daemonCpuMs: number;
  readonly peakRssMiB: number;
  readonly failures: string[];
  /** VMs of each kind. */
  readonly kinds: Readonly<Record<Kind, number>>;
}

type Kind = "full" | "incremental" | "raw-incremental" | "offline-incremental";
const KINDS: readonly Kind[] = ["full", "incremental", "raw-incremental", "offline-incremental"];

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
  const kind = (i: number): Kind => KINDS[i % 4]!;
  const vms: QemuProcess[] = [];
  for (let i = 0; i < n; i++)
    vms.push(await startVm(t, { disks: [{ size: "32M", ...(kind(i) === "raw-incremental" ? { format: "raw" as const } : {}) }] }));
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
  // all but the "full" VMs get a full backup with checkpoint c0 first, then writes: their stressed backup is incremental
  const fulls = new Map<number, string>();
  const cp = join(dir, "c0.xml");
  writeFileSync(cp, "<domaincheckpoint><name>c0</name></domaincheckpoint>");
  const inc = join(dir, "inc.xml");
  writeFileSync(inc, "<domainbackup><incremental>c0</incremental></domainbackup>");
  const offline = new Set<number>();
  for (const [i, vm] of vms.entries()) {
    if (kind(i) === "full") continue;
    await cli(d.socket, ["backup-begin", `vm${i}`, "", cp]);
    await cli(d.socket, ["wait", `vm${i}`]);
    fulls.set(i, (await json<{ disks: { file: string }[] }>(d, ["domjobinfo", `vm${i}`, "--completed"])).disks[0]!.file);
    await vm.write(0, 0xee, 3 * MiB, 512 * 1024);
    if (kind(i) === "offline-incremental") {
      // a clean shutdown: QEMU stores the persistent bitmap in the image as it closes it
      await vm.monitor.execute("quit");
      await vm.exited;
      offline.add(i);
    }
  }
  for (let k = 0; k < 400 && offline.size > 0; k++) {
    const l = await json<{ name: string; state: string }[]>(d, ["domain-list"]);
    if ([...offline].every((i) => l.find((x) => x.name === `vm${i}`)?.state === "offline")) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  const kinds = Object.fromEntries(KINDS.map((k) => [k, vms.filter((_, i) => kind(i) === k).length])) as Record<Kind, number>;
  log(`${n} VMs ready (${JSON.stringify(kinds)}); starting ${n} backups at once`);
  const cpu0 = cpuMs(d.proc.pid!);
  const start = Date.now();
  const begun = await Promise.all(
    vms.map((_, i) =>
      cli(
        d.socket,
        kind(i) === "full"
          ? ["backup-begin", `vm${i}`, "--bandwidth", String(2 * MiB)]
          : ["backup-begin", `vm${i}`, inc, "--bandwidth", String(256 * 1024)],
      ),
    ),
  );
  for (const [i, b] of begun.entries())
    if (b.code !== 0) failures.push(`vm${i} (${kind(i)}): backup-begin exited ${b.code}: ${b.stderr.trim()}`);
  // snapshots at the backups' point in time: nothing writes to the disks from here on (a stopped VM's is its image)
  const snaps = vms.map((vm, i) => (offline.has(i) ? vm.disks[0]!.path : join(vm.dir, "snap.qcow2")));
  for (const [i, vm] of vms.entries())
    if (!offline.has(i)) await handBackups(vm.monitor, "32M", [{ node: vm.disks[0]!.node, target: snaps[i]!, sync: "full" }]);
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
    if (offline.has(i)) continue;
    const left = await leftovers(vm.monitor);
    if (left.length > 0) failures.push(`vm${i}: leftovers ${left.join(", ")}`);
  }
  // the offline backups' storage daemons end with their jobs, and with them the image locks
  for (let k = 0; k < 200 && storageDaemons() > 0; k++) await new Promise((r) => setTimeout(r, 50));
  if (storageDaemons() > 0) failures.push(`${storageDaemons()} storage daemons left`);
  for (const i of offline) {
    try {
      await execFileP("qemu-img", ["info", vms[i]!.disks[0]!.path]);
    } catch (e) {
      failures.push(`vm${i}: its image is still locked: ${(e as Error).message}`);
    }
  }
  return { vms: n, wallMs, daemonCpuMs: cpu, peakRssMiB: rss, failures, kinds };
}
