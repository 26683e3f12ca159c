/**
 * The API contract in one place: every operation's path, method,
 * operationId, parameters, body and responses as JSON Schema. server.ts
 * takes its route validation (params, querystring, body) from here and
 * docs/openapi.yaml is generated from here (scripts/openapi.ts; a unit test
 * keeps the file equal to what this module produces). This module must never
 * hold behaviour: it is data, so the document and the server cannot drift.
 *
 * Query values stay strings (the validator does not coerce, so that a JSON
 * body's 123 is never taken for "123"): flags are "", "0", "1", "false" or
 * "true", numbers are decimal strings.
 */
import { MAX_NAME_BYTES, NAME_PATTERN } from "../conf/names.js";

export type JsonSchema = { readonly [k: string]: unknown };
export type Method = "GET" | "POST" | "PUT" | "DELETE";

export interface QueryParam {
  readonly schema: JsonSchema;
  readonly description?: string;
}

export interface Response {
  readonly description: string;
  /** media type → schema; absent: the stable error body (application/json Error). */
  readonly content?: Readonly<Record<string, JsonSchema>>;
}

export interface Operation {
  readonly operationId: string;
  readonly method: Method;
  /** OpenAPI form: /v1/domains/{name}; fastify's form comes from routePath(). */
  readonly path: string;
  readonly summary: string;
  readonly query?: Readonly<Record<string, QueryParam>>;
  /** JSON body (application/json only); `required: false` lets it be absent (taken as {}). */
  readonly body?: { readonly schema: JsonSchema; readonly required: boolean };
  readonly responses: Readonly<Record<string, Response>>;
}

const ref = (name: string): JsonSchema => ({ $ref: `#/components/schemas/${name}` });
const json = (schema: JsonSchema) => ({ "application/json": schema });

/** A domain or checkpoint name: ASCII only, so maxLength counts bytes. */
export const nameSchema: JsonSchema = { type: "string", minLength: 1, maxLength: MAX_NAME_BYTES, pattern: NAME_PATTERN };
/** A query flag: present (empty, 1, true) or not (absent, 0, false). */
export const flagSchema: JsonSchema = { type: "string", enum: ["", "0", "1", "false", "true"] };
const secondsSchema = (max: number): JsonSchema => ({
  type: "string",
  pattern: "^[0-9]{1,7}(\\.[0-9]{1,6})?$",
  description: `seconds, 0 to ${max}`,
});
const flag = (description?: string): QueryParam =>
  description === undefined ? { schema: flagSchema } : { schema: flagSchema, description };

/** Error statuses, each with the codes that produce it (api/errors.ts decides the mapping). */
const E = {
  400: "Bad request: a body, query or path parameter outside this document (bad-request), or XML or names that do not parse or validate (xml-malformed, xml-invalid, invalid-name, unknown-disk, unsupported-disk, config-invalid)",
  403: "A target path outside the allowed directories (path-refused)",
  404: "No such domain (unknown-domain), checkpoint (not-found) or job (no-job)",
  409: "Conflict: duplicate, busy, aborted, target-exists, bitmap-missing, checkpoint-invalid, set-corrupt, set-foreign",
  413: "Request body larger than maxBodyBytes (too-large)",
  415: "Content type other than application/json (unsupported-media-type)",
  422: "QEMU lacks a needed feature (unsupported)",
  500: "io, image, job-failed, internal",
  502: "QEMU or the guest agent refused or failed (qmp, agent)",
  503: "The domain is not connected to QEMU (not-connected)",
  504: "Timed out (timeout)",
} as const;
type ErrStatus = keyof typeof E;
const errors = (...s: ErrStatus[]): Record<string, Response> => Object.fromEntries(s.map((k) => [String(k), { description: E[k] }]));
/** Every operation can answer 400 (its parameters) and 500 (internal). */
const base: ErrStatus[] = [400, 500];
/** Operations with a JSON body can also answer 413 and 415. */
const withBody: ErrStatus[] = [...base, 413, 415];
/** Operations that may talk to QEMU. */
const qemu: ErrStatus[] = [502, 503, 504];

export const schemas: Readonly<Record<string, JsonSchema>> = {
  Error: {
    type: "object",
    required: ["code", "message"],
    additionalProperties: false,
    properties: { code: { type: "string" }, message: { type: "string" } },
  },
  Health: {
    type: "object",
    required: ["status", "version", "domains"],
    properties: { status: { type: "string" }, version: { type: "string" }, domains: { type: "integer" } },
  },
  DomainConfig: {
    type: "object",
    required: ["name"],
    anyOf: [{ required: ["qmp"] }, { required: ["disks"] }],
    additionalProperties: false,
    description: "qmp, disks or both: without qmp the domain is backed up offline only, from its disks",
    properties: {
      name: nameSchema,
      qmp: { type: "string", minLength: 1, description: "QMP socket path or host:port" },
      disks: {
        type: "array",
        minItems: 1,
        description: "the disks' images, for a VM qbackupd never saw run (backed up offline until QEMU is seen)",
        items: {
          type: "object",
          required: ["name", "file"],
          additionalProperties: false,
          properties: {
            name: nameSchema,
            file: { type: "string", pattern: "^/", description: "absolute path of the image" },
            format: { type: "string", enum: ["qcow2", "raw"], default: "qcow2" },
          },
        },
      },
      agent: { type: "string", pattern: "^/", description: "guest agent socket path" },
      qemuUser: {
        type: "string",
        pattern: "^[0-9]{1,10}:[0-9]{1,10}$",
        description: "uid:gid QEMU runs as; default: the QMP socket's owner",
      },
    },
  },
  Domain: {
    type: "object",
    required: ["name", "qmp", "origin", "state", "checkpoints"],
    properties: {
      name: { type: "string" },
      qmp: { type: "string", nullable: true, description: "null: registered without QMP, backed up offline only" },
      agent: { type: "string", nullable: true },
      qemuUser: { type: "string", nullable: true, description: "uid:gid QEMU runs as, when not the daemon's user" },
      origin: { type: "string", enum: ["config", "api"] },
      state: { type: "string", enum: ["connecting", "connected", "unsupported", "offline"] },
      error: { type: "string", nullable: true },
      qemu: { type: "string", nullable: true },
      checkpoints: { type: "integer" },
      currentCheckpoint: { type: "string", nullable: true },
    },
  },
  Checkpoint: {
    type: "object",
    required: ["name", "creationTime", "current", "problems", "disks"],
    properties: {
      name: { type: "string" },
      parent: { type: "string", nullable: true },
      creationTime: { type: "integer" },
      description: { type: "string", nullable: true },
      current: { type: "boolean" },
      valid: {
        type: "boolean",
        nullable: true,
        description:
          "Checked against QEMU's bitmaps at every listing when the domain is connected (otherwise the last check's verdict); false also when an earlier check saw the bitmap changed behind qbackupd's back (docs/checkpoints.md); null until checked",
      },
      problems: { type: "array", items: { type: "string" }, description: "one line per disk, with the reason" },
      disks: {
        type: "array",
        items: {
          type: "object",
          properties: {
            name: { type: "string" },
            checkpoint: { type: "string", enum: ["bitmap", "no"] },
            bitmap: { type: "string" },
            volatile: {
              type: "boolean",
              description: "the bitmap is not persistent (a raw disk): it lives only as long as the QEMU process (absent: persistent)",
            },
          },
        },
      },
    },
  },
  SetBackup: {
    type: "object",
    required: ["set", "checkpoint", "kind", "reason", "job"],
    properties: {
      set: { type: "string", description: "the set's directory, resolved" },
      checkpoint: { type: "string", description: "the checkpoint marking the new restore point" },
      kind: { type: "string", enum: ["full", "incremental"] },
      reason: { type: "string", nullable: true, description: "why a full was made when none was asked for" },
      job: ref("JobInfo"),
    },
  },
  SetPoint: {
    type: "object",
    required: ["checkpoint", "seq", "time", "kind", "reason", "merged", "parent", "disks"],
    properties: {
      checkpoint: { type: "string" },
      seq: { type: "integer" },
      time: { type: "string" },
      kind: { type: "string", enum: ["full", "incremental"] },
      reason: { type: "string", nullable: true },
      merged: { type: "boolean", description: "a prune merged older images into this point" },
      parent: { type: "string", nullable: true },
      disks: {
        type: "array",
        items: {
          type: "object",
          required: ["name", "file", "dataSize", "virtualSize", "sha256"],
          properties: {
            name: { type: "string" },
            file: { type: "string", description: "relative to the set" },
            dataSize: { type: "integer" },
            virtualSize: { type: "integer" },
            sha256: { type: "string" },
          },
        },
      },
    },
  },
  SetListing: {
    type: "object",
    required: ["set", "domain", "points", "pending", "lastSettled"],
    properties: {
      set: { type: "string" },
      domain: { type: "string" },
      points: { type: "array", items: ref("SetPoint"), description: "oldest first" },
      pending: { type: "object", nullable: true, description: "a backup not settled yet" },
      lastSettled: {
        type: "object",
        nullable: true,
        description: "what the last settled backup came to (recorded or discarded, with why)",
      },
    },
  },
  SetRestore: {
    type: "object",
    required: ["checkpoint", "disk", "file", "format", "virtualSize", "elapsedMs"],
    properties: {
      checkpoint: { type: "string" },
      disk: { type: "string" },
      file: { type: "string" },
      format: { type: "string", enum: ["raw", "qcow2"] },
      virtualSize: { type: "integer" },
      elapsedMs: { type: "integer" },
    },
  },
  SetVerify: {
    type: "object",
    required: ["set", "intact", "images", "bytesRead", "damaged", "damagedPoints", "points"],
    properties: {
      set: { type: "string" },
      intact: { type: "boolean" },
      images: { type: "integer" },
      bytesRead: { type: "integer" },
      damaged: { type: "array", items: { type: "object" }, description: "each damaged image: file, point, disk, problems" },
      damagedPoints: { type: "array", items: { type: "string" } },
      points: { type: "array", items: { type: "object" } },
    },
  },
  SetPrune: {
    type: "object",
    required: ["set", "kept", "removed", "merged", "checkpointsDeleted", "checkpointsLeft"],
    properties: {
      set: { type: "string" },
      kept: { type: "array", items: { type: "string" } },
      removed: { type: "array", items: { type: "string" } },
      merged: { type: "array", items: { type: "string" } },
      checkpointsDeleted: { type: "array", items: { type: "string" } },
      checkpointsLeft: { type: "array", items: { type: "object" } },
    },
  },
  SetExport: {
    type: "object",
    required: ["id", "set", "checkpoint", "disk", "socket", "uri", "startedAt"],
    properties: {
      id: { type: "string" },
      set: { type: "string" },
      checkpoint: { type: "string" },
      disk: { type: "string" },
      socket: { type: "string" },
      uri: { type: "string" },
      startedAt: { type: "string" },
    },
  },
  JobInfo: {
    type: "object",
    required: ["id", "domain", "mode", "state", "active"],
    properties: {
      id: { type: "string" },
      domain: { type: "string" },
      mode: { type: "string", enum: ["push", "pull"] },
      state: { type: "string", enum: ["begin", "inprogress", "ready", "failed", "cancelled"] },
      active: { type: "boolean" },
      incremental: { type: "string", nullable: true },
      checkpoint: { type: "string", nullable: true },
      startedAt: { type: "string", format: "date-time" },
      endedAt: { type: "string", format: "date-time", nullable: true },
      elapsedMs: { type: "integer" },
      bytesDone: { type: "integer" },
      bytesTotal: { type: "integer" },
      rate: { type: "integer", description: "bytes/s" },
      error: { type: "string", nullable: true },
      nbd: { type: "string", nullable: true, description: "pull: nbd+unix:///?socket=… or nbd://host:port" },
      durable: { type: "boolean", description: "push: ready means the targets are on disk (false: begun with durable false)" },
      disks: {
        type: "array",
        items: {
          type: "object",
          properties: {
            name: { type: "string" },
            state: { type: "string", enum: ["begin", "running", "complete", "failed", "cancelled"] },
            bytesDone: { type: "integer" },
            bytesTotal: { type: "integer" },
            file: { type: "string" },
            exportName: { type: "string" },
            exportBitmap: { type: "string" },
            error: { type: "string" },
          },
        },
      },
    },
  },
};

export const operations: readonly Operation[] = [
  {
    operationId: "getHealth",
    method: "GET",
    path: "/v1/health",
    summary: "Liveness",
    responses: { "200": { description: "OK", content: json(ref("Health")) }, ...errors(...base) },
  },
  {
    operationId: "getMetrics",
    method: "GET",
    path: "/v1/metrics",
    summary: "Prometheus metrics (backups by mode and outcome, bytes, durations, checkpoints per domain, QMP connection state)",
    responses: { "200": { description: "text exposition format", content: { "text/plain": { type: "string" } } }, ...errors(...base) },
  },
  {
    operationId: "getEvents",
    method: "GET",
    path: "/v1/events",
    summary: "Event stream (NDJSON), one JSON object per line, until the client disconnects",
    query: { domain: { schema: nameSchema, description: "only this domain's events" } },
    responses: {
      "200": {
        description:
          "types: hello, connected, disconnected, unsupported (domain); started, progress, ready, failed, cancelled, ended (job, with `job`: JobInfo)",
        content: { "application/x-ndjson": { type: "string" } },
      },
      ...errors(...base),
    },
  },
  {
    operationId: "listDomains",
    method: "GET",
    path: "/v1/domains",
    summary: "List domains",
    responses: { "200": { description: "OK", content: json({ type: "array", items: ref("Domain") }) }, ...errors(...base) },
  },
  {
    operationId: "registerDomain",
    method: "POST",
    path: "/v1/domains",
    summary: "Register a domain (persisted)",
    query: {
      wait: {
        schema: secondsSchema(300),
        description: "answer once the domain connected or its first connect failed, waiting at most this long",
      },
    },
    body: { schema: ref("DomainConfig"), required: true },
    responses: { "201": { description: "Registered", content: json(ref("Domain")) }, ...errors(...withBody, 409) },
  },
  {
    operationId: "getDomain",
    method: "GET",
    path: "/v1/domains/{name}",
    summary: "One domain",
    responses: { "200": { description: "OK", content: json(ref("Domain")) }, ...errors(...base, 404) },
  },
  {
    operationId: "removeDomain",
    method: "DELETE",
    path: "/v1/domains/{name}",
    summary: "Unregister a domain (refused while a backup runs)",
    responses: {
      "200": {
        description: "Removed",
        content: json({ type: "object", required: ["removed"], additionalProperties: false, properties: { removed: { type: "string" } } }),
      },
      ...errors(...base, 404, 409),
    },
  },
  {
    operationId: "beginBackup",
    method: "POST",
    path: "/v1/domains/{name}/backup",
    summary: "Begin a backup (virDomainBackupBegin)",
    body: {
      required: false,
      schema: {
        type: "object",
        additionalProperties: false,
        properties: {
          backupXml: { type: "string", description: "<domainbackup>; absent: full push of every disk" },
          checkpointXml: { type: "string", description: "<domaincheckpoint> created at the backup's point in time" },
          reuseExternal: { type: "boolean", description: "use target files the caller created" },
          quiesce: { type: "boolean", description: "freeze guest filesystems through the guest agent" },
          durable: {
            type: "boolean",
            default: true,
            description: "push: false reports ready once the copy is complete, without waiting for the targets to reach the disk",
          },
          bandwidth: { type: "integer", minimum: 0, description: "bytes/s per disk" },
        },
      },
    },
    responses: { "201": { description: "Started", content: json(ref("JobInfo")) }, ...errors(...withBody, 403, 404, 409, 422, ...qemu) },
  },
  {
    operationId: "getBackup",
    method: "GET",
    path: "/v1/domains/{name}/backup",
    summary: "The running backup (domjobinfo); with completed=1 the last finished one",
    query: { completed: flag() },
    responses: { "200": { description: "OK", content: json(ref("JobInfo")) }, ...errors(...base, 404) },
  },
  {
    operationId: "endBackup",
    method: "DELETE",
    path: "/v1/domains/{name}/backup",
    summary: "End a pull backup, or abort a push (virDomainAbortJob)",
    responses: { "200": { description: "Ended", content: json(ref("JobInfo")) }, ...errors(...base, 404, 409, ...qemu) },
  },
  {
    operationId: "getBackupXml",
    method: "GET",
    path: "/v1/domains/{name}/backup/xml",
    summary: "The running backup's <domainbackup>, every default filled in (backup-dumpxml)",
    responses: { "200": { description: "OK", content: { "application/xml": { type: "string" } } }, ...errors(...base, 404) },
  },
  {
    operationId: "waitBackup",
    method: "GET",
    path: "/v1/domains/{name}/backup/wait",
    summary: "Long poll until the backup is ready (push complete, pull served), failed or cancelled",
    query: { timeout: { schema: secondsSchema(3600), description: "seconds, 0 to 3600 (default 50)" } },
    responses: { "200": { description: "Settled", content: json(ref("JobInfo")) }, ...errors(...base, 404, 504) },
  },
  {
    operationId: "setBackupBandwidth",
    method: "PUT",
    path: "/v1/domains/{name}/backup/bandwidth",
    summary: "Change the running backup's bandwidth limit",
    body: {
      required: true,
      schema: {
        type: "object",
        required: ["bandwidth"],
        additionalProperties: false,
        properties: { bandwidth: { type: "integer", minimum: 0, description: "bytes/s per disk" } },
      },
    },
    responses: {
      "200": {
        description: "OK",
        content: json({
          type: "object",
          required: ["bandwidth"],
          additionalProperties: false,
          properties: { bandwidth: { type: "integer" } },
        }),
      },
      ...errors(...withBody, 404, 409, ...qemu),
    },
  },
  {
    operationId: "createCheckpoint",
    method: "POST",
    path: "/v1/domains/{name}/checkpoints",
    summary: "Create (or, with redefine, restore the metadata of) a checkpoint",
    body: {
      required: false,
      schema: {
        type: "object",
        additionalProperties: false,
        properties: {
          xml: { type: "string", description: "<domaincheckpoint>; absent: all defaults (required with redefine)" },
          redefine: { type: "boolean" },
          quiesce: { type: "boolean" },
        },
      },
    },
    responses: { "201": { description: "Created", content: json(ref("Checkpoint")) }, ...errors(...withBody, 404, 409, 422, ...qemu) },
  },
  {
    operationId: "listCheckpoints",
    method: "GET",
    path: "/v1/domains/{name}/checkpoints",
    summary: "List checkpoints, oldest first unless topological; tree=1 returns text",
    query: {
      roots: flag(),
      leaves: flag(),
      topological: flag(),
      descendants: { schema: nameSchema, description: "children of this checkpoint" },
      deep: flag("with descendants: all levels"),
      tree: flag(),
    },
    responses: {
      "200": { description: "OK", content: { ...json({ type: "array", items: ref("Checkpoint") }), "text/plain": { type: "string" } } },
      ...errors(...base, 404),
    },
  },
  {
    operationId: "getCheckpoint",
    method: "GET",
    path: "/v1/domains/{name}/checkpoints/{checkpoint}",
    summary: "One checkpoint (with its parent)",
    responses: { "200": { description: "OK", content: json(ref("Checkpoint")) }, ...errors(...base, 404) },
  },
  {
    operationId: "deleteCheckpoint",
    method: "DELETE",
    path: "/v1/domains/{name}/checkpoints/{checkpoint}",
    summary: "Delete a checkpoint",
    query: {
      children: flag("and its descendants"),
      childrenOnly: flag("only its descendants"),
      metadata: flag("metadata only; bitmaps stay"),
    },
    responses: {
      "200": {
        description: "Deleted",
        content: json({
          type: "object",
          required: ["deleted"],
          additionalProperties: false,
          properties: { deleted: { type: "array", items: { type: "string" } } },
        }),
      },
      ...errors(...base, 404, 409, ...qemu),
    },
  },
  {
    operationId: "getCheckpointXml",
    method: "GET",
    path: "/v1/domains/{name}/checkpoints/{checkpoint}/xml",
    summary: "The checkpoint's <domaincheckpoint>; size=1 adds bytes changed since it per disk",
    query: { size: flag() },
    responses: { "200": { description: "OK", content: { "application/xml": { type: "string" } } }, ...errors(...base, 404, ...qemu) },
  },
  {
    operationId: "backupToSet",
    method: "POST",
    path: "/v1/sets/backup",
    summary:
      "Back up every disk of a domain into a backup set: incremental since its newest restore point when valid, else full (saying why)",
    body: {
      required: true,
      schema: {
        type: "object",
        required: ["domain", "dir"],
        additionalProperties: false,
        properties: {
          domain: nameSchema,
          dir: { type: "string", pattern: "^/", maxLength: 4096, description: "the set's directory (created if absent)" },
          full: { type: "boolean", description: "a full even when an incremental is possible" },
          quiesce: { type: "boolean" },
          bandwidth: { type: "integer", minimum: 0, description: "bytes/s per disk" },
        },
      },
    },
    responses: { "201": { description: "Started", content: json(ref("SetBackup")) }, ...errors(...withBody, 403, 404, 409, 422, ...qemu) },
  },
  {
    operationId: "listSetPoints",
    method: "GET",
    path: "/v1/sets/points",
    summary: "The restore points of a backup set, oldest first",
    query: { dir: { schema: { type: "string", pattern: "^/", maxLength: 4096 }, description: "the set's directory" } },
    responses: { "200": { description: "The set", content: json(ref("SetListing")) }, ...errors(...base, 403, 404, 409) },
  },
  {
    operationId: "restoreFromSet",
    method: "POST",
    path: "/v1/sets/restore",
    summary: "Write a disk as it was at a restore point into a new file",
    body: {
      required: true,
      schema: {
        type: "object",
        required: ["dir", "disk", "file"],
        additionalProperties: false,
        properties: {
          dir: { type: "string", pattern: "^/", maxLength: 4096 },
          disk: nameSchema,
          file: { type: "string", pattern: "^/", maxLength: 4096, description: "must not exist" },
          at: nameSchema,
          format: { type: "string", enum: ["raw", "qcow2"], default: "raw" },
        },
      },
    },
    responses: { "200": { description: "Restored", content: json(ref("SetRestore")) }, ...errors(...withBody, 403, 404, 409) },
  },
  {
    operationId: "verifySet",
    method: "POST",
    path: "/v1/sets/verify",
    summary: "Check every image of a backup set: qemu-img check, chain links, content digests",
    body: {
      required: true,
      schema: {
        type: "object",
        required: ["dir"],
        additionalProperties: false,
        properties: { dir: { type: "string", pattern: "^/", maxLength: 4096 } },
      },
    },
    responses: {
      "200": { description: "The verdict (intact or not)", content: json(ref("SetVerify")) },
      ...errors(...withBody, 403, 404, 409),
    },
  },
  {
    operationId: "pruneSet",
    method: "POST",
    path: "/v1/sets/prune",
    summary: "Keep the newest N restore points (older images merged into the oldest kept one); delete checkpoints the set no longer needs",
    body: {
      required: true,
      schema: {
        type: "object",
        required: ["dir", "keep"],
        additionalProperties: false,
        properties: {
          dir: { type: "string", pattern: "^/", maxLength: 4096 },
          keep: { type: "integer", description: "restore points to keep, at least 1" },
        },
      },
    },
    responses: { "200": { description: "Pruned", content: json(ref("SetPrune")) }, ...errors(...withBody, 403, 404, 409) },
  },
  {
    operationId: "exportFromSet",
    method: "POST",
    path: "/v1/sets/exports",
    summary: "Serve a restore point of a disk read-only over NBD on a unix socket, until ended",
    body: {
      required: true,
      schema: {
        type: "object",
        required: ["dir", "disk", "socket"],
        additionalProperties: false,
        properties: {
          dir: { type: "string", pattern: "^/", maxLength: 4096 },
          disk: nameSchema,
          at: nameSchema,
          socket: { type: "string", pattern: "^/", description: "absolute path (at most 107 bytes: the unix socket limit)" },
        },
      },
    },
    responses: { "201": { description: "Serving", content: json(ref("SetExport")) }, ...errors(...withBody, 403, 404, 409) },
  },
  {
    operationId: "listSetExports",
    method: "GET",
    path: "/v1/sets/exports",
    summary: "Exports of restore points being served",
    responses: { "200": { description: "The exports", content: json({ type: "array", items: ref("SetExport") }) }, ...errors(...base) },
  },
  {
    operationId: "endSetExport",
    method: "DELETE",
    path: "/v1/sets/exports/{id}",
    summary: "End an export of a restore point",
    responses: { "200": { description: "Ended", content: json(ref("SetExport")) }, ...errors(...base, 404) },
  },
];

/** The path parameters of an OpenAPI path, in order. */
export function pathParams(path: string): string[] {
  return [...path.matchAll(/\{(\w+)\}/g)].map((m) => m[1] as string);
}

/** fastify's form of an OpenAPI path: /v1/domains/:name. */
export function routePath(path: string): string {
  return path.replace(/\{(\w+)\}/g, ":$1");
}

/** The fastify route schema of an operation: what the validator checks before the handler runs. */
export function routeSchema(op: Operation): Record<string, JsonSchema> {
  const out: Record<string, JsonSchema> = {};
  const params = pathParams(op.path);
  if (params.length > 0)
    out.params = { type: "object", required: params, properties: Object.fromEntries(params.map((p) => [p, nameSchema])) };
  out.querystring = {
    type: "object",
    additionalProperties: false,
    properties: Object.fromEntries(Object.entries(op.query ?? {}).map(([k, q]) => [k, q.schema])),
  };
  if (op.body !== undefined) out.body = resolve(op.body.schema);
  return out;
}

/** Inline a component $ref (route schemas are compiled one by one, without the document around them). */
function resolve(s: JsonSchema): JsonSchema {
  const r = s.$ref;
  if (typeof r === "string") {
    const target = schemas[r.replace("#/components/schemas/", "")];
    if (target === undefined) throw new Error(`unknown schema ${r}`);
    return target;
  }
  return s;
}

export function operation(id: string): Operation {
  const op = operations.find((o) => o.operationId === id);
  if (op === undefined) throw new Error(`no operation ${id}`);
  return op;
}
