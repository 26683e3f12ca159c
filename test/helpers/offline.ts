/** What offline-backup tests ask of the host: who holds an image, which storage daemons of ours run. */
import { readdirSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import type { Test } from "tap";
import { addDomain, cliOn, fileWriter, startDaemon, until } from "./daemon.js";
import { execFileP, type QemuProcess, startVm, tempDir } from "./qemu.js";

const MiB = 1024 * 1024;

/** No process holds a write lock on the image: qemu-img takes a shared lock, refused while a writer holds it. */
export async function imageFree(image: string): Promise<boolean> {
  try {
    await execFileP("qemu-img", ["info", image]);
    return true;
  } catch {
    return false;
  }
}

/** A clean shutdown, as a guest power-off: QEMU writes the persistent bitmaps into the image as it closes it. */
export async function shutDown(vm: QemuProcess): Promise<void> {
  await vm.monitor.execute("quit");
  await vm.exited;
}

/** The pids of the storage daemons qbackupd started (their monitor chardev is 'qbkm'). */
export function storageDaemonPids(): number[] {
  const out: number[] = [];
  for (const p of readdirSync("/proc").filter((x) => /^\d+$/.test(x))) {
    try {
      const cmd = readFileSync(`/proc/${p}/cmdline`, "utf8");
      if (cmd.startsWith("qemu-storage-daemon") && cmd.includes("qbkm")) out.push(Number(p));
    } catch {
      // gone meanwhile
    }
  }
  return out;
}

export function storageDaemons(): number {
  return storageDaemonPids().length;
}

/** A VM whose guest wrote 2 MiB of `pattern`, registered with a daemon in `dir`, then shut down: the domain is offline. */
export async function stoppedVm(t: Test, pattern: number, dir = tempDir(t, "qbackupd-daemon-")) {
  const vm = await startVm(t, { disks: [{ size: "16M" }] });
  const d = await startDaemon(t, { dir });
  const c = cliOn(t, d.socket);
  await addDomain(d, "vm1", vm.qmpPath);
  await vm.write(0, pattern, 0, 2 * MiB);
  await shutDown(vm);
  await until("offline", async () => (await c.ok("domain-list")).stdout.includes("offline"));
  return { vm, image: vm.disks[0]!.path, d, file: fileWriter(vm.dir), ...c };
}

/** The first disk's target of the running job. */
export async function runningTarget(ok: (...a: string[]) => Promise<{ stdout: string }>): Promise<string> {
  return (JSON.parse((await ok("--json", "domjobinfo", "vm1")).stdout) as { disks: { file: string }[] }).disks[0]!.file;
}

/** A daemon killed during an offline push at 256 KiB/s, its storage daemon then sent `fate` (none: left running); a new daemon on the same state. */
export async function killedMidPush(t: Test, fate?: "SIGKILL" | "SIGSTOP") {
  const dir = tempDir(t, "qbackupd-daemon-");
  const { image, d, ok } = await stoppedVm(t, 0x21, dir);
  await ok("backup-begin", "vm1", "--bandwidth", "256K");
  const target = await runningTarget(ok);
  await d.stop("SIGKILL");
  const [sd] = storageDaemonPids();
  t.ok(sd, "the storage daemon outlived the daemon");
  if (fate !== undefined) process.kill(sd!, fate);
  t.teardown(() => {
    try {
      process.kill(sd!, "SIGKILL");
    } catch {
      // gone
    }
  });
  // the killed daemon's API socket is left: the new one is ready once it answers on its own
  rmSync(join(dir, "api.sock"), { force: true });
  // (a leftover that does not answer costs its connect timeout before the daemon listens)
  const d2 = await startDaemon(t, { dir, readyMs: 20_000 });
  return { image, target, sd: sd!, again: cliOn(t, d2.socket) };
}
