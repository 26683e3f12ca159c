/**
 * Guest agent client against a fake agent that speaks qemu-ga's protocol,
 * and quiesce against the real qemu-ga in a Linux guest for the faults only a
 * real agent and QEMU's one-client chardev produce.
 */
import net from "node:net";
import { okAsync } from "neverthrow";
import t from "tap";
import { GuestAgentClient } from "../../src/agent/client.js";
import { withFrozenGuest } from "../../src/agent/quiesce.js";
import { startFakeAgent } from "../helpers/fake-agent.js";
import { startGuest } from "../helpers/guest.js";
import { silentLogger } from "../helpers/qemu.js";

t.test("sync, freeze, status, thaw", async (t) => {
  const agent = await startFakeAgent(t, { staleBytes: '{"return": 12345}\n' });
  const c = (await GuestAgentClient.connect(agent.path))._unsafeUnwrap();
  t.teardown(() => c.close());
  t.equal((await c.status())._unsafeUnwrap(), "thawed");
  t.equal((await c.freeze())._unsafeUnwrap(), 2);
  t.equal((await c.status())._unsafeUnwrap(), "frozen");
  t.equal((await c.thaw())._unsafeUnwrap(), 2);
  t.same(agent.log, [
    "guest-sync-delimited",
    "guest-fsfreeze-status",
    "guest-fsfreeze-freeze",
    "guest-fsfreeze-status",
    "guest-fsfreeze-thaw",
  ]);
});

t.test("agent errors are typed", async (t) => {
  const agent = await startFakeAgent(t);
  const c = (await GuestAgentClient.connect(agent.path))._unsafeUnwrap();
  t.teardown(() => c.close());
  agent.failFreeze = "fsfreeze is not supported";
  const e = (await c.freeze())._unsafeUnwrapErr();
  t.same(e, { code: "agent-command", command: "guest-fsfreeze-freeze", errorClass: "GenericError", desc: "fsfreeze is not supported" });
});

t.test("no agent: agent-unavailable", async (t) => {
  const e = (await GuestAgentClient.connect("/nonexistent/qga.sock", 500))._unsafeUnwrapErr();
  t.equal(e.code, "agent-unavailable");
});

t.test("a command that times out closes the connection", async (t) => {
  const agent = await startFakeAgent(t);
  const c = (await GuestAgentClient.connect(agent.path))._unsafeUnwrap();
  t.teardown(() => c.close());
  agent.onFreeze = () => new Promise((r) => setTimeout(r, 300));
  t.equal((await c.freeze(50))._unsafeUnwrapErr().code, "agent-timeout");
  // the freeze's late answer must not be taken for the status's
  t.equal((await c.status())._unsafeUnwrapErr().code, "agent-unavailable");
});

t.test("with the real qemu-ga in a Linux guest", async (t) => {
  const g = await startGuest(t);
  const frozenAction = () => okAsync("done");

  t.test("a quiesce that timed out behind another client leaves the agent usable", async (t) => {
    const other = net.createConnection(g.agentPath);
    await new Promise((r) => other.once("connect", r));
    other.write('\xff{"execute":"guest-sync-delimited","arguments":{"id":7}}\n', "latin1");
    await new Promise<void>((r) => {
      let got = "";
      other.on("data", (d: Buffer) => {
        got += d.toString("latin1");
        if (got.includes('"return": 7')) r();
      });
    });
    const first = await withFrozenGuest(g.agentPath, silentLogger, frozenAction);
    t.match(first._unsafeUnwrapErr(), { stage: "freeze", error: { code: "agent-timeout" } }, "blocked by the other client");
    other.destroy();
    await new Promise((r) => setTimeout(r, 200));
    const second = await withFrozenGuest(g.agentPath, silentLogger, frozenAction);
    t.equal(second._unsafeUnwrap(), "done", "once the other client left");
  });

  t.test("a sync reply left for an earlier client is skipped", async (t) => {
    // a client that asks guest-sync-delimited and leaves before the answer: qemu-ga gives the answer to the next client
    const early = net.createConnection(g.agentPath);
    await new Promise((r) => early.once("connect", r));
    await new Promise<void>((r) => early.end(Buffer.from('\xff{"execute":"guest-sync-delimited","arguments":{"id":41}}\n', "latin1"), r));
    early.destroy();
    await new Promise((r) => setTimeout(r, 300));
    const r = await withFrozenGuest(g.agentPath, silentLogger, frozenAction);
    t.equal(r._unsafeUnwrap(), "done");
  });

  t.test("a guest another client froze is not thawed by a failed quiesce", async (t) => {
    const other = (await GuestAgentClient.connect(g.agentPath))._unsafeUnwrap();
    t.equal((await other.freeze())._unsafeUnwrap(), 1);
    other.close();
    await new Promise((r) => setTimeout(r, 200));
    const r = await withFrozenGuest(g.agentPath, silentLogger, frozenAction);
    t.match(r._unsafeUnwrapErr(), { stage: "freeze", error: { code: "agent-command", desc: /frozen state/ } });
    const check = (await GuestAgentClient.connect(g.agentPath))._unsafeUnwrap();
    t.teardown(() => check.close());
    t.equal((await check.status())._unsafeUnwrap(), "frozen", "still the other client's freeze");
    t.equal((await check.thaw())._unsafeUnwrap(), 1);
  });
});

t.test("a freeze of ours that timed out is thawed once the agent answers again", async (t) => {
  const agent = await startFakeAgent(t);
  agent.onFreeze = () => new Promise((r) => setTimeout(r, 500));
  let ran = false;
  const r = await withFrozenGuest(
    agent.path,
    silentLogger,
    () => {
      ran = true;
      return okAsync(1);
    },
    { freezeTimeoutMs: 100 },
  );
  t.equal(r.isErr() && r.error.stage === "freeze" && r.error.error.code, "agent-timeout");
  t.notOk(ran, "the action did not run unfrozen");
  t.equal(agent.state, "thawed", "the freeze completed late and was thawed");
  t.equal(agent.log.filter((c) => c === "guest-fsfreeze-thaw").length, 1);
});
