/**
 * The error-code tables: every code of every error union that reaches the
 * API maps to an HTTP status (src/api/errors.ts), and through it to a CLI
 * exit code (src/cli/exit-codes.ts), as the README documents them.
 *
 * Exhaustive by type: EXPECTED is a Record over ApiErrorCode, and each
 * layer's table a Record over that layer's codes, so adding a code to any
 * union fails `npm run typecheck` until it is given its status and exit code
 * here. The unions that do not reach the API as such (QmpError, AgentError)
 * are wrapped as "qmp" and "agent"; that is checked too.
 */
import t from "tap";
import { type ApiErrorCode, errorBody, httpStatus } from "../../src/api/errors.js";
import type { CheckpointError } from "../../src/checkpoints/errors.js";
import { fromAgent, fromQmp } from "../../src/checkpoints/errors.js";
import { EXIT, exitCodeForStatus } from "../../src/cli/exit-codes.js";
import type { ConfErrorCode } from "../../src/conf/errors.js";
import type { BackupErrorCode } from "../../src/jobs/errors.js";

type Row = readonly [status: number, exit: number];

/** Hand-written from the README's exit codes: 1 failed · 2 usage/request · 3 not found · 4 conflict · 5 unreachable · 6 timed out. */
const CONF = {
  "xml-malformed": [400, EXIT.usage],
  "xml-invalid": [400, EXIT.usage],
  "invalid-name": [400, EXIT.usage],
  "unknown-disk": [400, EXIT.usage],
  "config-invalid": [400, EXIT.usage],
  "unsupported-disk": [400, EXIT.usage],
} as const satisfies Record<ConfErrorCode, Row>;

const CHECKPOINT = {
  ...CONF,
  io: [500, EXIT.failed],
  "not-found": [404, EXIT.notFound],
  duplicate: [409, EXIT.conflict],
  "bitmap-missing": [409, EXIT.conflict],
  "checkpoint-invalid": [409, EXIT.conflict],
  qmp: [502, EXIT.failed],
  agent: [502, EXIT.failed],
} as const satisfies Record<CheckpointError["code"], Row>;

const BACKUP = {
  ...CHECKPOINT,
  busy: [409, EXIT.conflict],
  "not-connected": [503, EXIT.unavailable],
  "path-refused": [403, EXIT.conflict],
  "target-exists": [409, EXIT.conflict],
  unsupported: [422, EXIT.usage],
  "no-job": [404, EXIT.notFound],
  image: [500, EXIT.failed],
  timeout: [504, EXIT.timeout],
  "job-failed": [500, EXIT.failed],
  aborted: [409, EXIT.conflict],
} as const satisfies Record<BackupErrorCode, Row>;

const EXPECTED = {
  ...BACKUP,
  "unknown-domain": [404, EXIT.notFound],
  "bad-request": [400, EXIT.usage],
  "too-large": [413, EXIT.usage],
  "method-not-allowed": [405, EXIT.usage],
  "unsupported-media-type": [415, EXIT.usage],
  internal: [500, EXIT.failed],
  "set-corrupt": [409, EXIT.conflict],
  "set-foreign": [409, EXIT.conflict],
} as const satisfies Record<ApiErrorCode, Row>;

t.test("every API error code: its HTTP status and the CLI's exit code", async (t) => {
  const codes = Object.keys(EXPECTED) as ApiErrorCode[];
  for (const code of codes) {
    const [status, exit] = EXPECTED[code];
    t.equal(httpStatus(code), status, `${code} → HTTP ${status}`);
    t.equal(exitCodeForStatus(httpStatus(code)), exit, `${code} → exit ${exit}`);
  }
});

t.test("a code outside the union is a programming error, not a silent 500", async (t) => {
  t.throws(() => httpStatus("no-such-code" as ApiErrorCode), /unexpected error code: "no-such-code"/);
});

t.test("exit codes by status: success, and statuses no code maps to", async (t) => {
  for (const s of [200, 201, 202, 204, 302]) t.equal(exitCodeForStatus(s), EXIT.ok, `${s}`);
  for (const s of [401, 500, 501, 502]) t.equal(exitCodeForStatus(s), EXIT.failed, `${s}: the operation failed`);
  t.same(new Set(Object.values(EXIT)), new Set([0, 1, 2, 3, 4, 5, 6]), "exit codes 0-6, each documented in the README");
});

t.test("QMP and agent errors reach the API wrapped, keeping their cause", async (t) => {
  const q = fromQmp("adding the bitmap", { code: "disconnected", message: "connection closed by peer" });
  t.match(q, { code: "qmp", message: /^adding the bitmap: /, cause: { code: "disconnected" } });
  t.equal(httpStatus(q.code), 502);
  const a = fromAgent("freezing", { code: "agent-timeout", command: "guest-fsfreeze-freeze", timeoutMs: 10 });
  t.match(a, { code: "agent", message: "freezing: guest-fsfreeze-freeze timed out after 10 ms" });
  t.equal(httpStatus(a.code), 502);
  t.same(errorBody(a), { code: "agent", message: a.message }, "the body carries code and message only, not the cause");
});
