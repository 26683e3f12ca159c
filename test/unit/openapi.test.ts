/**
 * docs/openapi.yaml is the document generated from src/api/schemas.ts, the
 * schemas the routes validate with: the file is byte for byte what the
 * generator writes, parses back to the same document, and the server has
 * exactly the documented operations.
 */
import { readFileSync } from "node:fs";
import t from "tap";
import { parse } from "yaml";
import { openapiDocument, openapiYaml, toYaml } from "../../src/api/openapi.js";
import { operations, routePath } from "../../src/api/schemas.js";
import { stubApi } from "../helpers/api-stub.js";

const file = readFileSync(new URL("../../docs/openapi.yaml", import.meta.url), "utf8");

t.test("docs/openapi.yaml is generated from the route schemas (npm run openapi)", async (t) => {
  t.equal(file, openapiYaml(), "docs/openapi.yaml is up to date; run `npm run openapi`");
  t.same(parse(file), openapiDocument(), "and parses back to the same document");
});

t.test("the YAML writer round-trips awkward strings", async (t) => {
  const v = { a: "yes", b: "1.5", c: "x: y", d: "#c", e: "multi\nline\n", f: [{ g: "-" }, []], "200": null, h: "" };
  t.same(parse(toYaml(v)), v);
});

t.test("every operation has an id, a summary and responses; ids are unique", async (t) => {
  const ids = operations.map((o) => o.operationId);
  t.equal(new Set(ids).size, ids.length);
  for (const o of operations) {
    t.ok(o.summary.length > 0, o.operationId);
    t.ok(
      Object.keys(o.responses).some((s) => s.startsWith("2")),
      `${o.operationId} has a success response`,
    );
    t.ok("400" in o.responses && "500" in o.responses, `${o.operationId} documents 400 and 500`);
    if (o.body !== undefined) t.ok("413" in o.responses && "415" in o.responses, `${o.operationId} documents 413 and 415`);
    if (o.path.includes("{name}")) t.ok("404" in o.responses, `${o.operationId} documents 404`);
  }
});

t.test("the server has exactly the documented operations", async (t) => {
  const { app } = stubApi();
  await app.ready();
  // (and no more: buildApi refuses, at start, a route that is not one of api/schemas.ts's operations)
  for (const o of operations) t.ok(app.hasRoute({ method: o.method, url: routePath(o.path) }), `${o.method} ${o.path}`);
});
