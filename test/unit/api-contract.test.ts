/**
 * Contract test: requests generated from the OpenAPI document (the same
 * document as docs/openapi.yaml, see openapi.test.ts), valid and invalid, per
 * operation, against buildApi over stub domains (test/helpers/api-stub.ts).
 * Every response's status must be documented for its operation and its body
 * must match the documented schema; an invalid request must answer 400/415
 * (405 for a wrong method) with the stable error body and change nothing (no
 * job begun or ended, no checkpoint, no domain added or removed).
 *
 * Seeded (CONTRACT_SEED to replay), bounded: ROUNDS valid and ROUNDS invalid
 * requests per operation plus one wrong method per path.
 */
import http from "node:http";
import { Ajv } from "ajv";
import t from "tap";
import { openapiDocument } from "../../src/api/openapi.js";
import { type JsonSchema, type Operation, operations, pathParams, schemas } from "../../src/api/schemas.js";
import { MAX_NAME_BYTES } from "../../src/conf/names.js";
import { stubApi } from "../helpers/api-stub.js";

type TT = { fail(message: string): unknown };

const ROUNDS = 15;
const SEED = Number(process.env.CONTRACT_SEED ?? 12);

/** mulberry32: small, seeded, good enough to pick cases. */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let x = a;
    x = Math.imul(x ^ (x >>> 15), x | 1);
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61);
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
}
const rand = rng(SEED);
const int = (n: number) => Math.floor(rand() * n);
const pick = <T>(xs: readonly T[]): T => xs[int(xs.length)] as T;
const chance = (p: number) => rand() < p;

const doc = openapiDocument();
const ajv = new Ajv({ strict: false, validateFormats: false, allErrors: true });
ajv.addSchema(doc, "doc");
const resolve = (s: JsonSchema): JsonSchema =>
  typeof s.$ref === "string" ? (schemas[s.$ref.split("/").pop() as string] as JsonSchema) : s;
const validator = (s: JsonSchema) =>
  ajv.compile(typeof s.$ref === "string" ? { $ref: `doc${s.$ref}` } : JSON.parse(JSON.stringify(s).replaceAll('"#/', '"doc#/')));

const NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.";
function name(): string {
  const len = chance(0.1) ? MAX_NAME_BYTES : 1 + int(12);
  let s = pick(NAME_CHARS.slice(0, -1).split(""));
  while (s.length < len) s += pick(NAME_CHARS.split(""));
  return s;
}
const text = () => pick(["", "x", "<domainbackup/>", "<domaincheckpoint><name>k</name></domaincheckpoint>", "héllo ✓", "123", "true"]);

/** A value the schema accepts (for the shapes the document uses). */
function valid(s0: JsonSchema): unknown {
  const s = resolve(s0);
  if (Array.isArray(s.enum)) return pick(s.enum);
  switch (s.type) {
    case "boolean":
      return chance(0.5);
    case "integer":
      return pick([0, 1, 1 << 20, 2 ** 40]);
    case "array":
      return Array.from({ length: 1 + int(2) }, () => valid(s.items as JsonSchema));
    case "object": {
      const props = (s.properties ?? {}) as Record<string, JsonSchema>;
      // anyOf of required lists ("qmp or disks"): one of them, picked, is required too
      const one = Array.isArray(s.anyOf) ? ((pick(s.anyOf as JsonSchema[]).required ?? []) as string[]) : [];
      const req = [...((s.required ?? []) as string[]), ...one];
      return Object.fromEntries(
        Object.entries(props)
          .filter(([k]) => req.includes(k) || chance(0.5))
          .map(([k, p]) => [k, valid(p)]),
      );
    }
    case "string":
      switch (s.pattern) {
        case undefined:
          return s.minLength === 1 ? `/run/${name()}.qmp` : text();
        case "^[a-zA-Z0-9_-][a-zA-Z0-9_.-]*$":
          return name();
        case "^/":
          return `/run/${name()}`;
        case "^[0-9]{1,10}:[0-9]{1,10}$":
          return `${int(70000)}:${int(70000)}`;
        case "^[0-9]{1,7}(\\.[0-9]{1,6})?$":
          return pick(["0", "0.5", "1"]);
        default:
          throw new Error(`no generator for pattern ${String(s.pattern)}`);
      }
    default:
      throw new Error(`no generator for ${JSON.stringify(s)}`);
  }
}

/** A value of another type than the schema's, or outside its constraints. */
function wrong(s0: JsonSchema): unknown {
  const s = resolve(s0);
  if (Array.isArray(s.enum)) return pick(["maybe", "2", "yes", "TRUE"]);
  switch (s.type) {
    case "boolean":
      return pick(["yes", "true", 1, 0, null, []]);
    case "integer":
      return pick([-1, 1.5, "5", true, null, {}]);
    case "string":
      if (s.pattern === "^[a-zA-Z0-9_-][a-zA-Z0-9_.-]*$") return pick([".hidden", "a b", "a/b", "x".repeat(MAX_NAME_BYTES + 1), ""]);
      if (typeof s.pattern === "string") return pick(["soon", "-1", "1e3", "x", ""]);
      return pick([123, true, null, ["x"], { a: 1 }]);
    default:
      return 5;
  }
}

interface Req {
  method: string;
  url: string;
  payload?: string;
  headers?: Record<string, string>;
  /** What the generator changed, for messages. */
  why: string;
}

function url(op: Operation, params: Record<string, string>, query: Record<string, string>): string {
  let path = op.path;
  for (const [k, v] of Object.entries(params)) path = path.replace(`{${k}}`, encodeURIComponent(v));
  const q = new URLSearchParams(query).toString();
  return q === "" ? path : `${path}?${q}`;
}

/** Existing names most of the time (so routes get past the lookup), new ones sometimes (404s). */
function params(op: Operation): Record<string, string> {
  return Object.fromEntries(pathParams(op.path).map((p) => [p, chance(0.8) ? (p === "name" ? "vm1" : "c1") : name()]));
}

function query(op: Operation): Record<string, string> {
  return Object.fromEntries(
    Object.entries(op.query ?? {})
      .filter(() => chance(0.5))
      .map(([k, q]) => [k, String(valid(q.schema))]),
  );
}

function validReq(op: Operation): Req {
  const r: Req = { method: op.method, url: url(op, params(op), query(op)), why: "valid" };
  if (op.body !== undefined && (op.body.required || chance(0.8))) {
    r.payload = JSON.stringify(valid(op.body.schema));
    r.headers = { "content-type": "application/json" };
  }
  return r;
}

function invalidReq(op: Operation): Req {
  const p = params(op);
  const q = query(op);
  const body = op.body === undefined ? undefined : (valid(op.body.schema) as Record<string, unknown>);
  const kinds = ["query-unknown"];
  if (Object.keys(op.query ?? {}).length > 0) kinds.push("query-wrong");
  if (pathParams(op.path).length > 0) kinds.push("param-wrong");
  if (op.body !== undefined) kinds.push("body-wrong", "body-unknown", "body-not-object", "content-type");
  if (op.body?.required) kinds.push("body-missing");
  const bodySchema = op.body === undefined ? undefined : resolve(op.body.schema);
  if (((bodySchema?.required ?? []) as string[]).length > 0) kinds.push("body-missing-key");
  const kind = pick(kinds);
  let payload = body === undefined ? undefined : JSON.stringify(body);
  let ct = "application/json";
  let why = kind;
  switch (kind) {
    case "query-unknown":
      q[pick(["bogus", "Roots", "name", "x"])] = "1";
      break;
    case "query-wrong": {
      const k = pick(Object.keys(op.query ?? {}));
      q[k] = String(wrong(op.query?.[k]?.schema ?? {}));
      why += ` ${k}=${q[k]}`;
      break;
    }
    case "param-wrong": {
      const k = pick(pathParams(op.path));
      p[k] = String(wrong({ type: "string", pattern: "^[a-zA-Z0-9_-][a-zA-Z0-9_.-]*$" }));
      why += ` ${k}=${p[k].slice(0, 20)}`;
      break;
    }
    case "body-wrong": {
      const props = Object.entries((bodySchema?.properties ?? {}) as Record<string, JsonSchema>);
      const [k, s] = pick(props);
      payload = JSON.stringify({ ...body, [k]: wrong(s) });
      break;
    }
    case "body-unknown":
      payload = JSON.stringify({ ...body, [pick(["bogus", "xml2", "Durable", "__proto__x"])]: true });
      break;
    case "body-not-object":
      payload = pick(["[1,2]", "[]", "null", '"hello"', "5", "true"]);
      break;
    case "content-type":
      ct = pick(["text/plain", "application/xml", "application/x-www-form-urlencoded", "text/plain; charset=utf-8"]);
      payload = pick(["hello", payload ?? "{}"]);
      break;
    case "body-missing":
      payload = undefined;
      break;
    case "body-missing-key": {
      const k = pick((bodySchema?.required ?? []) as string[]);
      const { [k]: _gone, ...rest } = body ?? {};
      payload = JSON.stringify(rest);
      break;
    }
  }
  if (payload !== undefined) why += ` ${payload.slice(0, 60)}`;
  return {
    method: op.method,
    url: url(op, p, q),
    why,
    ...(payload === undefined ? {} : { payload, headers: { "content-type": ct } }),
  };
}

interface Res {
  statusCode: number;
  headers: Record<string, unknown>;
  body: string;
  json(): unknown;
}

/** The event stream never ends: over a real socket, its status, headers and first line. */
async function overHttp(app: ReturnType<typeof stubApi>["app"], r: Req): Promise<Res> {
  const address = await app.listen({ host: "127.0.0.1", port: 0 });
  return new Promise((resolve, reject) => {
    const req = http.request(`${address}${r.url}`, { method: r.method, headers: r.headers }, (res) => {
      let body = "";
      const done = () => {
        req.destroy();
        const first = res.statusCode === 200 ? (body.split("\n")[0] ?? "") : body;
        resolve({ statusCode: res.statusCode ?? 0, headers: res.headers, body: first, json: () => JSON.parse(first) });
      };
      res.on("data", (d: Buffer) => {
        body += d.toString();
        if (body.includes("\n")) done();
      });
      res.on("end", done);
    });
    req.on("error", reject);
    req.end(r.payload);
  });
}

const errorValidator = validator({ $ref: "#/components/schemas/Error" });
const counts = { valid: 0, invalid: 0, wrongMethod: 0, statuses: {} as Record<string, number> };

async function check(t: TT, op: Operation, r: Req, expectRefusal: boolean): Promise<void> {
  const running = chance(0.5);
  // A request that may change the stub's state gets its own; the others share one (a refused request that
  // changed something anyway shows in `calls` and fails the test).
  const fresh = (!expectRefusal && r.method !== "GET") || op.operationId === "getEvents";
  const stub = fresh ? stubApi(["vm1", "vm2"], running ? ["vm1"] : []) : shared(running);
  const { app } = stub;
  const callsBefore = stub.calls.length;
  const before = (await app.inject({ method: "GET", url: "/v1/domains" })).body;
  const res =
    op.operationId === "getEvents"
      ? await overHttp(app, r)
      : await app.inject({ method: r.method as "GET", url: r.url, payload: r.payload, headers: r.headers });
  const status = String(res.statusCode);
  counts.statuses[status] = (counts.statuses[status] ?? 0) + 1;
  const label = `${op.operationId} ${r.method} ${r.url.slice(0, 80)} (${r.why}) → ${status} ${res.body.slice(0, 120)}`;
  const documented = op.responses[status];
  if (documented === undefined) {
    t.fail(`undocumented status: ${label}`);
    return;
  }
  const mt = String(res.headers["content-type"] ?? "").split(";")[0] ?? "";
  const content = documented.content ?? { "application/json": { $ref: "#/components/schemas/Error" } };
  const schema = content[mt];
  if (schema === undefined) {
    t.fail(`undocumented media type ${mt}: ${label}`);
    return;
  }
  if (mt === "application/json") {
    const v = validator(schema);
    if (!v(res.json())) t.fail(`body does not match the document (${ajv.errorsText(v.errors)}): ${label}`);
  }
  // a request valid by the document is never refused by the route schemas (their messages name the part)
  if (!expectRefusal && status === "400" && /^(body|querystring|params)\b/.test((res.json() as { message: string }).message))
    t.fail(`a valid request refused by the schemas: ${label}`);
  if (!expectRefusal && ["405", "413", "415"].includes(status)) t.fail(`a valid request refused: ${label}`);
  if (expectRefusal) {
    if (!["400", "415"].includes(status)) t.fail(`invalid request not refused: ${label}`);
    else if (!errorValidator(res.json())) t.fail(`refusal without the error body: ${label}`);
    const calls = stub.calls.slice(callsBefore);
    if (calls.length > 0) t.fail(`a refused request changed something (${calls.join("; ")}): ${label}`);
    const after = (await app.inject({ method: "GET", url: "/v1/domains" })).body;
    if (after !== before) t.fail(`a refused request changed the domains: ${label}`);
  }
  if (fresh) await app.close();
}

const stubs = new Map<boolean, ReturnType<typeof stubApi>>();
/** One stub with vm1's job running and one without, shared by the requests that change nothing. */
function shared(running: boolean): ReturnType<typeof stubApi> {
  let s = stubs.get(running);
  if (s === undefined) {
    s = stubApi(["vm1", "vm2"], running ? ["vm1"] : []);
    stubs.set(running, s);
  }
  return s;
}

t.teardown(async () => {
  for (const s of stubs.values()) await s.app.close();
});

t.test(`generated requests per operation (seed ${SEED})`, async (t) => {
  for (const op of operations) {
    for (let i = 0; i < ROUNDS; i++) {
      const r = validReq(op);
      // the generator's own check: the request is valid by the document
      if (r.payload !== undefined && op.body !== undefined) t.ok(validator(op.body.schema)(JSON.parse(r.payload)), "generated body valid");
      await check(t, op, r, false);
      counts.valid++;
    }
    for (let i = 0; i < ROUNDS; i++) {
      await check(t, op, invalidReq(op), true);
      counts.invalid++;
    }
  }
  t.pass(`requests: ${counts.valid} valid, ${counts.invalid} invalid; statuses ${JSON.stringify(counts.statuses)}`);
});

t.test("a wrong method on every documented path: 405 with Allow, nothing changed", async (t) => {
  const byPath = new Map<string, Operation[]>();
  for (const op of operations) byPath.set(op.path, [...(byPath.get(op.path) ?? []), op]);
  for (const [path, ops] of byPath) {
    const allowed = ops.map((o) => o.method);
    for (const method of ["GET", "POST", "PUT", "DELETE", "PATCH"].filter((m) => !allowed.includes(m as Operation["method"]))) {
      const { app, calls } = stubApi(["vm1"], ["vm1"]);
      const res = await app.inject({ method: method as "GET", url: path.replace("{name}", "vm1").replace("{checkpoint}", "c1") });
      t.equal(res.statusCode, 405, `${method} ${path}`);
      for (const m of allowed) t.match(String(res.headers.allow), m);
      t.ok(errorValidator(res.json()));
      t.same(calls, []);
      counts.wrongMethod++;
      await app.close();
    }
  }
  t.pass(`wrong-method requests: ${counts.wrongMethod}`);
});
