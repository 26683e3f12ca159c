/**
 * Captures, from real QEMU, the QMP answers the unit tests replay
 * (test/fixtures/qmp/): query-qmp-schema with query-version, and for block
 * graphs with filters and named backing nodes query-block,
 * query-named-block-nodes (flat) and x-debug-query-block-graph. Run it once
 * per QEMU of the matrix (the QEMU on PATH is the one captured):
 *   node --import tsx scripts/capture-qmp-fixtures.ts
 *   PATH=~/.cache/qbackupd/qemu-10.0.2/usr/bin:$PATH node --import tsx scripts/capture-qmp-fixtures.ts
 * Temporary directories are replaced by "/TMP" so a recapture diffs cleanly.
 * It writes fixtures only; the expectations in test/unit are written by hand.
 */
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import type { QmpClient } from "../src/qmp/index.js";
import { createImage, execFileP, qemuVersionUnderTest, startStorageDaemon, startVm, tempDir } from "../test/helpers/qemu.js";
import { Cleanup } from "./lib/teardown.js";

const OUT = join(import.meta.dirname, "..", "test", "fixtures", "qmp");
const MiB = 1024 * 1024;
const v = qemuVersionUnderTest();
const ver = `${v.major}.${v.minor}`;

function must<T>(r: { isErr(): boolean; _unsafeUnwrap(): T; _unsafeUnwrapErr(): unknown }): T {
  if (r.isErr()) throw new Error(JSON.stringify(r._unsafeUnwrapErr()));
  return r._unsafeUnwrap();
}

async function graphOf(mon: QmpClient): Promise<unknown> {
  return {
    "query-block": must(await mon.execute("query-block")),
    "query-named-block-nodes": must(await mon.execute("query-named-block-nodes", { flat: true })),
    "x-debug-query-block-graph": must(await mon.execute("x-debug-query-block-graph")),
  };
}

function save(name: string, value: unknown, dirs: readonly string[], gzip = false): void {
  let s = `${JSON.stringify(value, null, 1)}\n`;
  for (const d of dirs) s = s.split(d).join("/TMP");
  const file = join(OUT, `${name}-${ver}.json${gzip ? ".gz" : ""}`);
  writeFileSync(file, gzip ? gzipSync(s, { level: 9 }) : s);
  console.log(`wrote ${file}`);
}

async function waitJob(mon: QmpClient, id: string, status: string): Promise<void> {
  for (let i = 0; i < 400; i++) {
    const j = must(await mon.execute("query-jobs")).find((x) => x.id === id);
    if (j?.status === status) return;
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`job ${id} never reached ${status}`);
}

/** libvirt's way: every layer a named -blockdev, the overlay's backing given by node-name (as in test/qemu/disk-graph.test.ts). */
async function libvirtChainArgs(dir: string, throttle: boolean): Promise<string[]> {
  const base = join(dir, "base.qcow2");
  const top = join(dir, "top.qcow2");
  await createImage(base, "16M");
  await execFileP("qemu-img", ["create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top]);
  const file = (n: number, path: string) =>
    JSON.stringify({ driver: "file", filename: path, "node-name": `libvirt-${n}-storage`, "auto-read-only": true, discard: "unmap" });
  const args = [
    "-blockdev",
    file(2, base),
    "-blockdev",
    JSON.stringify({ "node-name": "libvirt-2-format", "read-only": true, driver: "qcow2", file: "libvirt-2-storage", backing: null }),
    "-blockdev",
    file(1, top),
    "-blockdev",
    JSON.stringify({
      "node-name": "libvirt-1-format",
      "read-only": false,
      driver: "qcow2",
      file: "libvirt-1-storage",
      backing: "libvirt-2-format",
    }),
  ];
  if (!throttle) return [...args, "-device", "virtio-blk-pci,drive=libvirt-1-format,id=virtio-disk0"];
  // libvirt ≥ 11 puts I/O limits in a throttle filter node above the format node
  return [
    ...args,
    "-object",
    "throttle-group,id=limits0,x-iops-total=1000",
    "-blockdev",
    JSON.stringify({ driver: "throttle", "node-name": "libvirt-1-throttle", "throttle-group": "limits0", file: "libvirt-1-format" }),
    "-device",
    "virtio-blk-pci,drive=libvirt-1-throttle,id=virtio-disk0",
  ];
}

const c = new Cleanup();
try {
  mkdirSync(OUT, { recursive: true });

  // 1. the schema and version of a plain VM
  {
    const vm = await startVm(c);
    const version = must(await vm.monitor.execute("query-version"));
    const schema = must(await vm.monitor.execute("query-qmp-schema"));
    save("schema", { "query-version": version, "query-qmp-schema": schema }, [vm.dir], true);
  }

  // 2. libvirt chain: named backing node, a persistent checkpoint bitmap on the overlay
  for (const throttle of [false, true]) {
    const dir = tempDir(c);
    const vm = await startVm(c, { disks: [], dir, extraArgs: await libvirtChainArgs(dir, throttle) });
    must(await vm.monitor.execute("block-dirty-bitmap-add", { node: "libvirt-1-format", name: "cp1", persistent: true }));
    save(throttle ? "graph-libvirt-throttle" : "graph-libvirt-chain", await graphOf(vm.monitor), [dir]);
    if (throttle) continue;

    // 3. the same after blockdev-snapshot, during the active commit (commit filter above the new overlay)
    const snap = join(dir, "snap.qcow2");
    await createImage(snap, "16M");
    const mon = vm.monitor;
    must(await mon.execute("blockdev-add", { driver: "file", filename: snap, "node-name": "libvirt-3-storage" }));
    must(await mon.execute("blockdev-add", { driver: "qcow2", "node-name": "libvirt-3-format", file: "libvirt-3-storage", backing: null }));
    must(await mon.executeRaw("blockdev-snapshot", { node: "libvirt-1-format", overlay: "libvirt-3-format" }));
    must(
      await mon.executeRaw("block-commit", {
        "job-id": "fc",
        device: "libvirt-3-format",
        "base-node": "libvirt-1-format",
        "filter-node-name": "commit-flt",
      }),
    );
    await waitJob(mon, "fc", "ready");
    save("graph-libvirt-commit", await graphOf(mon), [dir]);
  }

  // 4. foreign backup (copy-before-write filter) and mirror (mirror_top filter) jobs above vda, bitmaps cp1 and cp2 on it; vdb raw
  for (const kind of ["backup", "mirror"] as const) {
    const vm = await startVm(c, { disks: [{ size: "16M" }, { size: "8M", format: "raw" }] });
    const mon = vm.monitor;
    for (const name of ["cp1", "cp2"]) must(await mon.execute("block-dirty-bitmap-add", { node: "drive-vda", name, persistent: true }));
    await vm.write(0, 0x41, 0, MiB);
    const target = join(vm.dir, "foreign.qcow2");
    await createImage(target, "16M");
    must(await mon.execute("blockdev-add", { driver: "qcow2", "node-name": "foreign-target", file: { driver: "file", filename: target } }));
    if (kind === "backup") {
      must(
        await mon.executeRaw("blockdev-backup", {
          "job-id": "foreign",
          device: "drive-vda",
          target: "foreign-target",
          sync: "full",
          speed: 1,
          "filter-node-name": "foreign-cbw",
        }),
      );
      await waitJob(mon, "foreign", "running");
    } else {
      must(
        await mon.executeRaw("blockdev-mirror", {
          "job-id": "foreign",
          device: "drive-vda",
          target: "foreign-target",
          sync: "full",
          "filter-node-name": "foreign-mirror",
        }),
      );
      await waitJob(mon, "foreign", "ready");
    }
    save(`graph-foreign-${kind}`, await graphOf(mon), [vm.dir]);
  }

  // 5. qemu-storage-daemon: two nodes no device uses, a backup of disk0 running (auto-named filter) into a qbk- target
  {
    const sd = await startStorageDaemon(c, { disks: [{ size: "16M" }, { size: "8M" }] });
    const mon = sd.monitor;
    must(await mon.execute("block-dirty-bitmap-add", { node: "disk0", name: "cp1", persistent: true }));
    const target = join(sd.dir, "t0.qcow2");
    await createImage(target, "16M");
    must(
      await mon.execute("blockdev-add", {
        driver: "qcow2",
        "node-name": "qbk-abcdef-00000001-t0",
        file: { driver: "file", filename: target },
      }),
    );
    must(
      await mon.executeRaw("blockdev-backup", {
        "job-id": "qbk-abcdef-00000001-j0",
        device: "disk0",
        target: "qbk-abcdef-00000001-t0",
        sync: "full",
        speed: 1,
      }),
    );
    await waitJob(mon, "qbk-abcdef-00000001-j0", "running");
    save("graph-storage-daemon", await graphOf(mon), [sd.dir]);
  }
} finally {
  await c.run();
}
