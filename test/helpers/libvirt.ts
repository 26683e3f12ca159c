/**
 * VMs booted from the command lines Debian's libvirt builds
 * (test/fixtures/libvirt/*.argv, made by scripts/gen-libvirt-argv): the
 * argv as libvirt emitted it, with only what cannot work here adapted —
 * fixture paths point to fresh images in a temp dir, libvirt's master-key
 * secret and its monitor chardev are dropped, our two QMP sockets added, and
 * the emulator is whichever qemu-system-x86_64 is first on PATH.
 */
import { readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { createImage, execFileP, finish, type QemuProcess, spawnQemu, type Teardown, type TestDisk, tempDir } from "./qemu.js";

const FIXTURES = join(import.meta.dirname, "..", "fixtures", "libvirt");
const FIXTURE_DIR = "/var/lib/qbackupd-fixture/";

interface BlockdevArg {
  readonly "node-name": string;
  readonly driver: string;
  readonly filename?: string;
  readonly file?: string;
  readonly backing?: string | null;
}

interface DeviceArg {
  readonly driver: string;
  readonly id?: string;
  readonly drive?: string;
}

/** What the test needs to know about a libvirt VM besides its process. */
export interface LibvirtVm extends QemuProcess {
  /** Node names libvirt gave the backing layers: never a disk. */
  readonly backingNodes: readonly string[];
}

/** Words after each occurrence of `flag`. */
function values(argv: readonly string[], flag: string): string[] {
  return argv.flatMap((a, i) => (a === flag && argv[i + 1] !== undefined ? [argv[i + 1]!] : []));
}

export async function startLibvirtVm(t: Teardown, fixture: string, size = "16M"): Promise<LibvirtVm> {
  const dir = tempDir(t, "qbackupd-libvirt-");
  const raw = readFileSync(join(FIXTURES, `${fixture}.argv`), "utf8")
    .trimEnd()
    .split("\n")
    .slice(1);
  const argv: string[] = [];
  for (let i = 0; i < raw.length; i++) {
    const a = raw[i]!;
    const next = raw[i + 1] ?? "";
    // libvirt's secret reads a key file from its own state dir; its monitor is libvirt's socket
    if (
      (a === "-object" && next.includes('"masterKey0"')) ||
      (a === "-chardev" && next.includes("id=charmonitor")) ||
      (a === "-mon" && next.includes("chardev=charmonitor"))
    ) {
      i++;
      continue;
    }
    argv.push(a.replaceAll(FIXTURE_DIR, `${dir}/`));
  }
  // libvirt probed the system's QEMU 7.2; for a QEMU without -no-acpi (removed in 9.0) it emits -machine acpi=off instead
  if (argv.includes("-no-acpi") && !(await execFileP("qemu-system-x86_64", ["-help"])).stdout.includes("-no-acpi")) {
    argv.splice(argv.indexOf("-no-acpi"), 1);
    const m = argv.indexOf("-machine") + 1;
    argv[m] = `${argv[m]},acpi=off`;
  }
  const blockdevs = values(argv, "-blockdev").map((j) => JSON.parse(j) as BlockdevArg);
  const byNode = new Map(blockdevs.map((b) => [b["node-name"], b]));
  const fileOf = (formatNode: string) => byNode.get(byNode.get(formatNode)?.file ?? "")?.filename;
  // libvirt lists backing layers first: create each image after the one it backs onto
  const backingNodes: string[] = [];
  for (const b of blockdevs) {
    if (b.file === undefined) continue;
    const path = fileOf(b["node-name"])!;
    const backing = typeof b.backing === "string" ? b.backing : undefined;
    if (backing !== undefined) {
      backingNodes.push(backing);
      await execFileP("qemu-img", ["create", "-q", "-f", b.driver, "-b", fileOf(backing)!, "-F", byNode.get(backing)!.driver, path, size]);
    } else {
      await createImage(path, size, b.driver === "raw" ? "raw" : "qcow2");
      // data the guest never wrote through us, so a backup that missed a layer shows
      await execFileP("qemu-io", ["-f", b.driver, "-c", `write -P 0x5${blockdevs.indexOf(b)} 0 1M`, path]);
    }
  }
  const disks: TestDisk[] = [];
  for (const d of values(argv, "-device").map((j) => (j.startsWith("{") ? (JSON.parse(j) as DeviceArg) : undefined))) {
    if (d?.drive === undefined || d.id === undefined) continue;
    const top = byNode.get(d.drive)!;
    // virtio-blk's block backend is a child of the proxy device; scsi-hd is its own
    const qdev = d.driver.startsWith("virtio-blk") ? `/machine/peripheral/${d.id}/virtio-backend` : `/machine/peripheral/${d.id}`;
    disks.push({ id: d.id, node: d.drive, path: fileOf(d.drive)!, format: top.driver === "raw" ? "raw" : "qcow2", qdev });
  }
  const qmpPath = join(dir, "qmp.sock");
  const testPath = join(dir, "test-qmp.sock");
  rmSync(qmpPath, { force: true });
  rmSync(testPath, { force: true });
  argv.push("-qmp", `unix:${qmpPath},server=on,wait=off`, "-qmp", `unix:${testPath},server=on,wait=off`);
  const vm = await finish(t, dir, qmpPath, testPath, disks, spawnQemu(t, "qemu-system-x86_64", argv));
  return Object.assign(vm, { backingNodes });
}
