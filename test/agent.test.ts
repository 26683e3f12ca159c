/** Guest agent client against a fake agent that speaks qemu-ga's protocol. */
import t from "tap";
import { GuestAgentClient } from "../src/agent/client.js";
import { startFakeAgent } from "./helpers/fake-agent.js";

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
