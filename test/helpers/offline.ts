/** What offline-backup tests ask of the host: who holds an image, which storage daemons of ours run. */
import { readdirSync, readFileSync } from "node:fs";
import { execFileP, type QemuProcess } from "./qemu.js";

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
