/**
 * QMP wire messages as a discriminated union, and the pure functions that
 * parse a received line into one and serialize a command. No I/O here.
 * (Compare pg-protocol's messages.ts / parser.ts split.)
 */
import { err, ok, type Result } from "neverthrow";

export interface QmpVersion {
  readonly qemu: { readonly major: number; readonly minor: number; readonly micro: number };
  readonly package: string;
}

export interface QmpTimestamp {
  readonly seconds: number;
  readonly microseconds: number;
}

export interface GreetingMessage {
  readonly kind: "greeting";
  readonly version: QmpVersion;
  readonly capabilities: readonly string[];
}

export interface ReturnMessage {
  readonly kind: "return";
  readonly id: string | undefined;
  readonly value: unknown;
}

export interface ErrorMessage {
  readonly kind: "error";
  readonly id: string | undefined;
  readonly errorClass: string;
  readonly desc: string;
}

export interface EventMessage {
  readonly kind: "event";
  readonly event: string;
  readonly data: Readonly<Record<string, unknown>>;
  readonly timestamp: QmpTimestamp;
}

export type QmpInbound = GreetingMessage | ReturnMessage | ErrorMessage | EventMessage;

export interface MalformedMessage {
  readonly code: "malformed";
  readonly reason: string;
  /** The first bytes of the offending line, for the log. */
  readonly excerpt: string;
}

const EXCERPT = 200;

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function malformed(reason: string, line: string): Result<never, MalformedMessage> {
  return err({ code: "malformed", reason, excerpt: line.slice(0, EXCERPT) });
}

function parseId(v: unknown): string | undefined {
  if (typeof v === "string") return v;
  if (typeof v === "number") return String(v);
  return undefined;
}

/** Parse one received line. Anything that is not one of the four shapes is malformed. */
export function parseInbound(line: string): Result<QmpInbound, MalformedMessage> {
  let msg: unknown;
  try {
    msg = JSON.parse(line);
  } catch {
    return malformed("invalid JSON", line);
  }
  if (!isObject(msg)) return malformed("not a JSON object", line);

  if ("return" in msg) {
    return ok({ kind: "return", id: parseId(msg.id), value: msg.return });
  }
  if ("error" in msg) {
    const e = msg.error;
    if (!isObject(e) || typeof e.class !== "string" || typeof e.desc !== "string") {
      return malformed("error without class/desc", line);
    }
    return ok({ kind: "error", id: parseId(msg.id), errorClass: e.class, desc: e.desc });
  }
  if ("event" in msg) {
    const ts = msg.timestamp;
    if (typeof msg.event !== "string" || !isObject(ts)) return malformed("event without name/timestamp", line);
    const data = isObject(msg.data) ? msg.data : {};
    return ok({
      kind: "event",
      event: msg.event,
      data,
      timestamp: { seconds: Number(ts.seconds), microseconds: Number(ts.microseconds) },
    });
  }
  if ("QMP" in msg) {
    const g = msg.QMP;
    if (!isObject(g) || !isObject(g.version) || !isObject(g.version.qemu)) {
      return malformed("greeting without version", line);
    }
    const q = g.version.qemu;
    return ok({
      kind: "greeting",
      version: {
        qemu: { major: Number(q.major), minor: Number(q.minor), micro: Number(q.micro) },
        package: typeof g.version.package === "string" ? g.version.package : "",
      },
      capabilities: Array.isArray(g.capabilities) ? g.capabilities.filter((c) => typeof c === "string") : [],
    });
  }
  return malformed("unknown message type", line);
}

/** Serialize one command with its correlation id, newline-terminated. */
export function serializeCommand(id: string | number, command: string, args?: object): string {
  return args === undefined
    ? `{"execute":${JSON.stringify(command)},"id":${JSON.stringify(id)}}\n`
    : `{"execute":${JSON.stringify(command)},"arguments":${JSON.stringify(args)},"id":${JSON.stringify(id)}}\n`;
}
