/**
 * A fake QMP peer, only for faults real QEMU cannot be made to produce:
 * garbage lines, over-long lines, replies split or merged at will, a close in
 * the middle of a reply. It greets, accepts qmp_capabilities, then hands each
 * command to a script.
 */
import net from "node:net";
import { join } from "node:path";
import { type Teardown, tempDir } from "./qemu.js";

export const GREETING = '{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "fake"}, "capabilities": []}}\r\n';

export interface FakeCommand {
  readonly execute: string;
  readonly id: string;
  readonly arguments?: Record<string, unknown>;
}

export interface FakePeer {
  readonly path: string;
  /** Raw write to the current connection. */
  write(s: string): void;
  /** Close the current connection from the peer's side. */
  hangup(): void;
  /** Commands received after negotiation. */
  readonly received: FakeCommand[];
  /** The arguments of each qmp_capabilities received. */
  readonly negotiations: (Record<string, unknown> | undefined)[];
}

export async function startFakeQmp(
  t: Teardown,
  onCommand: (cmd: FakeCommand, peer: FakePeer) => void,
  opts: { greeting?: string } = {},
): Promise<FakePeer> {
  const path = join(tempDir(t), "fake-qmp.sock");
  let conn: net.Socket | undefined;
  const peer: FakePeer = {
    path,
    write: (s) => conn?.write(s),
    hangup: () => conn?.destroy(),
    received: [],
    negotiations: [],
  };
  const server = net.createServer((sock) => {
    conn = sock;
    sock.on("error", () => {});
    sock.write(opts.greeting ?? GREETING);
    let buf = "";
    sock.setEncoding("utf8").on("data", (d: string) => {
      buf += d;
      let nl = buf.indexOf("\n");
      while (nl !== -1) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        nl = buf.indexOf("\n");
        const cmd = JSON.parse(line) as FakeCommand;
        if (cmd.execute === "qmp_capabilities") {
          peer.negotiations.push(cmd.arguments);
          sock.write(`{"return": {}, "id": ${JSON.stringify(cmd.id)}}\r\n`);
          continue;
        }
        peer.received.push(cmd);
        onCommand(cmd, peer);
      }
    });
  });
  await new Promise<void>((r) => server.listen(path, r));
  t.teardown(
    () =>
      new Promise<void>((r) => {
        conn?.destroy();
        server.close(() => r());
      }),
  );
  return peer;
}

export function reply(id: string, value: unknown): string {
  return `${JSON.stringify({ return: value, id })}\r\n`;
}
