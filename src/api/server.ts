/**
 * The HTTP/1.1 API on a unix socket (fastify): versioned paths under /v1,
 * JSON bodies (where libvirt takes XML, the body carries the same XML as a
 * string), errors as { code, message } with statuses from api/errors.ts.
 * Routes translate requests into calls on the domain registry, checkpoint
 * managers and job manager; no QEMU logic lives here (Firecracker's API vs
 * VMM split).
 */
import { randomUUID } from "node:crypto";
import Fastify, { type FastifyReply } from "fastify";
import { type Result, ResultAsync } from "neverthrow";
import { byAge, descendants, leaves, renderTree, roots, topological } from "../checkpoints/tree.js";
import type { CheckpointDefFull } from "../conf/checkpoint.js";
import { parseDomainConfig } from "../conf/config.js";
import { checkName, MAX_NAME_BYTES } from "../conf/names.js";
import type { Domain, DomainEvent, DomainRegistry } from "../daemon/domains.js";
import type { Metrics } from "../daemon/metrics.js";
import type { OfflineRunner } from "../daemon/offline.js";
import type { JobManager } from "../jobs/manager.js";
import type { JobEvent } from "../jobs/model.js";
import type { Logger } from "../log.js";
import type { QmpClient } from "../qmp/client.js";
import type { SetService } from "../sets/service.js";
import { type ApiError, errorBody, httpStatus } from "./errors.js";
import { DebugRequestLog } from "./request-log.js";
import { operations, routePath, routeSchema } from "./schemas.js";

export interface ApiDeps {
  readonly domains: DomainRegistry;
  readonly jobs: JobManager;
  readonly metrics: Metrics;
  readonly logger: Logger;
  readonly maxBodyBytes: number;
  /** Subscribe to domain connection events (for the event stream). */
  readonly onDomainEvent: (fn: (e: DomainEvent) => void) => () => void;
  readonly version: string;
  /** Backups of domains whose QEMU is not running (unset: refused as not connected). */
  readonly offline?: OfflineRunner | undefined;
  /** Backup sets (unset: their routes answer unsupported). */
  readonly sets?: SetService | undefined;
}

type Params = { name: string; checkpoint: string };
type Query = Record<string, string | undefined>;

function flag(q: Query, k: string): boolean {
  const v = q[k];
  return v !== undefined && v !== "0" && v !== "false";
}

async function send<T>(reply: FastifyReply, r: Result<T, ApiError> | ResultAsync<T, ApiError>, status = 200): Promise<FastifyReply> {
  const x = await r;
  if (x.isErr()) return reply.code(httpStatus(x.error.code)).send(errorBody(x.error));
  return reply.code(status).send(x.value);
}

function sendError(reply: FastifyReply, e: ApiError): FastifyReply {
  return reply.code(httpStatus(e.code)).send(errorBody(e));
}

function str(body: unknown, key: string): string | undefined {
  if (typeof body !== "object" || body === null) return undefined;
  const v = (body as Record<string, unknown>)[key];
  return typeof v === "string" ? v : undefined;
}

function bool(body: unknown, key: string): boolean {
  return typeof body === "object" && body !== null && (body as Record<string, unknown>)[key] === true;
}

/**
 * A listing is a validity check: compare the checkpoints with QEMU's bitmaps
 * now (which also records them as evidence). Not connected, or QEMU not
 * answering: the listing shows the last view.
 */
async function checkpointsCheck(d: Domain): Promise<void> {
  const client = d.client();
  if (client !== undefined) await d.checkpoints.reconcile(client);
}

export function checkpointJson(d: Domain, c: CheckpointDefFull) {
  const problems = d.checkpoints.problemsOf(c.name);
  return {
    name: c.name,
    parent: c.parent ?? null,
    creationTime: c.creationTime,
    description: c.description ?? null,
    current: d.checkpoints.store.current === c.name,
    valid: problems === undefined ? null : problems.length === 0,
    problems: problems ?? [],
    disks: c.disks,
  };
}

export function domainJson(d: Domain) {
  return {
    name: d.name,
    qmp: d.config.qmp ?? null,
    agent: d.config.agent ?? null,
    /** Who QEMU runs as when not the daemon's user ("uid:gid", configured or read off the QMP socket). */
    qemuUser: d.imageOwner ? `${d.imageOwner.uid}:${d.imageOwner.gid}` : null,
    origin: d.origin,
    state: d.state,
    error: d.error ?? null,
    qemu: d.caps ? d.caps.package || `${d.caps.version.major}.${d.caps.version.minor}.${d.caps.version.micro}` : null,
    checkpoints: d.checkpoints.store.size,
    currentCheckpoint: d.checkpoints.store.current ?? null,
  };
}

export type ApiServer = ReturnType<typeof buildApi>;

/** Route options of an operation of api/schemas.ts: its validation schemas, and its id for the onRoute check in buildApi. */
function op(operationId: string) {
  const o = operations.find((x) => x.operationId === operationId);
  if (o === undefined) throw new Error(`api/schemas.ts has no operation ${operationId}`);
  return { schema: routeSchema(o), config: { operationId } };
}

/** Which name a validated field holds, for the name rule's own message. */
const NAME_FIELDS: Readonly<Record<string, string>> = {
  name: "domain name",
  domain: "domain name",
  checkpoint: "checkpoint name",
  descendants: "checkpoint name",
};

/**
 * A name refused by the schema's pattern or length gets the message of
 * conf/names.ts (which rule broke) instead of the validator's "must match
 * pattern …".
 */
function nameRuleMessage(error: Error, req: { params: unknown; query: unknown; body: unknown }): string | undefined {
  const v = error as Error & { validation?: { instancePath: string; keyword: string }[]; validationContext?: string };
  const first = v.validation?.[0];
  if (first === undefined || !["pattern", "minLength", "maxLength"].includes(first.keyword)) return undefined;
  const field = first.instancePath.split("/").pop() ?? "";
  const what = NAME_FIELDS[field];
  const part = v.validationContext === "params" ? req.params : v.validationContext === "querystring" ? req.query : req.body;
  const value = (part as Record<string, unknown> | undefined)?.[field];
  if (what === undefined || typeof value !== "string") return undefined;
  const r = checkName(value, what);
  return r.isErr() ? `${v.validationContext}/${field}: ${r.error.message}` : undefined;
}

/** The methods of the documented operations whose path matches `path` (for 405 and its Allow header). */
function allowedMethods(path: string): string[] {
  const methods = operations
    .filter((o) => new RegExp(`^${o.path.replace(/\{\w+\}/g, "[^/]+")}$`).test(path))
    .map((o) => o.method as string);
  if (methods.includes("GET")) methods.push("HEAD");
  return [...new Set(methods)].sort();
}

export function buildApi(deps: ApiDeps) {
  const { domains, jobs } = deps;
  /** The offline runner when `d` is to be served through a storage daemon: not connected, its disks known. */
  const offlineOf = (d: Domain): OfflineRunner | undefined =>
    d.client() === undefined && d.state === "offline" ? deps.offline : undefined;
  const app = Fastify({
    loggerInstance: deps.logger,
    bodyLimit: deps.maxBodyBytes,
    routerOptions: {
      // names up to the limit reach their route whatever a client percent-encodes; longer ones get the 400 below
      maxParamLength: 3 * MAX_NAME_BYTES,
    },
    // Validation against api/schemas.ts, strict: no coercion (a JSON 123 is not the string "123"; query values stay
    // strings), nothing removed or defaulted behind the caller's back (unknown keys are refused).
    ajv: { customOptions: { coerceTypes: false, removeAdditional: false, useDefaults: false, allErrors: false } },
    // the router's own refusals (a path parameter too long, a malformed URL) in the stable error body
    frameworkErrors: (error, _req, reply) => sendError(reply, { code: "bad-request", message: error.message }),
    genReqId: () => randomUUID(),
    // a slow or stuck client cannot hold a request open forever
    requestTimeout: 60_000,
    connectionTimeout: 0,
    keepAliveTimeout: 5_000,
    // on stop, do not wait for open event streams or keep-alive clients
    forceCloseConnections: true,
    // fastify's own two lines per request, at debug
    logController: new DebugRequestLog(),
  });

  app.addHook("onRequest", async () => {
    deps.metrics.onRequest();
  });
  app.setErrorHandler((error: Error & { statusCode?: number; code?: string }, req, reply) => {
    if (error.code === "FST_ERR_CTP_BODY_TOO_LARGE")
      return sendError(reply, { code: "too-large", message: `request body larger than ${deps.maxBodyBytes} bytes` });
    if (error.statusCode === 415)
      return sendError(reply, { code: "unsupported-media-type", message: "request bodies are application/json" });
    if (error.statusCode !== undefined && error.statusCode < 500) {
      return sendError(reply, { code: "bad-request", message: nameRuleMessage(error, req) ?? error.message });
    }
    req.log.error({ err: error }, "request failed");
    return sendError(reply, { code: "internal", message: "internal error (see the daemon's log)" });
  });
  app.setNotFoundHandler((req, reply) => {
    const path = req.url.split("?")[0] ?? "";
    const allow = allowedMethods(path);
    if (allow.length > 0)
      return sendError(reply.header("allow", allow.join(", ")), {
        code: "method-not-allowed",
        message: `${req.method} is not allowed on ${path}; allowed: ${allow.join(", ")}`,
      });
    return reply.code(404).send({ code: "not-found", message: `no route ${req.method} ${path}` });
  });

  /**
   * What makes the routes keep api/schemas.ts: every route is a documented
   * operation at its documented method and path (checked as routes are added,
   * so a route added without its operation fails at start); bodies are JSON
   * only (fastify's text/plain parser removed: other types answer 415); an
   * optional body that is absent is validated as {}.
   */
  app.removeContentTypeParser("text/plain");
  app.addHook("onRoute", (r) => {
    if (r.method === "HEAD") return;
    const id = (r.config as { operationId?: string } | undefined)?.operationId;
    const o = operations.find((x) => x.operationId === id);
    if (o === undefined || o.method !== r.method || routePath(o.path) !== r.url)
      throw new Error(`route ${String(r.method)} ${r.url} is not the operation ${id ?? "(none)"} of api/schemas.ts`);
  });
  app.addHook("preValidation", async (req) => {
    const id = (req.routeOptions.config as { operationId?: string }).operationId;
    const o = operations.find((x) => x.operationId === id);
    if (req.body === undefined && o?.body?.required === false) req.body = {};
  });

  const need = (reply: FastifyReply, name: string): Domain | undefined => {
    const d = domains.get(name);
    if (d === undefined) sendError(reply, { code: "unknown-domain", message: `no domain named '${name}'` });
    return d;
  };

  // ---- service
  app.get("/v1/health", op("getHealth"), async () => ({ status: "ok", version: deps.version, domains: domains.list().length }));
  app.get("/v1/metrics", op("getMetrics"), async (_req, reply) =>
    reply
      .type("text/plain; version=0.0.4")
      .send(deps.metrics.render(domains, domains.list().filter((d) => jobs.job(d.name)?.active).length)),
  );

  // ---- domains
  app.get("/v1/domains", op("listDomains"), async () => domains.list().map(domainJson));
  app.get<{ Params: Params }>("/v1/domains/:name", op("getDomain"), async (req, reply) => {
    const d = need(reply, req.params.name);
    return d === undefined ? reply : domainJson(d);
  });
  app.post<{ Querystring: Query }>("/v1/domains", op("registerDomain"), async (req, reply) => {
    // ?wait=SECONDS: answer once the domain is connected, or its first connect attempt failed
    const wait = req.query.wait === undefined ? 0 : Number(req.query.wait);
    if (!Number.isFinite(wait) || wait < 0 || wait > 300)
      return sendError(reply, { code: "bad-request", message: "wait must be seconds from 0 to 300" });
    const cfg = parseDomainConfig(req.body, "domain");
    if (cfg.isErr()) return sendError(reply, { code: "bad-request", message: cfg.error.message });
    return send(
      reply,
      domains
        .add(cfg.value, "api")
        .andThen((d) => ResultAsync.fromSafePromise(wait > 0 ? d.settled(wait * 1000) : Promise.resolve()).map(() => domainJson(d))),
      201,
    );
  });
  app.delete<{ Params: Params }>("/v1/domains/:name", op("removeDomain"), async (req, reply) => {
    if (need(reply, req.params.name) === undefined) return reply;
    // right after a (re)connect: wait for the recovery, then ask (as begin does), not a 409 for a domain that reports connected
    await jobs.recovered(req.params.name);
    if (jobs.busy(req.params.name))
      return sendError(reply, { code: "busy", message: `a backup is running on '${req.params.name}'; end it first` });
    return send(
      reply,
      domains.remove(req.params.name).map(() => ({ removed: req.params.name })),
    );
  });

  // ---- backups
  app.post<{ Params: Params }>("/v1/domains/:name/backup", op("beginBackup"), async (req, reply) => {
    const d = need(reply, req.params.name);
    if (d === undefined) return reply;
    const body = req.body ?? {};
    const bw = (body as Record<string, unknown>).bandwidth;
    if (bw !== undefined && (typeof bw !== "number" || !Number.isInteger(bw) || bw < 0))
      return sendError(reply, { code: "bad-request", message: "bandwidth must be a non-negative integer (bytes/s)" });
    const durable = (body as Record<string, unknown>).durable;
    if (durable !== undefined && typeof durable !== "boolean")
      return sendError(reply, { code: "bad-request", message: "durable must be a boolean" });
    const opts = {
      reuseExternal: bool(body, "reuseExternal"),
      quiesce: bool(body, "quiesce"),
      ...(durable === false ? { durable: false } : {}),
      ...(typeof bw === "number" ? { bandwidth: bw } : {}),
    };
    const off = offlineOf(d);
    return send(
      reply,
      off === undefined
        ? jobs.begin(d, str(body, "backupXml"), str(body, "checkpointXml"), opts)
        : off.begin(d, str(body, "backupXml"), str(body, "checkpointXml"), opts),
      201,
    );
  });
  app.get<{ Params: Params; Querystring: Query }>("/v1/domains/:name/backup", op("getBackup"), async (req, reply) => {
    if (need(reply, req.params.name) === undefined) return reply;
    return send(reply, jobs.info(req.params.name, { completed: flag(req.query, "completed") }));
  });
  app.get<{ Params: Params }>("/v1/domains/:name/backup/xml", op("getBackupXml"), async (req, reply) => {
    if (need(reply, req.params.name) === undefined) return reply;
    const r = await jobs.xml(req.params.name);
    return r.isErr() ? sendError(reply, r.error) : reply.type("application/xml").send(r.value);
  });
  app.get<{ Params: Params; Querystring: Query }>("/v1/domains/:name/backup/wait", op("waitBackup"), async (req, reply) => {
    if (need(reply, req.params.name) === undefined) return reply;
    const t = req.query.timeout === undefined ? 50 : Number(req.query.timeout);
    if (!Number.isFinite(t) || t < 0 || t > 3600)
      return sendError(reply, { code: "bad-request", message: "timeout must be seconds from 0 to 3600" });
    return send(reply, jobs.wait(req.params.name, t * 1000));
  });
  app.put<{ Params: Params }>("/v1/domains/:name/backup/bandwidth", op("setBackupBandwidth"), async (req, reply) => {
    if (need(reply, req.params.name) === undefined) return reply;
    const bw = (req.body as Record<string, unknown> | undefined)?.bandwidth;
    if (typeof bw !== "number" || !Number.isInteger(bw) || bw < 0)
      return sendError(reply, { code: "bad-request", message: "bandwidth must be a non-negative integer (bytes/s)" });
    return send(
      reply,
      jobs.setBandwidth(req.params.name, bw).map(() => ({ bandwidth: bw })),
    );
  });
  app.delete<{ Params: Params }>("/v1/domains/:name/backup", op("endBackup"), async (req, reply) => {
    if (need(reply, req.params.name) === undefined) return reply;
    return send(reply, jobs.end(req.params.name));
  });

  // ---- checkpoints
  app.post<{ Params: Params }>("/v1/domains/:name/checkpoints", op("createCheckpoint"), async (req, reply) => {
    const d = need(reply, req.params.name);
    if (d === undefined) return reply;
    const body = req.body ?? {};
    const client = d.client();
    const off = offlineOf(d);
    if (client === undefined && off === undefined)
      return sendError(reply, { code: "not-connected", message: `domain '${d.name}' is not connected to QEMU` });
    await jobs.recovered(d.name);
    if (jobs.busy(d.name) && !bool(body, "redefine")) {
      return sendError(reply, {
        code: "busy",
        message: `a backup is running on '${d.name}'; create the checkpoint with the backup instead`,
      });
    }
    const xml = str(body, "xml");
    if (bool(body, "redefine") && xml === undefined)
      return sendError(reply, { code: "bad-request", message: "redefine needs the checkpoint XML" });
    const run = (c: QmpClient) =>
      bool(body, "redefine") ? d.checkpoints.redefine(c, xml ?? "") : d.checkpoints.create(c, xml, { quiesce: bool(body, "quiesce") });
    const r = client !== undefined ? run(client) : off!.withSession(d, run);
    return send(
      reply,
      r.map((c) => checkpointJson(d, c)),
      201,
    );
  });
  app.get<{ Params: Params; Querystring: Query }>("/v1/domains/:name/checkpoints", op("listCheckpoints"), async (req, reply) => {
    const d = need(reply, req.params.name);
    if (d === undefined) return reply;
    await checkpointsCheck(d);
    const all = d.checkpoints.store.all;
    const q = req.query;
    if (flag(q, "tree")) return reply.type("text/plain").send(renderTree(all));
    let list: CheckpointDefFull[];
    if (q.descendants !== undefined) {
      if (!all.has(q.descendants))
        return sendError(reply, { code: "not-found", message: `checkpoint '${q.descendants}' does not exist in domain '${d.name}'` });
      list = descendants(all, q.descendants, flag(q, "deep"));
    } else if (flag(q, "roots")) list = roots(all);
    else if (flag(q, "leaves")) list = leaves(all);
    else list = flag(q, "topological") ? topological(all) : [...all.values()].sort(byAge);
    if (flag(q, "roots") && flag(q, "topological")) list = topological(all).filter((c) => list.includes(c));
    return list.map((c) => checkpointJson(d, c));
  });
  app.get<{ Params: Params }>("/v1/domains/:name/checkpoints/:checkpoint", op("getCheckpoint"), async (req, reply) => {
    const d = need(reply, req.params.name);
    if (d === undefined) return reply;
    await checkpointsCheck(d);
    const c = d.checkpoints.store.get(req.params.checkpoint);
    if (c === undefined)
      return sendError(reply, { code: "not-found", message: `checkpoint '${req.params.checkpoint}' does not exist in domain '${d.name}'` });
    return checkpointJson(d, c);
  });
  app.get<{ Params: Params; Querystring: Query }>(
    "/v1/domains/:name/checkpoints/:checkpoint/xml",
    op("getCheckpointXml"),
    async (req, reply) => {
      const d = need(reply, req.params.name);
      if (d === undefined) return reply;
      const size = flag(req.query, "size");
      const off = size && d.client() === undefined ? offlineOf(d) : undefined;
      // sizes are QEMU's bitmap counts: offline, read from a storage daemon
      const r = await (off === undefined
        ? d.checkpoints.xml(d.client(), req.params.checkpoint, { size })
        : off.withSession(d, (c) => d.checkpoints.xml(c, req.params.checkpoint, { size })));
      return r.isErr() ? sendError(reply, r.error) : reply.type("application/xml").send(r.value);
    },
  );
  app.delete<{ Params: Params; Querystring: Query }>(
    "/v1/domains/:name/checkpoints/:checkpoint",
    op("deleteCheckpoint"),
    async (req, reply) => {
      const d = need(reply, req.params.name);
      if (d === undefined) return reply;
      await jobs.recovered(d.name);
      if (jobs.busy(d.name))
        return sendError(reply, { code: "busy", message: `a backup is running on '${d.name}'; end it before deleting checkpoints` });
      const q = req.query;
      const opts = { children: flag(q, "children"), childrenOnly: flag(q, "childrenOnly"), metadataOnly: flag(q, "metadata") };
      const off = !opts.metadataOnly && d.client() === undefined ? offlineOf(d) : undefined;
      return send(
        reply,
        (off === undefined
          ? d.checkpoints.delete(d.client(), req.params.checkpoint, opts)
          : off.withSession(d, (c) => d.checkpoints.delete(c, req.params.checkpoint, opts))
        ).map((deleted) => ({ deleted })),
      );
    },
  );

  // ---- backup sets
  const sets = (reply: FastifyReply): SetService | undefined => {
    if (deps.sets === undefined) sendError(reply, { code: "unsupported", message: "backup sets are not available in this daemon" });
    return deps.sets;
  };
  type SetBody = Record<string, unknown>;
  app.post("/v1/sets/backup", op("backupToSet"), async (req, reply) => {
    const s = sets(reply);
    if (s === undefined) return reply;
    const b = req.body as SetBody;
    return send(
      reply,
      s.backup(b.domain as string, b.dir as string, {
        full: b.full === true,
        quiesce: b.quiesce === true,
        ...(typeof b.bandwidth === "number" ? { bandwidth: b.bandwidth } : {}),
      }),
      201,
    );
  });
  app.get<{ Querystring: Query }>("/v1/sets/points", op("listSetPoints"), async (req, reply) => {
    const s = sets(reply);
    if (s === undefined) return reply;
    if (req.query.dir === undefined) return sendError(reply, { code: "bad-request", message: "dir is required" });
    return send(reply, s.list(req.query.dir));
  });
  app.post("/v1/sets/restore", op("restoreFromSet"), async (req, reply) => {
    const s = sets(reply);
    if (s === undefined) return reply;
    const b = req.body as SetBody;
    const format = b.format === "qcow2" ? "qcow2" : "raw";
    return send(reply, s.restore(b.dir as string, b.disk as string, b.file as string, b.at as string | undefined, format));
  });
  app.post("/v1/sets/verify", op("verifySet"), async (req, reply) => {
    const s = sets(reply);
    if (s === undefined) return reply;
    return send(reply, s.verify((req.body as SetBody).dir as string));
  });
  app.post("/v1/sets/prune", op("pruneSet"), async (req, reply) => {
    const s = sets(reply);
    if (s === undefined) return reply;
    const b = req.body as SetBody;
    return send(reply, s.prune(b.dir as string, b.keep as number));
  });
  app.post("/v1/sets/exports", op("exportFromSet"), async (req, reply) => {
    const s = sets(reply);
    if (s === undefined) return reply;
    const b = req.body as SetBody;
    return send(reply, s.exportStart(b.dir as string, b.disk as string, b.at as string | undefined, b.socket as string), 201);
  });
  app.get("/v1/sets/exports", op("listSetExports"), async (_req, reply) => {
    const s = sets(reply);
    if (s === undefined) return reply;
    return s.exportList();
  });
  app.delete<{ Params: { id: string } }>("/v1/sets/exports/:id", op("endSetExport"), async (req, reply) => {
    const s = sets(reply);
    if (s === undefined) return reply;
    return send(reply, s.exportEnd(req.params.id));
  });

  // ---- events (NDJSON)
  app.get<{ Querystring: Query }>("/v1/events", op("getEvents"), (req, reply) => {
    const only = req.query.domain;
    reply.hijack();
    const res = reply.raw;
    res.writeHead(200, { "content-type": "application/x-ndjson", "cache-control": "no-store" });
    const write = (o: object) => {
      // a reader that does not keep up loses events rather than growing our memory
      if (res.writableLength < 1 << 20) res.write(`${JSON.stringify(o)}\n`);
    };
    write({ type: "hello", time: new Date().toISOString() });
    const offJobs = jobs.subscribe((e: JobEvent) => {
      if (only === undefined || e.info.domain === only)
        write({ type: e.type, domain: e.info.domain, time: new Date().toISOString(), job: e.info });
    });
    const offDomains = deps.onDomainEvent((e) => {
      if (only === undefined || e.domain === only) write({ ...e, time: new Date().toISOString() });
    });
    req.raw.on("close", () => {
      offJobs();
      offDomains();
    });
  });

  return app;
}
