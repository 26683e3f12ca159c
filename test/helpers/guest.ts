/**
 * A real Linux guest (scripts/build-guest.mjs: Debian kernel, busybox,
 * qemu-ga) under TCG, with an ext4 data disk where a workload keeps writing
 * checksummed files, a guest agent socket, and the QMP sockets of startVm.
 * Built on first use (a download of three Debian packages) and cached; a
 * guest that cannot be built fails the test with the script's message.
 */
import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { execFileP, finish, type QemuProcess, spawnQemu, type Teardown, tempDir } from "./qemu.js";

const ROOT = join(import.meta.dirname, "..", "..");

export interface Guest extends QemuProcess {
  /** The guest agent's socket (virtio-serial port org.qemu.guest_agent.0). */
  readonly agentPath: string;
  /** Everything the guest printed on its serial console so far (kernel, syslog, fsfreeze hook, markers). */
  serial(): string;
  /** Milliseconds from QEMU's start to the workload's marker. */
  readonly bootMs: number;
}

let built: { kernel: string; initrd: string } | undefined;

/** The cached guest, built when missing. Throws (failing the test) when it cannot be built. */
export function guestImages(): { kernel: string; initrd: string } {
  if (built !== undefined) return built;
  const r = spawnSync(process.execPath, [join(ROOT, "scripts", "build-guest.mjs")], { encoding: "utf8" });
  if (r.status !== 0)
    throw new Error(`cannot build the test guest (scripts/build-guest.mjs, exit ${r.status ?? r.signal}): ${r.stderr.trim()}`);
  const dir = r.stdout.trim().split("\n").pop()!;
  built = { kernel: join(dir, "bzImage"), initrd: join(dir, "initramfs.cpio.gz") };
  return built;
}

/** An empty ext4 filesystem made on the host, as qcow2. */
async function ext4Disk(dir: string, size: string): Promise<string> {
  const raw = join(dir, "data.raw");
  const path = join(dir, "vda.qcow2");
  await execFileP("truncate", ["-s", size, raw]);
  await execFileP("mkfs.ext4", ["-q", "-F", "-L", "data", raw]);
  await execFileP("qemu-img", ["convert", "-O", "qcow2", raw, path]);
  await execFileP("rm", ["-f", raw]);
  return path;
}

export async function startGuest(t: Teardown, opts: { iothread?: boolean; size?: string } = {}): Promise<Guest> {
  const { kernel, initrd } = guestImages();
  const dir = tempDir(t, "qbackupd-guest-");
  const path = await ext4Disk(dir, opts.size ?? "256M");
  const serialPath = join(dir, "serial.log");
  const agentPath = join(dir, "qga.sock");
  const qmpPath = join(dir, "qmp.sock");
  const testPath = join(dir, "test-qmp.sock");
  const node = "drive-vda";
  const args = [
    "-nodefaults",
    "-machine",
    "pc",
    "-accel",
    "tcg",
    "-display",
    "none",
    "-m",
    "256",
    "-kernel",
    kernel,
    "-initrd",
    initrd,
    "-append",
    "console=ttyS0 quiet",
    "-serial",
    `file:${serialPath}`,
    ...(opts.iothread ? ["-object", "iothread,id=io0"] : []),
    "-blockdev",
    JSON.stringify({ "node-name": node, driver: "qcow2", file: { driver: "file", filename: path } }),
    "-device",
    `virtio-blk-pci,drive=${node},id=vda${opts.iothread ? ",iothread=io0" : ""}`,
    "-device",
    "virtio-serial-pci",
    "-chardev",
    `socket,id=qga0,path=${agentPath},server=on,wait=off`,
    "-device",
    "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
    "-qmp",
    `unix:${qmpPath},server=on,wait=off`,
    "-qmp",
    `unix:${testPath},server=on,wait=off`,
  ];
  const start = Date.now();
  const spawned = spawnQemu(t, "qemu-system-x86_64", args);
  const disks = [{ id: "vda", node, path, format: "qcow2" as const, qdev: "/machine/peripheral/vda/virtio-backend" }];
  const vm = await finish(t, dir, qmpPath, testPath, disks, spawned);
  const serial = () => {
    try {
      return readFileSync(serialPath, "latin1");
    } catch {
      return "";
    }
  };
  for (;;) {
    const s = serial();
    if (s.includes("WORKLOAD-RUNNING")) break;
    if (s.includes("GUEST-ERROR")) throw new Error(`guest failed to start:\n${s}`);
    if (spawned.proc.exitCode !== null || spawned.proc.signalCode !== null) throw new Error(`QEMU exited: ${spawned.stderr()}\n${s}`);
    if (Date.now() - start > 120_000) throw new Error(`guest did not start its workload within 120 s:\n${s}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  return { ...vm, agentPath, serial, bootMs: Date.now() - start };
}

/**
 * Check an ext4 image against its own /manifest without mounting it (debugfs
 * rdump): every file the manifest lists must have its recorded sha256.
 */
export async function checkManifest(image: string, dir: string): Promise<{ files: number; bad: string[] }> {
  const raw = join(dir, `check-${Date.now()}.raw`);
  const out = join(dir, `check-${Date.now()}.d`);
  await execFileP("qemu-img", ["convert", "-U", "-O", "raw", image, raw]);
  await execFileP("mkdir", ["-p", out]);
  await execFileP("debugfs", ["-R", `rdump / ${out}`, raw], { maxBuffer: 1 << 26 });
  const bad: string[] = [];
  let files = 0;
  for (const line of readFileSync(join(out, "manifest"), "utf8").split("\n")) {
    if (line === "") continue;
    files++;
    const [name, sum] = line.split(" ");
    let got = "(missing)";
    try {
      got = createHash("sha256")
        .update(readFileSync(join(out, name ?? "")))
        .digest("hex");
    } catch {}
    if (got !== sum) bad.push(`${name}: manifest ${sum}, image ${got}`);
  }
  await execFileP("rm", ["-rf", raw, out]);
  return { files, bad };
}
