/**
 * The OpenAPI document, generated from api/schemas.ts (the same schemas the
 * routes validate with), and its YAML text. `npm run openapi` writes
 * docs/openapi.yaml; test/unit/openapi.test.ts fails when the file differs.
 * This module only builds data and text; it never touches the server.
 */
import { MAX_NAME_BYTES } from "../conf/names.js";
import { type JsonSchema, nameSchema, operations, pathParams, schemas } from "./schemas.js";

const DESCRIPTION = `HTTP/1.1 on a unix socket (default /run/qbackupd/qbackupd.sock, mode 0660).
JSON bodies (application/json only: other content types answer 415); where
libvirt takes XML (backup and checkpoint definitions) the body carries the same
XML as a string. Bodies, query and path parameters are validated against this
document before anything happens: a wrong type, an unknown key or query
parameter, a name outside the pattern or longer than ${MAX_NAME_BYTES} bytes answers 400.
Query values are strings: flags are 1, true or empty (on) and 0 or false (off).
A method a documented path does not have answers 405 with Allow; an unknown
path 404. Every error is {"code": "...", "message": "..."}; the codes by status:
400 bad-request, xml-malformed, xml-invalid, invalid-name, unknown-disk,
unsupported-disk, config-invalid · 403 path-refused · 404 unknown-domain,
not-found, no-job · 405 method-not-allowed · 409 duplicate, busy, aborted,
target-exists, bitmap-missing, checkpoint-invalid · 413 too-large ·
415 unsupported-media-type · 422 unsupported · 500 io, image, job-failed,
internal · 502 qmp, agent · 503 not-connected · 504 timeout.
`;

export function openapiDocument(): JsonSchema {
  const paths: Record<string, Record<string, unknown>> = {};
  for (const op of operations) {
    let item = paths[op.path];
    if (item === undefined) {
      const params = pathParams(op.path);
      item = params.length > 0 ? { parameters: params.map((p) => ({ name: p, in: "path", required: true, schema: nameSchema })) } : {};
      paths[op.path] = item;
    }
    const query = Object.entries(op.query ?? {}).map(([name, q]) => ({
      name,
      in: "query",
      required: false,
      schema: q.schema,
      ...(q.description === undefined ? {} : { description: q.description }),
    }));
    const responses = Object.fromEntries(
      Object.entries(op.responses).map(([status, r]) => [
        status,
        {
          description: r.description,
          content: Object.fromEntries(
            Object.entries(r.content ?? { "application/json": { $ref: "#/components/schemas/Error" } }).map(([mt, schema]) => [
              mt,
              { schema },
            ]),
          ),
        },
      ]),
    );
    item[op.method.toLowerCase()] = {
      operationId: op.operationId,
      summary: op.summary,
      ...(query.length > 0 ? { parameters: query } : {}),
      ...(op.body === undefined
        ? {}
        : { requestBody: { required: op.body.required, content: { "application/json": { schema: op.body.schema } } } }),
      responses,
    };
  }
  return {
    openapi: "3.0.3",
    info: { title: "qbackupd API", version: "1", description: DESCRIPTION },
    servers: [{ url: "http://localhost", description: "curl --unix-socket /run/qbackupd/qbackupd.sock http://localhost/v1/health" }],
    paths,
    components: { schemas },
  };
}

const RESERVED = /^(true|false|yes|no|on|off|y|n|null|~)$/i;

/** A string as a YAML scalar: plain when it is unambiguous, else JSON's double-quoted form (valid YAML). */
function scalar(s: string): string {
  return /^[A-Za-z$/][A-Za-z0-9_$/.-]*$/.test(s) && !RESERVED.test(s) ? s : JSON.stringify(s);
}

function isEmpty(v: unknown): boolean {
  return typeof v === "object" && v !== null && Object.keys(v).length === 0;
}

function leaf(v: unknown): string | undefined {
  if (v === null) return "null";
  if (typeof v === "boolean" || typeof v === "number") return String(v);
  if (typeof v === "string") return v.includes("\n") ? undefined : scalar(v);
  if (Array.isArray(v) && v.length === 0) return "[]";
  if (isEmpty(v)) return "{}";
  return undefined;
}

function lines(v: unknown, indent: string): string[] {
  if (typeof v === "string") {
    // block scalar, keeping the final newline ("|")
    return v
      .replace(/\n$/, "")
      .split("\n")
      .map((l) => (l === "" ? "" : `${indent}${l}`));
  }
  const out: string[] = [];
  if (Array.isArray(v)) {
    for (const item of v) {
      const l = leaf(item);
      if (l !== undefined) out.push(`${indent}- ${l}`);
      else {
        const inner = lines(item, `${indent}  `);
        out.push(`${indent}- ${(inner[0] ?? "").trimStart()}`, ...inner.slice(1));
      }
    }
    return out;
  }
  for (const [k, x] of Object.entries(v as Record<string, unknown>)) {
    const l = leaf(x);
    if (l !== undefined) out.push(`${indent}${scalar(k)}: ${l}`);
    else if (typeof x === "string") out.push(`${indent}${scalar(k)}: |`, ...lines(x, `${indent}  `));
    else out.push(`${indent}${scalar(k)}:`, ...lines(x, `${indent}  `));
  }
  return out;
}

/** YAML text of a JSON value (objects, arrays, strings, numbers, booleans, null). */
export function toYaml(v: unknown): string {
  return `${lines(v, "").join("\n")}\n`;
}

export function openapiYaml(): string {
  return `# Generated from src/api/schemas.ts by \`npm run openapi\`; do not edit (test/unit/openapi.test.ts checks it).\n${toYaml(openapiDocument())}`;
}
