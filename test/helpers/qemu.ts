/**
 * Test harness: real qemu-system-x86_64 / qemu-storage-daemon processes with
 * qcow2 disks in a temp dir, a QMP socket for the code under test and a
 * second monitor for the test itself, guest writes through the device, and
 * image checks with qemu-img / qemu-io. Teardown kills only the processes it
 * started and removes its temp dir; an exit hook does the same if the test
 * process dies first.
 */
import { type ChildProcess, execFile, execFileSync, spawn } from "node:child_process";
import { chmodSync, chownSync, existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { pino } from "pino";
import { QmpClient, qemuIoDevice, qmpErrorMessage } from "../../src/qmp/index.js";

export const execFileP = promisify(execFile);
export const silentLogger = pino({ level: "silent" });

const live = new Set<ChildProcess>();
const dirs = new Set<string>();
process.once("exit", () => {
  for (const p of live) p.kill("SIGKILL");
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

/** Anything with tap's teardown (a Test); keeps helpers independent of tap's types. */
export interface Teardown {
  teardown(fn: () => unknown): void;
}

export function tempDir(t: Teardown, prefix = "qbackupd-test-"): string {
  const d = mkdtempSync(join(tmpdir(), prefix));
  dirs.add(d);
  t.teardown(() => {
    rmSync(d, { recursive: true, force: true });
    dirs.delete(d);
  });
  return d;
}

export interface DiskSpec {
  /** qemu-img size, e.g. "64M". */
  readonly size?: string;
  readonly format?: "qcow2" | "raw";
  readonly clusterSize?: number;
  /** Give the virtio-blk device this iothread (startVm creates the iothread object). */
  readonly iothread?: string;
}

export interface TestDisk {
  readonly id: string;
  readonly node: string;
  readonly path: string;
  readonly format: "qcow2" | "raw";
  /** qdev path of the guest device's block backend (for qemu-io -d). */
  readonly qdev: string;
  /** qemu-storage-daemon with `iothreads: "fuse"`: the disk as a file (a FUSE export), where the "guest" writes. */
  readonly fuse?: string;
}

export interface QemuProcess {
  readonly dir: string;
  /** The QMP socket for the code under test. */
  readonly qmpPath: string;
  /** A second monitor, already connected, for the test's own checks and writes. */
  readonly monitor: QmpClient;
  readonly disks: readonly TestDisk[];
  readonly proc: ChildProcess;
  /** Resolves with the exit code/signal when the process ends. */
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  stderr(): string;
  /** Guest-visible write of `pattern` bytes (qemu-io -d through the device). */
  write(disk: number, pattern: number, offset: number, length: number): Promise<void>;
  kill(signal?: NodeJS.Signals): Promise<void>;
}

export async function createImage(path: string, size: string, format: "qcow2" | "raw" = "qcow2", extra: string[] = []): Promise<void> {
  await execFileP("qemu-img", ["create", "-q", "-f", format, ...extra, path, size]);
}

async function waitForSocket(path: string, proc: ChildProcess, errText: () => string): Promise<void> {
  for (let i = 0; i < 200; i++) {
    if (existsSync(path)) return;
    if (proc.exitCode !== null || proc.signalCode !== null) throw new Error(`QEMU exited early: ${errText()}`);
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`QMP socket ${path} did not appear: ${errText()}`);
}

const DEV_NAMES = "abcdefghijklmnopqrstuvwxyz";

export interface VmOptions {
  readonly disks?: readonly DiskSpec[];
  /** Reuse these image files instead of creating new ones (restart of "the same VM"). */
  readonly images?: readonly string[];
  readonly dir?: string;
  readonly extraArgs?: readonly string[];
  /**
   * qemu-storage-daemon only: each disk in an iothread of its own, moved
   * there by an export in that iothread: "vhost-user-blk" as a production
   * storage daemon serves a VM (nothing connects; no guest writes), or
   * "fuse", a file where the test writes as a guest would. (A VM without a
   * guest never starts virtio-blk's dataplane: its disks stay in the main loop.)
   */
  readonly iothreads?: "fuse" | "vhost-user-blk";
  /** qemu-storage-daemon only: called with each new image before the daemon opens it (to write data offline). */
  readonly prepare?: (image: string, index: number) => Promise<unknown>;
  /** Run QEMU as this user (setpriv; root only): its directory and images are given to it. */
  readonly runAs?: { readonly uid: number; readonly gid: number };
}

export function spawnQemu(
  t: Teardown,
  bin: string,
  args: string[],
): { proc: ChildProcess; stderr: () => string; exited: QemuProcess["exited"] } {
  const proc = spawn(bin, args, { stdio: ["ignore", "ignore", "pipe"] });
  live.add(proc);
  let err = "";
  proc.stderr?.setEncoding("utf8").on("data", (d: string) => {
    if (err.length < 65536) err += d;
  });
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    proc.once("exit", (code, signal) => {
      live.delete(proc);
      resolve({ code, signal });
    });
  });
  t.teardown(async () => {
    if (proc.exitCode === null && proc.signalCode === null) {
      proc.kill("SIGKILL");
      await exited;
    }
  });
  return { proc, stderr: () => err, exited };
}

export async function finish(
  t: Teardown,
  dir: string,
  qmpPath: string,
  testPath: string,
  disks: TestDisk[],
  spawned: ReturnType<typeof spawnQemu>,
): Promise<QemuProcess> {
  await waitForSocket(testPath, spawned.proc, spawned.stderr);
  // the socket file appears at bind(), a moment before QEMU listens: retry a refused connect
  let mon = await QmpClient.connect({ path: testPath }, { logger: silentLogger });
  for (let i = 0; i < 100 && mon.isErr(); i++) {
    await new Promise((r) => setTimeout(r, 20));
    mon = await QmpClient.connect({ path: testPath }, { logger: silentLogger });
  }
  if (mon.isErr()) throw new Error(`test monitor: ${qmpErrorMessage(mon.error)}`);
  const monitor = mon.value;
  t.teardown(() => monitor.close());
  return {
    dir,
    qmpPath,
    monitor,
    disks,
    proc: spawned.proc,
    exited: spawned.exited,
    stderr: spawned.stderr,
    async write(disk, pattern, offset, length) {
      const d = disks[disk];
      if (d === undefined) throw new Error(`no disk ${disk}`);
      if (d.qdev === "" && d.fuse === undefined)
        throw new Error(`disk ${disk}: no way to write as the guest (a storage daemon without a FUSE export)`);
      if (d.fuse !== undefined) {
        await execFileP("qemu-io", ["-f", "raw", "-c", `write -P ${pattern} ${offset} ${length}`, d.fuse]);
        return;
      }
      const r = await qemuIoDevice(monitor, d.qdev, `write -P ${pattern} ${offset} ${length}`);
      if (r.isErr()) throw new Error(`guest write failed: ${qmpErrorMessage(r.error)}`);
    },
    async kill(signal: NodeJS.Signals = "SIGKILL") {
      if (spawned.proc.exitCode !== null || spawned.proc.signalCode !== null) return;
      spawned.proc.kill(signal);
      await spawned.exited;
    },
  };
}

/** A stopped (-S) VM with N virtio-blk disks vda, vdb, … and two QMP monitors. */
export async function startVm(t: Teardown, opts: VmOptions = {}): Promise<QemuProcess> {
  const dir = opts.dir ?? tempDir(t);
  // reused images keep the formats `disks` gives them (qcow2 where it gives none)
  const specs: readonly DiskSpec[] = opts.images?.map((_, i) => opts.disks?.[i] ?? {}) ?? opts.disks ?? [{}];
  const args = ["-nodefaults", "-machine", "pc", "-accel", "tcg", "-S", "-display", "none", "-m", "32"];
  const disks: TestDisk[] = [];
  for (const [i, spec] of specs.entries()) {
    const id = `vd${DEV_NAMES[i]}`;
    const format = spec.format ?? "qcow2";
    const path = opts.images?.[i] ?? join(dir, `${id}.${format}`);
    if (opts.images === undefined) {
      await createImage(path, spec.size ?? "64M", format, spec.clusterSize ? ["-o", `cluster_size=${spec.clusterSize}`] : []);
    }
    const node = `drive-${id}`;
    args.push(
      "-blockdev",
      JSON.stringify({ "node-name": node, driver: format, file: { driver: "file", filename: path } }),
      "-device",
      `virtio-blk-pci,drive=${node},id=${id}${spec.iothread ? `,iothread=${spec.iothread}` : ""}`,
    );
    disks.push({ id, node, path, format, qdev: `/machine/peripheral/${id}/virtio-backend` });
  }
  for (const io of new Set(specs.map((s) => s.iothread).filter((x) => x !== undefined))) args.push("-object", `iothread,id=${io}`);
  const qmpPath = join(dir, "qmp.sock");
  const testPath = join(dir, "test-qmp.sock");
  args.push("-qmp", `unix:${qmpPath},server=on,wait=off`, "-qmp", `unix:${testPath},server=on,wait=off`, ...(opts.extraArgs ?? []));
  rmSync(qmpPath, { force: true });
  rmSync(testPath, { force: true });
  const u = opts.runAs;
  if (u === undefined) return finish(t, dir, qmpPath, testPath, disks, spawnQemu(t, "qemu-system-x86_64", args));
  chmodSync(dir, 0o755);
  chownSync(dir, u.uid, u.gid);
  for (const d of disks) chownSync(d.path, u.uid, u.gid);
  const ids = ["--reuid", String(u.uid), "--regid", String(u.gid), "--clear-groups"];
  return finish(t, dir, qmpPath, testPath, disks, spawnQemu(t, "setpriv", [...ids, "qemu-system-x86_64", ...args]));
}

/** qemu-storage-daemon with N qcow2 nodes (no guest devices; disks are named by node-name). */
export async function startStorageDaemon(t: Teardown, opts: VmOptions = {}): Promise<QemuProcess> {
  const dir = opts.dir ?? tempDir(t);
  const specs: readonly DiskSpec[] = opts.images?.map(() => ({})) ?? opts.disks ?? [{}];
  const args: string[] = [];
  const disks: TestDisk[] = [];
  for (const [i, spec] of specs.entries()) {
    const node = `disk${i}`;
    const format = spec.format ?? "qcow2";
    const path = opts.images?.[i] ?? join(dir, `${node}.${format}`);
    if (opts.images === undefined) {
      await createImage(path, spec.size ?? "64M", format);
      await opts.prepare?.(path, i);
    }
    args.push("--blockdev", JSON.stringify({ "node-name": node, driver: format, file: { driver: "file", filename: path } }));
    if (opts.iothreads === "fuse") {
      const fuse = join(dir, `${node}.fuse`);
      writeFileSync(fuse, "");
      args.push("--object", `iothread,id=io${i}`);
      args.push("--export", `type=fuse,id=guest${i},node-name=${node},mountpoint=${fuse},writable=on,iothread=io${i}`);
      disks.push({ id: node, node, path, format, qdev: "", fuse });
    } else if (opts.iothreads === "vhost-user-blk") {
      args.push("--object", `iothread,id=io${i}`);
      const addr = `addr.type=unix,addr.path=${join(dir, `${node}.vhost`)}`;
      args.push("--export", `type=vhost-user-blk,id=guest${i},node-name=${node},${addr},writable=on,iothread=io${i}`);
      disks.push({ id: node, node, path, format, qdev: "" });
    } else {
      disks.push({ id: node, node, path, format, qdev: "" });
    }
  }
  const qmpPath = join(dir, "qmp.sock");
  const testPath = join(dir, "test-qmp.sock");
  args.push(
    "--chardev",
    `socket,id=m0,path=${qmpPath},server=on,wait=off`,
    "--monitor",
    "chardev=m0",
    "--chardev",
    `socket,id=m1,path=${testPath},server=on,wait=off`,
    "--monitor",
    "chardev=m1",
  );
  const spawned = spawnQemu(t, "qemu-storage-daemon", args);
  if (opts.iothreads === "fuse") {
    // runs before spawnQemu's SIGKILL: a killed daemon would leave its FUSE mounts behind, and its directory could not be removed
    t.teardown(async () => {
      if (spawned.proc.exitCode === null && spawned.proc.signalCode === null) {
        spawned.proc.kill("SIGTERM");
        await spawned.exited;
      }
      for (const d of disks) await execFileP("umount", ["-l", d.fuse!]).catch(() => {});
    });
  }
  return finish(t, dir, qmpPath, testPath, disks, spawned);
}

/** `qemu-img compare`: true when the guest-visible contents are identical. */
export async function imagesIdentical(a: string, b: string): Promise<{ identical: boolean; output: string }> {
  try {
    const r = await execFileP("qemu-img", ["compare", "-U", a, b]);
    return { identical: true, output: r.stdout };
  } catch (e) {
    const x = e as { stdout?: string; stderr?: string };
    return { identical: false, output: `${x.stdout ?? ""}${x.stderr ?? ""}` };
  }
}

/** `qemu-io -r -c 'read -P pattern off len'`: true when the range holds the pattern. */
export async function rangeHolds(image: string, format: string, pattern: number, offset: number, length: number): Promise<boolean> {
  try {
    const r = await execFileP("qemu-io", ["-r", "-U", "-f", format, "-c", `read -P ${pattern} ${offset} ${length}`, image]);
    return !/Pattern verification failed|failed/i.test(r.stdout);
  } catch {
    return false;
  }
}

/** The version of the QEMU under test (the qemu-system-x86_64 on PATH: see scripts/test-matrix.mjs). */
export function qemuVersionUnderTest(): { major: number; minor: number; micro: number } {
  const out = execFileSync("qemu-system-x86_64", ["--version"], { encoding: "utf8" });
  const m = /version (\d+)\.(\d+)\.(\d+)/.exec(out);
  if (m === null) throw new Error(`cannot read QEMU's version from: ${out}`);
  return { major: Number(m[1]), minor: Number(m[2]), micro: Number(m[3]) };
}
