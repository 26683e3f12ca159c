/**
 * Replies of the wrong shape (src/qmp/shapes.ts). A fake peer answers
 * nonsense, which real QEMU never does: every typed command, and every
 * function of the QMP layer that reads a reply, must fail with a `protocol`
 * error and a closed connection, never throw. Real QEMU's own replies (the
 * QEMU under test, 7.2 or 10.0) must all pass.
 */
import net from "node:net";
import { join } from "node:path";
import type { Result } from "neverthrow";
import t from "tap";
import { claimQemu } from "../../src/daemon/ownership.js";
import {
  type DiskInfo,
  discoverDisks,
  disksInIothreads,
  disksWithFuseExports,
  hmp,
  probeCapabilities,
  QmpClient,
  type QmpCommandName,
  type QmpError,
} from "../../src/qmp/index.js";
import { REPLY_SHAPES, replyShapeError } from "../../src/qmp/shapes.js";
import { type FakeCommand, GREETING, reply, startFakeQmp } from "../helpers/fake-qmp.js";
import { mulberry32, nonsense, READ_COMMANDS, SAMPLES } from "../helpers/nonsense.js";
import { createImage, silentLogger, startVm, tempDir } from "../helpers/qemu.js";

const unhandled: unknown[] = [];
process.on("unhandledRejection", (e) => unhandled.push(e));
process.on("uncaughtException", (e) => unhandled.push(e));

const DISK: DiskInfo = {
  name: "vda",
  nodeName: "drive-vda",
  qdev: "/machine/peripheral/vda/virtio-backend",
  file: "/x.qcow2",
  format: "qcow2",
  virtualSize: 1 << 20,
  clusterSize: 65536,
  readOnly: false,
  hasBacking: false,
  bitmaps: [],
  below: [],
};

/** Everything the QMP layer (and the daemon's claim) does with a connection's replies, as Results. */
const CONSUMERS: Record<string, (c: QmpClient) => Promise<Result<unknown, unknown>>> = {
  probeCapabilities: async (c) => probeCapabilities(c),
  discoverDisks: async (c) => discoverDisks(c),
  disksInIothreads: async (c) => disksInIothreads(c, [DISK]),
  disksWithFuseExports: async (c) => disksWithFuseExports(c, [DISK]),
  claimQemu: async (c) => claimQemu(c, "vm1", () => undefined),
  hmp: async (c) => hmp(c, "info block"),
};

/** The close's cause, or "still open" after `ms`. */
async function closedWithin(c: QmpClient, ms = 2000): Promise<string> {
  let timer: NodeJS.Timeout | undefined;
  const open = new Promise<string>((r) => {
    timer = setTimeout(() => r("still open"), ms);
  });
  const cause = await Promise.race([c.closed.then((i) => i.cause), open]);
  clearTimeout(timer);
  return cause;
}

async function connect(path: string): Promise<QmpClient> {
  return (await QmpClient.connect({ path }, { logger: silentLogger }))._unsafeUnwrap();
}

t.test('a peer answering {"return": {}} to everything', async (t) => {
  const peer = await startFakeQmp(t, (cmd, p) => p.write(reply(cmd.id, {})));
  for (const command of READ_COMMANDS) {
    const c = await connect(peer.path);
    const r = await c.execute(command as "query-jobs");
    const e = r.isErr() ? r.error : undefined;
    t.equal(e?.code, "protocol", `${command}: a protocol error`);
    t.match(e?.code === "protocol" && e.message, new RegExp(`${command} answered .*: return`));
    t.equal(await closedWithin(c), "protocol", `${command}: the connection is closed`);
    await c.close();
  }
  for (const [name, run] of Object.entries(CONSUMERS)) {
    const c = await connect(peer.path);
    let r: Result<unknown, unknown> | undefined;
    try {
      r = await run(c);
    } catch (e) {
      t.fail(`${name} threw: ${(e as Error).stack}`);
    }
    t.ok(r?.isErr(), `${name} fails`);
    await c.close();
  }
  // the probe's own error is the protocol error
  const c = await connect(peer.path);
  const p = await probeCapabilities(c).then(
    (x) => x,
    (e: unknown) => e,
  );
  t.equal((p as { error?: QmpError }).error?.code, "protocol", "probeCapabilities: protocol error, no throw");
  t.same(unhandled, []);
});

t.test("commands without a return value accept {} and refuse a non-object", async (t) => {
  t.equal(replyShapeError("blockdev-add", {}), undefined);
  t.match(replyShapeError("blockdev-add", 5), /expected an object, got a number/);
  t.equal(replyShapeError("qom-get", null), undefined, "qom-get: any property value");
  for (const command of Object.keys(REPLY_SHAPES) as QmpCommandName[]) {
    if ((READ_COMMANDS as readonly string[]).includes(command) || command === "qom-get") continue;
    t.equal(replyShapeError(command, {}), undefined, `${command}: {}`);
    t.ok(replyShapeError(command, []) !== undefined, `${command}: [] refused`);
  }
});

t.test("the samples fit their shapes", async (t) => {
  for (const [command, value] of Object.entries(SAMPLES)) t.equal(replyShapeError(command as QmpCommandName, value), undefined, command);
});

t.test("fuzz: replies of random wrong types and missing members never throw", async (t) => {
  const seed = Number(process.env.QBACKUPD_FUZZ_SEED ?? 20261202);
  const rnd = mulberry32(seed);
  const seen: unknown[] = [];
  const peer = await startFakeQmp(t, (cmd: FakeCommand, p) => {
    const v = nonsense(cmd.execute, rnd);
    seen.push(v);
    p.write(reply(cmd.id, v));
  });
  const names = Object.keys(CONSUMERS);
  const rounds = 300;
  let failed = 0;
  for (let i = 0; i < rounds; i++) {
    const name = names[i % names.length]!;
    const c = await connect(peer.path);
    try {
      const r = await CONSUMERS[name]!(c);
      if (r.isErr()) failed++;
    } catch (e) {
      t.fail(`seed ${seed} round ${i}: ${name} threw after replies ${JSON.stringify(seen.slice(-6))}: ${(e as Error).stack}`);
    }
    // every typed command too, one per round, straight at the client
    const command = READ_COMMANDS[i % READ_COMMANDS.length]!;
    if (c.runstate === "running") {
      const r = await c.execute(command as "query-jobs");
      const v = seen.at(-1);
      const verdict = replyShapeError(command, v);
      t.equal(r.isErr(), verdict !== undefined, `${command} ${JSON.stringify(v)}: refused exactly when the shape is wrong`);
      if (r.isErr()) t.equal(r.error.code, "protocol");
    }
    await c.close();
  }
  t.ok(seen.length >= rounds, `${seen.length} nonsense replies`);
  t.ok(failed > rounds / 2, `most rounds fail cleanly (${failed}/${rounds})`);
  await new Promise((r) => setTimeout(r, 20));
  t.same(unhandled, [], "no unhandled rejection or exception");
});

t.test("real QEMU's replies all pass", async (t) => {
  const dir = tempDir(t);
  const base = join(dir, "base.qcow2");
  await createImage(base, "16M");
  const top = join(dir, "top.qcow2");
  await createImage(top, "16M", "qcow2", ["-b", base, "-F", "qcow2"]);
  const vm = await startVm(t, {
    disks: [{ size: "16M", iothread: "io0" }],
    extraArgs: [
      "-blockdev",
      JSON.stringify({ "node-name": "spare", driver: "qcow2", file: { driver: "file", filename: top } }),
      "-object",
      "secret,id=qbk-owner-x,data=x",
    ],
  });
  const m = vm.monitor;
  const node = vm.disks[0]!.node;
  (await m.execute("block-dirty-bitmap-add", { node, name: "b1", persistent: true }))._unsafeUnwrap();
  (await m.execute("block-dirty-bitmap-add", { node, name: "b2", disabled: true }))._unsafeUnwrap();
  (await m.execute("nbd-server-start", { addr: { type: "unix", data: { path: join(dir, "nbd.sock") } } }))._unsafeUnwrap();
  (await m.execute("block-export-add", { type: "nbd", id: "e1", "node-name": node, bitmaps: ["b2"] }))._unsafeUnwrap();
  const target = join(dir, "t.qcow2");
  await createImage(target, "16M");
  (await m.execute("blockdev-add", { driver: "qcow2", "node-name": "t", file: { driver: "file", filename: target } }))._unsafeUnwrap();
  (await m.execute("blockdev-backup", { "job-id": "j1", device: node, target: "t", sync: "full", speed: 1 }))._unsafeUnwrap();
  // straight through the client: each reply is checked against its shape
  for (const command of READ_COMMANDS) {
    if (command === "qom-list" || command === "human-monitor-command") continue;
    const r = await m.execute(command as "query-jobs");
    t.ok(r.isOk(), `${command}: ${r.isErr() ? JSON.stringify(r.error) : "passes"}`);
  }
  t.ok((await m.execute("query-named-block-nodes", { flat: true })).isOk(), "query-named-block-nodes flat");
  t.ok((await m.execute("qom-list", { path: "/objects" })).isOk(), "qom-list");
  t.ok((await m.execute("human-monitor-command", { "command-line": "info block" })).isOk(), "human-monitor-command");
  for (const [name, run] of Object.entries(CONSUMERS)) {
    if (name === "claimQemu") continue; // leaves a marker; the daemon tests cover it
    const r = await run(m);
    t.ok(r.isOk(), `${name} on real QEMU`);
  }
  t.ok((await m.execute("block-job-cancel", { device: "j1", force: true })).isOk());
  t.equal(m.runstate, "running");
});

t.test("an event whose data is of the wrong shape is a protocol error; well-formed ones pass", async (t) => {
  const ev = (event: string, data: unknown) => `${JSON.stringify({ event, data, timestamp: { seconds: 1, microseconds: 2 } })}\r\n`;
  const peer = await startFakeQmp(t, (cmd, p) => {
    if (cmd.execute === "good") p.write(ev("JOB_STATUS_CHANGE", { id: "j1", status: "concluded" }) + reply(cmd.id, {}));
    if (cmd.execute === "unknown") p.write(ev("constructor", { x: 1 }) + ev("X_FUTURE", 5) + reply(cmd.id, {}));
    if (cmd.execute === "bad") p.write(ev("JOB_STATUS_CHANGE", { id: 5, status: "concluded" }) + reply(cmd.id, {}));
  });
  const c = await connect(peer.path);
  const l = c.listen(["JOB_STATUS_CHANGE"]);
  t.ok((await c.executeRaw("good")).isOk());
  t.same((await l.next(1000))?.data, { id: "j1", status: "concluded" }, "a well-formed event is delivered");
  t.ok((await c.executeRaw("unknown")).isOk(), "events nobody types are left alone");
  const r = await c.executeRaw("bad");
  t.equal(r.isErr() && r.error.code, "disconnected", "the pending command fails with the connection");
  t.equal(await l.next(1000), undefined, "the malformed event is not delivered; the listener is closed");
  t.equal(await closedWithin(c), "protocol");
  t.match((await c.closed).message, /JOB_STATUS_CHANGE event of the wrong shape: data\.id: expected a string, got a number/);
});

t.test("a wrong answer to qmp_capabilities fails the connect", async (t) => {
  const path = join(tempDir(t), "caps.sock");
  const server = net.createServer((sock) => {
    sock.on("error", () => {});
    sock.write(GREETING);
    sock.setEncoding("utf8").on("data", (d: string) => {
      const cmd = JSON.parse(d.split("\n")[0]!) as FakeCommand;
      sock.write(reply(cmd.id, [1, 2]));
    });
  });
  await new Promise<void>((r) => server.listen(path, r));
  t.teardown(() => new Promise<void>((r) => server.close(() => r())));
  const r = await QmpClient.connect({ path }, { logger: silentLogger });
  if (r.isOk()) await r.value.close();
  const e = r.isErr() ? r.error : undefined;
  t.equal(e?.code, "connect");
  t.match(
    e?.code === "connect" && e.message,
    /qmp_capabilities answered with a reply of the wrong shape: return: expected an object, got an array/,
  );
});
