/**
 * The API refuses what its contract does not allow, before anything happens:
 * wrong types, non-object bodies, wrong content types, unknown query values,
 * wrong methods; and names up to the limit are addressable on every route.
 */
import t from "tap";
import { MAX_NAME_BYTES } from "../../src/conf/names.js";
import { stubApi } from "../helpers/api-stub.js";

const json = { "content-type": "application/json" };

t.test("wrong types and non-object bodies are refused with 400/415 and {code,message}; nothing happens", async (t) => {
  const cases: {
    method: "POST" | "PUT" | "GET" | "DELETE";
    url: string;
    payload?: string;
    headers?: Record<string, string>;
    status: number;
  }[] = [
    { method: "POST", url: "/v1/domains/vm1/backup", payload: '{"backupXml":123}', headers: json, status: 400 },
    { method: "POST", url: "/v1/domains/vm1/backup", payload: "hello", headers: { "content-type": "text/plain" }, status: 415 },
    { method: "POST", url: "/v1/domains/vm1/backup", payload: "[1,2]", headers: json, status: 400 },
    { method: "POST", url: "/v1/domains/vm1/backup", payload: '{"reuseExternal":"yes"}', headers: json, status: 400 },
    { method: "POST", url: "/v1/domains/vm1/backup", payload: '{"unknownKey":true}', headers: json, status: 400 },
    { method: "POST", url: "/v1/domains/vm1/checkpoints", payload: '{"xml":5}', headers: json, status: 400 },
    { method: "POST", url: "/v1/domains/vm1/checkpoints", payload: "null", headers: json, status: 400 },
    { method: "POST", url: "/v1/domains", payload: '["vm9"]', headers: json, status: 400 },
    { method: "POST", url: "/v1/domains", payload: '{"name":"vm9","qmp":5}', headers: json, status: 400 },
    { method: "PUT", url: "/v1/domains/vm1/backup/bandwidth", payload: '{"bandwidth":"5"}', headers: json, status: 400 },
    { method: "GET", url: "/v1/domains/vm1/backup?completed=maybe", status: 400 },
    { method: "GET", url: "/v1/domains/vm1/checkpoints?roots=2", status: 400 },
    { method: "GET", url: "/v1/domains/vm1/backup/wait?timeout=soon", status: 400 },
    { method: "DELETE", url: "/v1/domains/vm1/checkpoints/c1?children=perhaps", status: 400 },
  ];
  for (const c of cases) {
    const { app, calls } = stubApi(["vm1"], []);
    const r = await app.inject({ method: c.method, url: c.url, payload: c.payload, headers: c.headers });
    t.equal(r.statusCode, c.status, `${c.method} ${c.url} ${c.payload ?? ""}`);
    const b = r.json() as Record<string, unknown>;
    t.same(Object.keys(b).sort(), ["code", "message"], "the stable error body");
    t.same(calls, [], "nothing was called");
  }
});

t.test("valid requests still pass (flags as 1/true/0, empty bodies)", async (t) => {
  const { app, calls } = stubApi(["vm1"], []);
  t.equal((await app.inject({ method: "POST", url: "/v1/domains/vm1/backup" })).statusCode, 201, "no body");
  t.equal(
    (await app.inject({ method: "POST", url: "/v1/domains/vm1/backup", payload: { reuseExternal: true, bandwidth: 5 } })).statusCode,
    201,
  );
  t.equal((await app.inject({ method: "GET", url: "/v1/domains/vm1/checkpoints?roots=1&topological=true" })).statusCode, 200);
  t.equal((await app.inject({ method: "GET", url: "/v1/domains/vm1/checkpoints?tree" })).statusCode, 200);
  t.equal((await app.inject({ method: "POST", url: "/v1/domains/vm1/checkpoints", payload: {} })).statusCode, 201);
  t.equal(calls.length, 3);
  t.match(calls[1], /"reuseExternal":true/);
});

t.test("a wrong method on a known path answers 405 with Allow", async (t) => {
  const { app } = stubApi();
  for (const [method, url, allow] of [
    ["PUT", "/v1/health", /GET/],
    ["DELETE", "/v1/domains", /GET.*POST|POST.*GET/],
    ["POST", "/v1/domains/vm1", /DELETE/],
    ["PUT", "/v1/domains/vm1/backup", /POST/],
    ["POST", "/v1/domains/vm1/backup/xml", /GET/],
    ["POST", "/v1/domains/vm1/backup/wait", /GET/],
    ["GET", "/v1/domains/vm1/backup/bandwidth", /PUT/],
    ["PUT", "/v1/domains/vm1/checkpoints", /GET/],
    ["POST", "/v1/domains/vm1/checkpoints/c1", /DELETE/],
    ["DELETE", "/v1/domains/vm1/checkpoints/c1/xml", /GET/],
    ["POST", "/v1/metrics", /GET/],
    ["POST", "/v1/events", /GET/],
  ] as const) {
    const r = await app.inject({ method, url });
    t.equal(r.statusCode, 405, `${method} ${url}`);
    t.match(String(r.headers.allow), allow);
    t.equal((r.json() as { code: string }).code, "method-not-allowed");
  }
  const r = await app.inject({ method: "GET", url: "/v1/nothing" });
  t.equal(r.statusCode, 404, "an unknown path stays 404");
});

t.test("names up to the limit are addressable on every route; longer ones are refused at registration", async (t) => {
  const long = "d".repeat(MAX_NAME_BYTES);
  const { app, calls } = stubApi([long], [long]);
  for (const [method, path] of [
    ["GET", ""],
    ["GET", "/backup"],
    ["GET", "/backup/xml"],
    ["GET", "/backup/wait?timeout=0"],
    ["GET", "/checkpoints"],
    ["GET", "/checkpoints/c1"],
    ["GET", "/checkpoints/c1/xml"],
    ["DELETE", "/backup"],
  ] as const) {
    const r = await app.inject({ method, url: `/v1/domains/${long}${path}` });
    t.equal(r.statusCode, 200, `${method} …${path}`);
  }
  const cp = "c".repeat(MAX_NAME_BYTES);
  const r = await app.inject({ method: "GET", url: `/v1/domains/${long}/checkpoints/${cp}` });
  t.equal(r.statusCode, 404, "a checkpoint name at the limit reaches the route");
  t.equal((r.json() as { code: string }).code, "not-found");
  t.equal((await app.inject({ method: "DELETE", url: `/v1/domains/${long}` })).statusCode, 200, "and removed");
  const tooLong = await app.inject({ method: "POST", url: "/v1/domains", payload: { name: `${long}x`, qmp: "/x" } });
  t.equal(tooLong.statusCode, 400);
  t.ok(calls.includes(`remove ${long}`));
  t.notOk(
    calls.some((c) => c.startsWith("add")),
    "nothing registered",
  );
  const huge = await app.inject({ method: "GET", url: `/v1/domains/${"x".repeat(5000)}` });
  t.equal(huge.statusCode, 400, "a name far over the limit: 400, not fastify's 414");
  t.same(Object.keys(huge.json() as object).sort(), ["code", "message"]);
});

t.test("a name outside the rules: the message says which rule broke", async (t) => {
  const { app } = stubApi();
  const cases: [string, string, object | undefined, RegExp][] = [
    ["POST", "/v1/domains", { name: "../evil", qmp: "/x" }, /body\/name: domain name '..\/evil' must not start with '.'/],
    ["POST", "/v1/domains", { name: "a b", qmp: "/x" }, /white space/],
    ["POST", "/v1/domains", { name: "x".repeat(MAX_NAME_BYTES + 1), qmp: "/x" }, new RegExp(`longer than ${MAX_NAME_BYTES} bytes`)],
    ["GET", "/v1/domains/.hidden", undefined, /params\/name: domain name '.hidden' must not start with '.'/],
    ["GET", "/v1/domains/vm1/checkpoints/a%20b", undefined, /params\/checkpoint: checkpoint name 'a b' must not contain white space/],
  ];
  for (const [method, url, payload, message] of cases) {
    const r = await app.inject({ method: method as "GET", url, ...(payload === undefined ? {} : { payload }) });
    t.equal(r.statusCode, 400);
    t.match(r.json(), { code: "bad-request", message }, url);
  }
});
