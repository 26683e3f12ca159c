/** The QMP client against real QEMU 7.2 (qemu-system-x86_64 -S and qemu-storage-daemon). */

import { join } from "node:path";
import t from "tap";
import { discoverDisks, probeCapabilities, QmpClient, type QmpError, QmpSupervisor } from "../../src/qmp/index.js";
import { createImage, qemuVersionUnderTest, silentLogger, startStorageDaemon, startVm } from "../helpers/qemu.js";

const unhandled: unknown[] = [];
process.on("unhandledRejection", (e) => unhandled.push(e));
t.teardown(() => {
  if (unhandled.length > 0) throw new Error(`unhandled rejections: ${String(unhandled)}`);
});

async function connect(path: string, opts = {}): Promise<QmpClient> {
  const c = (await QmpClient.connect({ path }, { logger: silentLogger, ...opts }))._unsafeUnwrap();
  return c;
}

t.test("greeting and negotiation", async (t) => {
  const vm = await startVm(t);
  const c = await connect(vm.qmpPath);
  t.teardown(() => c.close());
  t.equal(c.runstate, "running");
  t.same(c.version.qemu, qemuVersionUnderTest(), "greeting carries QEMU's version");
  t.ok(c.greeting.capabilities.includes("oob"), "greeting carries capabilities");
  t.same(c.capabilities, ["oob"], "oob is enabled (QEMU then reads pipelined commands ahead)");
  const v = await c.execute("query-version");
  t.same(v._unsafeUnwrap().qemu, c.version.qemu);
  // Negotiation happened: a command that needs command mode works.
  t.ok((await c.execute("query-status"))._unsafeUnwrap().status === "prelaunch");
});

t.test("500 pipelined commands each reach their caller", async (t) => {
  const vm = await startVm(t);
  const c = await connect(vm.qmpPath);
  t.teardown(() => c.close());
  // Alternate commands with distinguishable answers so a mixed-up reply shows.
  const results = await Promise.all(
    Array.from({ length: 500 }, (_, i) =>
      i % 2 === 0
        ? c.execute("query-version").map((v) => ({ i, kind: typeof v.qemu.major }))
        : c.execute("query-status").map((s) => ({ i, kind: s.status })),
    ),
  );
  t.equal(c.inFlight, 0);
  const wrong = results.filter((r, i) => r.isErr() || r.value.i !== i || r.value.kind !== (i % 2 === 0 ? "number" : "prelaunch"));
  t.equal(wrong.length, 0, "every reply matched its command");
});

t.test("a QMP error keeps its class and desc", async (t) => {
  const vm = await startVm(t);
  const c = await connect(vm.qmpPath);
  t.teardown(() => c.close());
  const r = await c.execute("blockdev-del", { "node-name": "no-such-node" });
  t.ok(r.isErr());
  const e = r._unsafeUnwrapErr();
  t.equal(e.code, "command");
  if (e.code === "command") {
    t.equal(e.errorClass, "GenericError");
    t.match(e.desc, /no-such-node/);
    t.equal(e.command, "blockdev-del");
  }
  const u = (await c.executeRaw("no-such-command"))._unsafeUnwrapErr();
  t.equal(u.code === "command" && u.errorClass, "CommandNotFound");
  t.equal(c.runstate, "running", "an error reply leaves the connection up");
});

t.test("events during a real blockdev-backup", async (t) => {
  const vm = await startVm(t, { disks: [{ size: "16M" }] });
  const c = await connect(vm.qmpPath);
  t.teardown(() => c.close());
  await vm.write(0, 0x11, 0, 1 << 20);
  const target = join(vm.dir, "target.qcow2");
  await createImage(target, "16M");
  (await c.execute("blockdev-add", { "node-name": "tgt", driver: "qcow2", file: { driver: "file", filename: target } }))._unsafeUnwrap();
  // Register before sending: JOB_STATUS_CHANGE may arrive before the reply.
  const statuses = c.listen(["JOB_STATUS_CHANGE"], (e) => e.data.id === "job1");
  const completed = c.listen(["BLOCK_JOB_COMPLETED"]);
  const r = await c.execute("blockdev-backup", {
    "job-id": "job1",
    device: vm.disks[0]!.node,
    target: "tgt",
    sync: "full",
    "auto-dismiss": false,
  });
  t.ok(r.isOk(), "backup started");
  const done = await completed.waitFor((e) => e.data.device === "job1", 20_000);
  const ev = done._unsafeUnwrap();
  t.equal(ev.name, "BLOCK_JOB_COMPLETED");
  t.equal(ev.data.len, 16 << 20);
  t.equal(ev.data.offset, ev.data.len);
  t.notOk(ev.data.error);
  t.ok(ev.timestamp.seconds > 1_600_000_000, "event keeps QEMU's timestamp");
  const seen: string[] = [];
  for (;;) {
    const e = await statuses.next(2000);
    if (e === undefined) break;
    seen.push(e.data.status);
    if (e.data.status === "concluded") break;
  }
  t.same(seen.slice(0, 2), ["created", "running"]);
  t.equal(seen.at(-1), "concluded", `saw ${seen.join(",")}`);
  const jobs = (await c.execute("query-jobs"))._unsafeUnwrap();
  t.equal(jobs[0]?.status, "concluded", "auto-dismiss:false keeps the job");
  (await c.execute("job-dismiss", { id: "job1" }))._unsafeUnwrap();
  statuses.close();
  completed.close();
});

t.test("a slow event listener does not stall command replies", async (t) => {
  const vm = await startVm(t);
  const c = await connect(vm.qmpPath);
  t.teardown(() => c.close());
  const never = c.listen(["STOP", "RESUME"]); // never read
  for (let i = 0; i < 20; i++) {
    (await c.execute(i % 2 === 0 ? "cont" : "stop"))._unsafeUnwrap();
  }
  t.equal(never.pending, 20, "events queued for the listener");
  const v = await c.execute("query-version");
  t.ok(v.isOk(), "replies still flow");
});

t.test("QEMU killed mid-command: pending commands fail with disconnected", async (t) => {
  const vm = await startVm(t);
  const c = await connect(vm.qmpPath);
  let closedInfo: string | undefined;
  c.onClose((i) => {
    closedInfo = i.cause;
  });
  const listener = c.listen(["JOB_STATUS_CHANGE"]);
  // Freeze QEMU so commands stay pending, then kill it.
  vm.proc.kill("SIGSTOP");
  const pending = Array.from({ length: 10 }, () => c.execute("query-block"));
  await new Promise((r) => setTimeout(r, 50));
  t.equal(c.inFlight, 10);
  await vm.kill("SIGKILL");
  const rs = await Promise.all(pending);
  t.ok(
    rs.every((r) => r.isErr() && r.error.code === "disconnected"),
    "all pending commands failed with disconnected",
  );
  const info = await c.closed;
  t.equal(info.cause, "peer");
  t.equal(closedInfo, "peer", "closed notification fired");
  t.equal(await listener.next(), undefined, "listeners end");
  const after = (await c.execute("query-version"))._unsafeUnwrapErr();
  t.equal(after.code, "disconnected", "commands after close fail at once");
  await new Promise((r) => setImmediate(r));
  t.equal(unhandled.length, 0, "no unhandled rejection");
});

t.test("per-command timeout; the late reply is dropped", async (t) => {
  const vm = await startVm(t);
  const c = await connect(vm.qmpPath);
  t.teardown(() => c.close());
  vm.proc.kill("SIGSTOP");
  const r = await c.execute("query-version", undefined, { timeoutMs: 200 });
  t.same(r._unsafeUnwrapErr(), { code: "timeout", command: "query-version", timeoutMs: 200 });
  vm.proc.kill("SIGCONT");
  const next = await c.execute("query-status");
  t.ok(next.isOk(), "connection stays usable after the late reply arrives");
  t.equal(c.runstate, "running");
});

t.test("connect errors are typed", async (t) => {
  const r = await QmpClient.connect({ path: "/nonexistent/qmp.sock" }, { logger: silentLogger });
  const e = r._unsafeUnwrapErr();
  t.equal(e.code, "connect");
  t.match(e.code === "connect" && e.message, /ENOENT/);
});

t.test("capability probe", async (t) => {
  const vm = await startVm(t);
  const c = await connect(vm.qmpPath);
  t.teardown(() => c.close());
  const caps = (await probeCapabilities(c))._unsafeUnwrap();
  t.same(caps.version, qemuVersionUnderTest());
  t.equal(caps.backupPerf, true, "7.2 and 10.0 have blockdev-backup x-perf");
  t.equal(caps.bitmapInconsistent, true);
  t.equal(caps.exportAllocationDepth, true);
  t.ok(caps.commands.has("block-export-add"));
});

t.test("disk discovery on a VM", async (t) => {
  const vm = await startVm(t, { disks: [{ size: "32M" }, { size: "16M", clusterSize: 131072 }, { size: "8M", format: "raw" }] });
  const c = await connect(vm.qmpPath);
  t.teardown(() => c.close());
  (await c.execute("block-dirty-bitmap-add", { node: vm.disks[0]!.node, name: "c1", persistent: true }))._unsafeUnwrap();
  (await c.execute("block-dirty-bitmap-add", { node: vm.disks[0]!.node, name: "tmp", disabled: true }))._unsafeUnwrap();
  await vm.write(0, 0xab, 0, 100_000);
  const disks = (await discoverDisks(c))._unsafeUnwrap();
  t.same(
    disks.map((d) => [d.name, d.nodeName, d.format, d.virtualSize]),
    [
      ["vda", "drive-vda", "qcow2", 32 << 20],
      ["vdb", "drive-vdb", "qcow2", 16 << 20],
      ["vdc", "drive-vdc", "raw", 8 << 20],
    ],
  );
  t.equal(disks[0]!.file, vm.disks[0]!.path);
  t.equal(disks[1]!.clusterSize, 131072);
  t.equal(disks[0]!.qdev, "/machine/peripheral/vda/virtio-backend");
  const bm = new Map(disks[0]!.bitmaps.map((b) => [b.name, b]));
  t.match(bm.get("c1"), { persistent: true, recording: true, busy: false, granularity: 65536, count: 131072, inconsistent: false });
  t.match(bm.get("tmp"), { persistent: false, recording: false, count: 0 });
});

t.test("disk discovery on qemu-storage-daemon names disks by node", async (t) => {
  const qsd = await startStorageDaemon(t, { disks: [{ size: "16M" }, { size: "8M" }] });
  const c = await connect(qsd.qmpPath);
  t.teardown(() => c.close());
  const disks = (await discoverDisks(c))._unsafeUnwrap();
  t.same(
    disks.map((d) => [d.name, d.nodeName, d.qdev]),
    [
      ["disk0", "disk0", undefined],
      ["disk1", "disk1", undefined],
    ],
  );
});

t.test("supervisor reconnects after QEMU restarts", async (t) => {
  const vm = await startVm(t);
  const events: string[] = [];
  let resolveConnected: (() => void) | undefined;
  const nextConnect = () =>
    new Promise<void>((r) => {
      resolveConnected = r;
    });
  let waiting = nextConnect();
  const sup = new QmpSupervisor(
    { path: vm.qmpPath },
    {
      connected: () => {
        events.push("up");
        resolveConnected?.();
      },
      disconnected: (i) => events.push(`down:${i.cause}`),
    },
    { logger: silentLogger },
    { initialDelayMs: 20, maxDelayMs: 200 },
  );
  t.teardown(() => sup.stop());
  sup.start();
  await waiting;
  waiting = nextConnect();
  const images = vm.disks.map((d) => d.path);
  await vm.kill();
  await startVm(t, { images, dir: vm.dir });
  await waiting;
  t.same(events, ["up", "down:peer", "up"]);
  const r = await sup.client!.execute("query-status");
  t.ok(r.isOk(), "the new connection works");
});

t.test("a command error leaves the connection as it was: running, nothing pending, the next command answered", async (t) => {
  const vm = await startVm(t);
  const c = await connect(vm.qmpPath);
  t.teardown(() => c.close());
  const e: QmpError = (await c.execute("block-dirty-bitmap-add", { node: "nope", name: "x" }))._unsafeUnwrapErr();
  t.equal(e.code, "command");
  t.equal(c.runstate, "running", "a QEMU error is an answer, not a reason to close");
  t.equal(c.inFlight, 0);
  t.same((await c.execute("query-status"))._unsafeUnwrap().status, "prelaunch", "the next command is answered");
});
