/** Faults real QEMU will not produce, from a fake QMP peer. */
import { Writable } from "node:stream";
import { pino } from "pino";
import t from "tap";
import { probeCapabilities, QmpClient } from "../../src/qmp/index.js";
import { GREETING, reply, startFakeQmp } from "../helpers/fake-qmp.js";
import { silentLogger } from "../helpers/qemu.js";

const unhandled: unknown[] = [];
process.on("unhandledRejection", (e) => unhandled.push(e));
process.on("uncaughtException", (e) => unhandled.push(e));

function capturingLogger(): { logger: pino.Logger; lines: () => Record<string, unknown>[] } {
  const out: string[] = [];
  const dest = new Writable({
    write(chunk: Buffer, _enc, cb) {
      out.push(chunk.toString());
      cb();
    },
  });
  return {
    logger: pino({ level: "info" }, dest),
    lines: () =>
      out
        .join("")
        .trim()
        .split("\n")
        .filter(Boolean)
        .map((l) => JSON.parse(l) as Record<string, unknown>),
  };
}

t.test("replies split into single bytes and merged into one chunk", async (t) => {
  let held = "";
  const peer = await startFakeQmp(t, (cmd, p) => {
    const n = Number(cmd.arguments?.n ?? 0);
    if (n % 2 === 0) {
      // even: one byte per write
      for (const ch of reply(cmd.id, n)) p.write(ch);
    } else if (n % 4 === 1) {
      held = reply(cmd.id, n); // held back, sent merged with the next odd one
    } else {
      p.write(held + reply(cmd.id, n));
      held = "";
    }
  });
  const c = (await QmpClient.connect({ path: peer.path }, { logger: silentLogger }))._unsafeUnwrap();
  t.teardown(() => c.close());
  const rs = await Promise.all(Array.from({ length: 52 }, (_, n) => c.executeRaw("echo", { n })));
  t.same(
    rs.map((r) => r._unsafeUnwrap()),
    Array.from({ length: 52 }, (_, n) => n),
  );
});

t.test("several messages merged in one write, events interleaved", async (t) => {
  const peer = await startFakeQmp(t, (cmd, p) => {
    if (cmd.execute === "burst") {
      p.write(
        '{"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}\r\n' +
          reply(cmd.id, "a") +
          '{"event": "RESUME", "data": {}, "timestamp": {"seconds": 3, "microseconds": 4}}\r\n',
      );
    }
  });
  const c = (await QmpClient.connect({ path: peer.path }, { logger: silentLogger }))._unsafeUnwrap();
  t.teardown(() => c.close());
  const l = c.listen(["STOP", "RESUME"]);
  t.equal((await c.executeRaw("burst"))._unsafeUnwrap(), "a");
  t.equal((await l.next(1000))?.name, "STOP");
  const r = await l.next(1000);
  t.equal(r?.name, "RESUME");
  t.same(r?.timestamp, { seconds: 3, microseconds: 4 });
});

for (const [name, payload, expect] of [
  ["garbage line", "this is not json\r\n", /invalid JSON/],
  ["JSON that is not a QMP message", '{"hello": "world"}\r\n', /unknown message type/],
  ["reply to an id never sent", '{"return": {}, "id": "zzz"}\r\n', /unknown id/],
  [
    "a second greeting",
    '{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 7}, "package": ""}, "capabilities": []}}\r\n',
    /unexpected greeting/,
  ],
  ["an over-long line", `{"return": "${"x".repeat(5000)}"`, /longer than 4096/],
] as const) {
  t.test(`${name}: protocol error, clean close, pending commands fail`, async (t) => {
    const peer = await startFakeQmp(t, (_cmd, p) => p.write(payload));
    const cap = capturingLogger();
    const c = (await QmpClient.connect({ path: peer.path }, { logger: cap.logger, maxLineBytes: 4096 }))._unsafeUnwrap();
    const r = await c.executeRaw("anything");
    t.equal(r._unsafeUnwrapErr().code, "disconnected");
    const info = await c.closed;
    t.equal(info.cause, "protocol");
    t.match(info.message, expect);
    const logged = cap.lines().find((l) => l.msg === "QMP protocol error; closing the connection");
    t.ok(logged, "logged with pino");
    t.match(String(logged?.reason), expect);
    t.equal(unhandled.length, 0);
  });
}

t.test("peer closes mid-reply", async (t) => {
  const peer = await startFakeQmp(t, (cmd, p) => {
    p.write(`{"return": {"partial": tr`);
    setTimeout(() => p.hangup(), 10);
    void cmd;
  });
  const c = (await QmpClient.connect({ path: peer.path }, { logger: silentLogger }))._unsafeUnwrap();
  const [a, b] = await Promise.all([c.executeRaw("one"), c.executeRaw("two")]);
  t.equal(a._unsafeUnwrapErr().code, "disconnected");
  t.equal(b._unsafeUnwrapErr().code, "disconnected");
  const info = await c.closed;
  t.equal(info.cause, "peer");
  t.match(info.message, /unfinished message/);
});

t.test("a peer that never greets: connect times out", async (t) => {
  const peer = await startFakeQmp(t, () => {}, { greeting: "" });
  const r = await QmpClient.connect({ path: peer.path }, { logger: silentLogger, connectTimeoutMs: 200 });
  const e = r._unsafeUnwrapErr();
  t.equal(e.code, "connect");
  t.match(e.code === "connect" && e.message, /no QMP greeting within 200 ms/);
});

t.test("only capabilities the greeting offers are enabled", async (t) => {
  // a monitor without an I/O thread offers no "oob"; QEMU here always offers it
  const bare = await startFakeQmp(t, () => {});
  const c1 = (await QmpClient.connect({ path: bare.path }, { logger: silentLogger }))._unsafeUnwrap();
  t.teardown(() => c1.close());
  t.same(bare.negotiations, [{}], "nothing offered, nothing asked for");
  t.same(c1.capabilities, []);
  const offering = await startFakeQmp(t, () => {}, {
    greeting: GREETING.replace('"capabilities": []', '"capabilities": ["oob", "x-future"]'),
  });
  const c2 = (await QmpClient.connect({ path: offering.path }, { logger: silentLogger }))._unsafeUnwrap();
  t.teardown(() => c2.close());
  t.same(offering.negotiations, [{ enable: ["oob"] }], "oob when offered; an unknown capability is left alone");
  t.same(c2.capabilities, ["oob"]);
  const declined = (await QmpClient.connect({ path: offering.path }, { logger: silentLogger, oob: false }))._unsafeUnwrap();
  t.teardown(() => declined.close());
  t.same(offering.negotiations.at(-1), {}, "oob: false");
});

t.test("a peer that accepts but never answers: per-command timeout", async (t) => {
  const peer = await startFakeQmp(t, () => {});
  const c = (await QmpClient.connect({ path: peer.path }, { logger: silentLogger, commandTimeoutMs: 100 }))._unsafeUnwrap();
  t.teardown(() => c.close());
  const r = await c.executeRaw("hang");
  t.same(r._unsafeUnwrapErr(), { code: "timeout", command: "hang", timeoutMs: 100 });
  // its late reply is ignored, not a protocol error
  peer.write(reply(peer.received[0]!.id, {}));
  await new Promise((r) => setTimeout(r, 20));
  t.equal(c.runstate, "running");
});

t.test("no unhandled errors overall", async (t) => {
  await new Promise((r) => setTimeout(r, 20));
  t.same(unhandled, []);
});

t.test("a QEMU too old for backups is refused, naming the minimum version", async (t) => {
  const peer = await startFakeQmp(t, (cmd, p) => {
    if (cmd.execute === "query-version") p.write(reply(cmd.id, { qemu: { major: 5, minor: 1, micro: 0 }, package: "old" }));
  });
  const c = (await QmpClient.connect({ path: peer.path }, { logger: silentLogger }))._unsafeUnwrap();
  t.teardown(() => c.close());
  const e = (await probeCapabilities(c))._unsafeUnwrapErr();
  t.equal(e.code, "unsupported");
  t.match(e.code === "unsupported" && e.message, /QEMU 5\.1\.0 is too old: qbackupd needs QEMU 6\.0\.0 or newer/);
});
