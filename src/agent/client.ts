/**
 * A QEMU guest agent client (qemu-ga over a virtio-serial unix socket), for
 * quiescing guest filesystems around checkpoint and backup transactions.
 *
 * The agent protocol has no ids: one command at a time, replies in order.
 * After connecting we resynchronise with guest-sync-delimited: the agent
 * answers with a 0xFF byte before the reply. Output left for an earlier
 * client comes first, and may itself be a delimited sync reply (a client that
 * sent guest-sync-delimited and left before the answer gets its answer
 * delivered to the next client): every reply is skipped until the one that
 * echoes the id we sent.
 *
 * A timed-out or garbled exchange closes the connection: a late reply would
 * be taken for the answer to the next command, and QEMU's chardev serves one
 * client at a time, so a connection kept open blocks every later one.
 */
import net from "node:net";
import { err, ok, type Result, ResultAsync } from "neverthrow";
import { LineSplitter } from "../qmp/framing.js";

export type AgentError =
  | { readonly code: "agent-unavailable"; readonly message: string }
  | { readonly code: "agent-timeout"; readonly command: string; readonly timeoutMs: number }
  | { readonly code: "agent-command"; readonly command: string; readonly errorClass: string; readonly desc: string }
  | { readonly code: "agent-protocol"; readonly message: string };

export type FsfreezeStatus = "thawed" | "frozen";

const MAX_LINE = 1024 * 1024;

export class GuestAgentClient {
  private splitter = new LineSplitter(MAX_LINE);
  /** While resynchronising: the id our guest-sync-delimited carries; other replies are stale. */
  private syncId: number | undefined;
  private waiter: ((r: Result<unknown, AgentError>) => void) | undefined;
  private queue: Promise<unknown> = Promise.resolve();
  private closedWith: string | undefined;
  private currentCommand = "";

  private constructor(private readonly sock: net.Socket) {
    sock.on("data", (b: Buffer) => this.onData(b));
    sock.on("error", (e) => this.fail(`socket error: ${e.message}`));
    sock.on("close", () => this.fail("agent closed the connection"));
  }

  static connect(path: string, timeoutMs = 5_000): ResultAsync<GuestAgentClient, AgentError> {
    const p = new Promise<Result<GuestAgentClient, AgentError>>((resolve) => {
      const sock = net.createConnection(path);
      const timer = setTimeout(() => {
        sock.destroy();
        resolve(err({ code: "agent-unavailable", message: `guest agent at ${path}: no connection within ${timeoutMs} ms` }));
      }, timeoutMs);
      sock.once("error", (e) => {
        clearTimeout(timer);
        resolve(err({ code: "agent-unavailable", message: `guest agent at ${path}: ${e.message}` }));
      });
      sock.once("connect", () => {
        clearTimeout(timer);
        sock.removeAllListeners("error");
        resolve(ok(new GuestAgentClient(sock)));
      });
    });
    return new ResultAsync(p).andThen((c) =>
      c
        .sync(timeoutMs)
        .map(() => c)
        .mapErr((e) => {
          // a connection left open would hold the agent's only client slot
          c.close();
          return e;
        }),
    );
  }

  /** guest-sync-delimited with a random id; replies are skipped until one echoes it. */
  sync(timeoutMs = 5_000): ResultAsync<void, AgentError> {
    const id = Math.floor(Math.random() * 2 ** 31);
    this.syncId = id;
    // A leading 0xFF makes the agent drop any partial input left by an earlier client.
    this.sock.write(Buffer.from([0xff]));
    return this.command("guest-sync-delimited", { id }, timeoutMs).andThen((r) =>
      r === id
        ? ok(undefined)
        : err<never, AgentError>({ code: "agent-protocol", message: `guest-sync-delimited answered ${JSON.stringify(r)}, expected ${id}` }),
    );
  }

  freeze(timeoutMs = 60_000): ResultAsync<number, AgentError> {
    return this.command("guest-fsfreeze-freeze", undefined, timeoutMs).map((n) => Number(n));
  }

  thaw(timeoutMs = 60_000): ResultAsync<number, AgentError> {
    return this.command("guest-fsfreeze-thaw", undefined, timeoutMs).map((n) => Number(n));
  }

  status(timeoutMs = 5_000): ResultAsync<FsfreezeStatus, AgentError> {
    return this.command("guest-fsfreeze-status", undefined, timeoutMs).map((s) => (s === "frozen" ? "frozen" : "thawed"));
  }

  close(): void {
    this.fail("connection closed by us");
    this.sock.destroy();
  }

  /** Serialised: the agent protocol has no ids, so never two commands outstanding. */
  command(name: string, args: object | undefined, timeoutMs: number): ResultAsync<unknown, AgentError> {
    const run = (): Promise<Result<unknown, AgentError>> =>
      new Promise((resolve) => {
        if (this.closedWith !== undefined) {
          resolve(err({ code: "agent-unavailable", message: this.closedWith }));
          return;
        }
        const timer = setTimeout(() => {
          this.waiter = undefined;
          // its reply may still come, and be read as the next command's: start over on a new connection
          this.close();
          resolve(err({ code: "agent-timeout", command: name, timeoutMs }));
        }, timeoutMs);
        this.waiter = (r) => {
          clearTimeout(timer);
          this.waiter = undefined;
          // an answer we cannot read leaves us out of step with the agent
          if (r.isErr() && r.error.code === "agent-protocol") this.close();
          resolve(r);
        };
        this.currentCommand = name;
        const msg = args === undefined ? { execute: name } : { execute: name, arguments: args };
        this.sock.write(`${JSON.stringify(msg)}\n`);
      });
    const p = this.queue.then(run);
    this.queue = p;
    return new ResultAsync(p);
  }

  private onData(b: Buffer): void {
    const lines = this.splitter.push(b.toString("utf8"));
    if (lines.isErr()) {
      this.fail("agent sent an over-long line");
      return;
    }
    for (const line of lines.value) this.onLine(line);
  }

  private onLine(raw: string): void {
    const w = this.waiter;
    if (w === undefined) return; // nothing asked: stale output
    let line = raw;
    if (this.syncId !== undefined) {
      // 0xFF (decoded as U+FFFD) delimits a sync reply; what comes before it is an earlier client's partial output
      line = line.slice(line.lastIndexOf("\uFFFD") + 1);
      let reply: unknown;
      try {
        reply = JSON.parse(line);
      } catch {
        return; // stale garbage
      }
      if (typeof reply !== "object" || reply === null || (reply as { return?: unknown }).return !== this.syncId) return; // stale reply
      this.syncId = undefined;
      w(ok((reply as { return: unknown }).return));
      return;
    }
    let msg: unknown;
    try {
      msg = JSON.parse(line);
    } catch {
      w(err({ code: "agent-protocol", message: `invalid JSON from agent: ${line.slice(0, 100)}` }));
      return;
    }
    if (typeof msg === "object" && msg !== null && "return" in msg) {
      w(ok((msg as { return: unknown }).return));
    } else if (typeof msg === "object" && msg !== null && "error" in msg) {
      const e = (msg as { error: { class?: unknown; desc?: unknown } }).error;
      w(err({ code: "agent-command", command: this.currentCommand, errorClass: String(e.class), desc: String(e.desc) }));
    } else {
      w(err({ code: "agent-protocol", message: `unexpected message from agent: ${line.slice(0, 100)}` }));
    }
  }

  private fail(message: string): void {
    if (this.closedWith !== undefined) return;
    this.closedWith = message;
    this.waiter?.(err({ code: "agent-unavailable", message }));
  }
}
