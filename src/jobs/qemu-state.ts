/**
 * One read of what QEMU has that a backup job may own: jobs, named nodes,
 * exports and dirty bitmaps. Used by adoption (reconcile.ts) and by undo,
 * which loops until this says its objects are gone.
 */
import { ResultAsync } from "neverthrow";
import type { QmpClient } from "../qmp/client.js";
import type { QmpError } from "../qmp/errors.js";
import type { QemuSnapshot } from "./reconcile.js";

export function readQemuState(client: QmpClient): ResultAsync<QemuSnapshot, QmpError> {
  return ResultAsync.combine([
    client.execute("query-jobs"),
    client.execute("query-named-block-nodes", { flat: true }),
    client.execute("query-block-exports"),
  ] as const).map(([jobs, nodes, exports]) => ({
    jobs: jobs.map((j) => ({ id: j.id, status: j.status, error: j.error })),
    nodes: new Set(nodes.flatMap((n) => (n["node-name"] === undefined ? [] : [n["node-name"]]))),
    exports: new Set(exports.map((e) => e.id)),
    bitmaps: new Set(nodes.flatMap((n) => (n["dirty-bitmaps"] ?? []).map((b) => `${n["node-name"]}/${b.name}`))),
  }));
}
