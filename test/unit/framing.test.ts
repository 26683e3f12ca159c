/** Framing and message parsing: pure functions, tested exhaustively. */
import t from "tap";
import { LineSplitter } from "../../src/qmp/framing.js";
import { parseInbound, serializeCommand } from "../../src/qmp/messages.js";

const stream =
  '{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian"}, "capabilities": ["oob"]}}\r\n' +
  '{"return": {}, "id": "q1"}\r\n' +
  '{"timestamp": {"seconds": 1700000000, "microseconds": 5}, "event": "JOB_STATUS_CHANGE", "data": {"status": "created", "id": "j"}}\r\n' +
  '{"error": {"class": "GenericError", "desc": "nope"}, "id": "q2"}\r\n';

t.test("split at every byte offset yields the same lines", async (t) => {
  const whole = new LineSplitter(1 << 20).push(stream)._unsafeUnwrap();
  t.equal(whole.length, 4);
  for (let i = 0; i <= stream.length; i++) {
    const s = new LineSplitter(1 << 20);
    const lines = [...s.push(stream.slice(0, i))._unsafeUnwrap(), ...s.push(stream.slice(i))._unsafeUnwrap()];
    if (JSON.stringify(lines) !== JSON.stringify(whole)) {
      t.fail(`split at ${i} differs`);
      return;
    }
  }
  // and one byte at a time
  const s = new LineSplitter(1 << 20);
  const lines: string[] = [];
  for (const ch of stream) lines.push(...s.push(ch)._unsafeUnwrap());
  t.same(lines, whole);
});

t.test("over-long lines are refused, whether finished or not", async (t) => {
  const s = new LineSplitter(10);
  t.same(s.push("0123456789\n")._unsafeUnwrap(), ["0123456789"]);
  t.equal(s.push("0123456789AB\n")._unsafeUnwrapErr().code, "line-too-long");
  const p = new LineSplitter(10);
  t.same(p.push("0123456")._unsafeUnwrap(), [], "a partial line under the limit: no line yet");
  t.equal(p.push("789AB")._unsafeUnwrapErr().code, "line-too-long", "partial line over the limit");
});

t.test("parse the four message kinds", async (t) => {
  const [g, r, e, er] = new LineSplitter(1 << 20)
    .push(stream)
    ._unsafeUnwrap()
    .map((l) => parseInbound(l)._unsafeUnwrap());
  t.match(g, { kind: "greeting", version: { qemu: { major: 7, minor: 2, micro: 22 } }, capabilities: ["oob"] });
  t.same(r, { kind: "return", id: "q1", value: {} });
  t.match(e, { kind: "event", event: "JOB_STATUS_CHANGE", data: { id: "j" }, timestamp: { seconds: 1700000000, microseconds: 5 } });
  t.same(er, { kind: "error", id: "q2", errorClass: "GenericError", desc: "nope" });
});

t.test("malformed input is a typed error", async (t) => {
  for (const bad of ["{", "[]", "42", '"x"', '{"foo": 1}', '{"error": "x"}', '{"event": 5, "timestamp": {}}', '{"QMP": 1}']) {
    const r = parseInbound(bad);
    t.equal(r.isErr() && r.error.code, "malformed", bad);
  }
});

t.test("serialize", async (t) => {
  t.equal(serializeCommand("q1", "query-version"), '{"execute":"query-version","id":"q1"}\n');
  t.same(JSON.parse(serializeCommand("q2", "x", { a: "\n" })), { execute: "x", arguments: { a: "\n" }, id: "q2" });
});
