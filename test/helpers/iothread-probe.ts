/**
 * Probes of what a QEMU does with a disk in an iothread, one operation per
 * fresh qemu-storage-daemon, so an abort is seen as the process dying. Used
 * by scripts/probe-iothreads.ts and test/qemu/iothread-probe.test.ts.
 */
import { execFile, spawn } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { pino } from "pino";
import { QmpClient, qmpErrorMessage } from "../../src/qmp/index.js";

const execFileP = promisify(execFile);

export type ProbeOp =
  | "push"
  | "push-target-in-iothread"
  | "push-abort"
  | "pull-scratch-add"
  | "pull-export-client"
  | "pull-scratch-in-iothread"
  | "pull-scratch-in-iothread-export-client"
  | "checkpoint-add-merge-remove";

export const PROBE_OPS: readonly ProbeOp[] = [
  "push",
  "push-target-in-iothread",
  "push-abort",
  "pull-scratch-add",
  "pull-scratch-in-iothread",
  "pull-export-client",
  "pull-scratch-in-iothread-export-client",
  "checkpoint-add-merge-remove",
];

export interface ProbeResult {
  readonly op: ProbeOp;
  readonly outcome: "ok" | "aborts" | "error";
  readonly detail?: string;
}

type Cmd = (name: string, args?: Record<string, unknown>) => Promise<unknown>;

async function waitJob(cmd: Cmd, id: string): Promise<void> {
  for (let i = 0; i < 400; i++) {
    const jobs = (await cmd("query-jobs")) as { id: string; status: string; error?: string }[];
    const j = jobs.find((x) => x.id === id);
    if (j === undefined) return;
    if (j.status === "concluded" || j.status === "null") {
      await cmd("job-dismiss", { id });
      if (j.error) throw new Error(j.error);
      return;
    }
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`job ${id} did not end`);
}

const qcow2 = (node: string, path: string, backing?: string) => ({
  "node-name": node,
  driver: "qcow2",
  file: { driver: "file", filename: path },
  ...(backing !== undefined ? { backing } : {}),
});

async function createTarget(dir: string, name: string, backingOf?: string): Promise<string> {
  const p = join(dir, `${name}.qcow2`);
  const extra = backingOf ? ["-b", backingOf, "-F", "qcow2"] : [];
  await execFileP("qemu-img", ["create", "-q", "-f", "qcow2", ...extra, p, "16M"]);
  return p;
}

async function runOp(op: ProbeOp, cmd: Cmd, dir: string, disk: string): Promise<void> {
  switch (op) {
    case "push":
    case "push-target-in-iothread":
    case "push-abort": {
      await cmd("blockdev-add", qcow2("t0", await createTarget(dir, "t0")));
      if (op === "push-target-in-iothread") await cmd("x-blockdev-set-iothread", { "node-name": "t0", iothread: "io0" });
      const speed = op === "push-abort" ? { speed: 65536 } : {};
      await cmd("blockdev-backup", { "job-id": "j0", device: "disk0", target: "t0", sync: "full", "auto-dismiss": false, ...speed });
      if (op === "push-abort") {
        await new Promise((r) => setTimeout(r, 100));
        await cmd("job-cancel", { id: "j0" });
        await waitJob(cmd, "j0").catch(() => {});
      } else await waitJob(cmd, "j0");
      await cmd("blockdev-del", { "node-name": "t0" });
      return;
    }
    case "pull-scratch-add":
    case "pull-scratch-in-iothread":
    case "pull-scratch-in-iothread-export-client":
    case "pull-export-client": {
      const scratch = join(dir, "s0.qcow2");
      await execFileP("qemu-img", ["create", "-q", "-f", "qcow2", scratch, "16M"]);
      if (op === "pull-scratch-add" || op === "pull-export-client") {
        await cmd("blockdev-add", qcow2("s0", scratch, "disk0"));
      } else {
        // the scratch node without its backing, moved into the disk's iothread, then given its backing
        await cmd("blockdev-add", { ...qcow2("s0", scratch), backing: null });
        await cmd("x-blockdev-set-iothread", { "node-name": "s0", iothread: "io0" });
        await cmd("blockdev-reopen", { options: [{ ...qcow2("s0", scratch), backing: "disk0" }] });
      }
      await cmd("blockdev-backup", { "job-id": "j0", device: "disk0", target: "s0", sync: "none", "auto-dismiss": false });
      if (op === "pull-export-client" || op === "pull-scratch-in-iothread-export-client") {
        const sock = join(dir, "nbd.sock");
        await cmd("nbd-server-start", { addr: { type: "unix", data: { path: sock } } });
        await cmd("block-export-add", { type: "nbd", id: "e0", "node-name": "s0", name: "vda" });
        await execFileP("nbdinfo", [`nbd+unix:///vda?socket=${sock}`]);
        await new Promise((r) => setTimeout(r, 200));
        await cmd("block-export-del", { id: "e0" });
        await cmd("nbd-server-stop");
      }
      await cmd("job-cancel", { id: "j0" });
      await waitJob(cmd, "j0").catch(() => {});
      await cmd("blockdev-del", { "node-name": "s0" });
      return;
    }
    case "checkpoint-add-merge-remove":
      await cmd("block-dirty-bitmap-add", { node: disk, name: "b0", persistent: true });
      await cmd("block-dirty-bitmap-add", { node: disk, name: "b1", persistent: true });
      await cmd("block-dirty-bitmap-merge", { node: disk, target: "b1", bitmaps: ["b0"] });
      await cmd("block-dirty-bitmap-remove", { node: disk, name: "b0" });
      await cmd("block-dirty-bitmap-remove", { node: disk, name: "b1" });
      return;
  }
}

/** One probe in a fresh qemu-storage-daemon whose disk0 runs in iothread io0. */
export async function probe(op: ProbeOp): Promise<ProbeResult> {
  const dir = mkdtempSync(join(tmpdir(), "qbackupd-probe-"));
  const image = join(dir, "disk0.qcow2");
  await execFileP("qemu-img", ["create", "-q", "-f", "qcow2", image, "16M"]);
  await execFileP("qemu-io", ["-f", "qcow2", "-c", "write -P 0x11 0 4M", image]);
  const qmp = join(dir, "qmp.sock");
  const proc = spawn(
    "qemu-storage-daemon",
    [
      "--object",
      "iothread,id=io0",
      "--blockdev",
      JSON.stringify(qcow2("disk0", image)),
      "--export",
      `type=vhost-user-blk,id=guest0,node-name=disk0,addr.type=unix,addr.path=${join(dir, "vhost.sock")},writable=on,iothread=io0`,
      "--chardev",
      `socket,id=m0,path=${qmp},server=on,wait=off`,
      "--monitor",
      "chardev=m0",
    ],
    { stdio: ["ignore", "ignore", "pipe"] },
  );
  let stderr = "";
  proc.stderr.setEncoding("utf8").on("data", (d: string) => {
    stderr += d;
  });
  const exited = new Promise<void>((r) => proc.once("exit", () => r()));
  try {
    for (let i = 0; i < 200 && !existsSync(qmp); i++) await new Promise((r) => setTimeout(r, 25));
    const client = (await QmpClient.connect({ path: qmp }, { logger: pino({ level: "silent" }) }))._unsafeUnwrap();
    const cmd: Cmd = async (name, args) => {
      const r = await client.execute(name as never, args as never);
      if (r.isErr()) throw new Error(qmpErrorMessage(r.error));
      return r.value;
    };
    let failure: string | undefined;
    try {
      await runOp(op, cmd, dir, "disk0");
      await cmd("query-block-jobs");
    } catch (e) {
      failure = e instanceof Error ? e.message : String(e);
    }
    await Promise.race([exited, new Promise((r) => setTimeout(r, 300))]);
    const dead = proc.exitCode !== null || proc.signalCode !== null;
    client.close();
    if (dead) return { op, outcome: "aborts", detail: stderr.trim().split("\n").pop() ?? "" };
    return failure === undefined ? { op, outcome: "ok" } : { op, outcome: "error", detail: failure };
  } finally {
    proc.kill("SIGKILL");
    await exited;
    rmSync(dir, { recursive: true, force: true });
  }
}

export async function probeAll(): Promise<ProbeResult[]> {
  const out: ProbeResult[] = [];
  for (const op of PROBE_OPS) out.push(await probe(op));
  return out;
}
