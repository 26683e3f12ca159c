/**
 * A fake QEMU guest agent speaking the real qemu-ga protocol (no guest OS
 * runs in tests): guest-sync-delimited answers with a 0xFF byte first, a
 * leading 0xFF from the client resets the parser, fsfreeze keeps state.
 */
import net from "node:net";
import { join } from "node:path";
import { type Teardown, tempDir } from "./qemu.js";

export interface FakeAgent {
  readonly path: string;
  /** Every command name received, in order (guest-sync-delimited included). */
  readonly log: string[];
  state: "thawed" | "frozen";
  /** Make the next freeze fail with this desc. */
  failFreeze: string | undefined;
  /** Runs when a freeze arrives, before the agent answers (to act "while frozen"). */
  onFreeze: (() => Promise<void>) | undefined;
}

export async function startFakeAgent(t: Teardown, opts: { staleBytes?: string } = {}): Promise<FakeAgent> {
  const path = join(tempDir(t), "qga.sock");
  const agent: FakeAgent = { path, log: [], state: "thawed", failFreeze: undefined, onFreeze: undefined };
  let busy: Promise<void> | undefined;
  const server = net.createServer((sock) => {
    sock.on("error", () => {});
    if (opts.staleBytes) sock.write(opts.staleBytes); // output left over from an earlier client
    let buf = "";
    sock.on("data", (d: Buffer) => {
      buf += d.toString("latin1");
      const ff = buf.lastIndexOf("\xff");
      if (ff !== -1) buf = buf.slice(ff + 1);
      let nl = buf.indexOf("\n");
      while (nl !== -1) {
        const msg = JSON.parse(buf.slice(0, nl)) as { execute: string; arguments?: { id?: number } };
        buf = buf.slice(nl + 1);
        nl = buf.indexOf("\n");
        agent.log.push(msg.execute);
        const send = (o: unknown) => sock.write(`${JSON.stringify(o)}\n`);
        switch (msg.execute) {
          case "guest-sync-delimited":
            // qemu-ga runs one command at a time: a freeze in progress holds up every client's sync
            void (busy ?? Promise.resolve()).then(() => {
              sock.write(Buffer.from([0xff]));
              send({ return: msg.arguments?.id });
            });
            break;
          case "guest-fsfreeze-freeze":
            if (agent.onFreeze !== undefined) {
              const hook = agent.onFreeze;
              agent.onFreeze = undefined;
              busy = hook().then(() => {
                agent.state = "frozen";
                send({ return: 2 });
                busy = undefined;
              });
            } else if (agent.failFreeze !== undefined) {
              send({ error: { class: "GenericError", desc: agent.failFreeze } });
              agent.failFreeze = undefined;
            } else {
              agent.state = "frozen";
              send({ return: 2 });
            }
            break;
          case "guest-fsfreeze-thaw":
            agent.state = "thawed";
            send({ return: 2 });
            break;
          case "guest-fsfreeze-status":
            send({ return: agent.state });
            break;
          default:
            send({ error: { class: "CommandNotFound", desc: `The command ${msg.execute} has not been found` } });
        }
      }
    });
  });
  await new Promise<void>((r) => server.listen(path, r));
  t.teardown(() => new Promise<void>((r) => server.close(() => r())));
  return agent;
}
