/**
 * The shape each typed command's reply (and typed event's data) must have
 * before anyone reads it.
 *
 * QmpCommandMap (qapi.ts) says what QEMU answers and QmpEventMap what its
 * events carry; a peer that is not QEMU, or is broken, may send anything
 * (`{"return": {}}` to query-qmp-schema once crashed the daemon in the
 * capability probe). QmpClient.execute checks every reply against the shape
 * here and fails the command with a `protocol` error (and closes the
 * connection) when it does not fit; an event of a typed name whose data does
 * not fit closes the connection too.
 *
 * Only what qbackupd reads is checked: a member nobody reads is left alone,
 * so a QEMU that drops or adds members we ignore still passes (7.2 and 10.0
 * replies are checked by the real-QEMU tests). Code that starts reading a
 * member of a reply must add it here. Enum-typed members are checked as
 * strings, not against a list: a newer QEMU may add values. Pure functions,
 * no I/O; a check never throws and never recurses into the peer's nesting.
 */
import type { QmpCommandName, QmpEventMap } from "./qapi.js";

/** Undefined when `v` fits; else what is wrong, and where (`path`). */
export type Shape = (v: unknown, path: string) => string | undefined;

function describe(v: unknown): string {
  if (v === null) return "null";
  if (Array.isArray(v)) return "an array";
  if (v === undefined) return "nothing";
  return `a ${typeof v}`;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

const wrong = (path: string, expected: string, v: unknown): string => `${path}: expected ${expected}, got ${describe(v)}`;

/** Anything at all (qom-get: the property's own type). */
const any: Shape = () => undefined;
const str: Shape = (v, p) => (typeof v === "string" ? undefined : wrong(p, "a string", v));
const num: Shape = (v, p) => (typeof v === "number" ? undefined : wrong(p, "a number", v));
const bool: Shape = (v, p) => (typeof v === "boolean" ? undefined : wrong(p, "a boolean", v));

/** A QAPI optional member: absent, or of shape `s` (QEMU omits it; it never sends null). */
function opt(s: Shape): Shape {
  return (v, p) => (v === undefined ? undefined : s(v, p));
}

function arr(s: Shape): Shape {
  return (v, p) => {
    if (!Array.isArray(v)) return wrong(p, "an array", v);
    for (let i = 0; i < v.length; i++) {
      const e = s(v[i], `${p}[${i}]`);
      if (e !== undefined) return e;
    }
    return undefined;
  };
}

/** An object with at least these members; others are ignored. */
function obj(members: Readonly<Record<string, Shape>>): Shape {
  const entries = Object.entries(members);
  return (v, p) => {
    if (!isObject(v)) return wrong(p, "an object", v);
    for (const [k, s] of entries) {
      const e = s(Object.hasOwn(v, k) ? v[k] : undefined, `${p}.${k}`);
      if (e !== undefined) return e;
    }
    return undefined;
  };
}

/** Commands without a QAPI `returns` answer `{}`; nothing in it is read. */
const empty = obj({});

const blockDirtyInfo = obj({
  name: opt(str),
  count: num,
  granularity: num,
  recording: bool,
  busy: bool,
  persistent: bool,
  inconsistent: opt(bool),
});

const imageInfo = obj({
  filename: str,
  "virtual-size": num,
  "cluster-size": opt(num),
  "backing-filename": opt(str),
  // only its filename is read (disks.ts backingGraph); not checked deeper
  "backing-image": opt(obj({ filename: str })),
});

const blockDeviceInfo = obj({
  "node-name": opt(str),
  drv: str,
  ro: bool,
  backing_file: opt(str),
  image: imageInfo,
  "dirty-bitmaps": opt(arr(blockDirtyInfo)),
});

const schemaInfo = obj({
  name: str,
  "meta-type": str,
  "arg-type": opt(str),
  // an alternate's members are {type} alone: no name
  members: opt(arr(obj({ name: opt(str) }))),
});

/** Every typed command's reply shape; the mapped type makes a new command in QmpCommandMap name one. */
export const REPLY_SHAPES: { readonly [C in QmpCommandName]: Shape } = {
  qmp_capabilities: empty,
  "query-version": obj({ qemu: obj({ major: num, minor: num, micro: num }), package: str }),
  "query-qmp-schema": arr(schemaInfo),
  "query-status": obj({ running: bool, status: str }),
  "query-block": arr(obj({ device: str, qdev: opt(str), inserted: opt(blockDeviceInfo) })),
  "query-named-block-nodes": arr(blockDeviceInfo),
  "x-debug-query-block-graph": obj({
    nodes: arr(obj({ id: num, type: str, name: str })),
    edges: arr(obj({ parent: num, child: num, name: str })),
  }),
  "blockdev-add": empty,
  "blockdev-del": empty,
  "blockdev-create": empty,
  "block-dirty-bitmap-add": empty,
  "block-dirty-bitmap-remove": empty,
  "block-dirty-bitmap-clear": empty,
  "block-dirty-bitmap-enable": empty,
  "block-dirty-bitmap-disable": empty,
  "block-dirty-bitmap-merge": empty,
  transaction: empty,
  "blockdev-backup": empty,
  "block-job-set-speed": empty,
  "block-job-cancel": empty,
  "query-jobs": arr(obj({ id: str, status: str, "current-progress": num, "total-progress": num, error: opt(str) })),
  "qom-list": arr(obj({ name: str, type: str })),
  "qom-get": any,
  "job-cancel": empty,
  "job-dismiss": empty,
  "job-finalize": empty,
  "nbd-server-start": empty,
  "nbd-server-stop": empty,
  "block-export-add": empty,
  "block-export-del": empty,
  "query-block-exports": arr(obj({ id: str, type: str, "node-name": str })),
  "object-add": empty,
  "object-del": empty,
  "human-monitor-command": str,
  quit: empty,
  stop: empty,
  cont: empty,
};

/** Undefined when `value` fits `command`'s reply shape; else what is wrong. */
export function replyShapeError(command: QmpCommandName, value: unknown): string | undefined {
  return REPLY_SHAPES[command](value, "return");
}

/** Each typed event's data, as read by listeners (job.ts, manager.ts, images.ts). */
const EVENT_SHAPES: { readonly [N in keyof QmpEventMap]: Shape } = {
  JOB_STATUS_CHANGE: obj({ id: str, status: str }),
  BLOCK_JOB_COMPLETED: empty,
  BLOCK_JOB_CANCELLED: empty,
  BLOCK_JOB_ERROR: obj({ device: str, operation: str, action: str }),
  BLOCK_JOB_READY: empty,
  BLOCK_JOB_PENDING: empty,
  BLOCK_EXPORT_DELETED: obj({ id: str }),
  SHUTDOWN: empty,
  STOP: empty,
  RESUME: empty,
};

/** Undefined when an event's data fits its shape, or the event is not one we type (any name off the wire). */
export function eventShapeError(event: string, data: unknown): string | undefined {
  return Object.hasOwn(EVENT_SHAPES, event) ? EVENT_SHAPES[event as keyof QmpEventMap](data, "data") : undefined;
}
