/**
 * Who is working on which backup set, in this daemon: one backup at a time
 * (it adds files and a point; readers may go on), a prune alone (it merges
 * and deletes images), any number of readers (restore, verify, export).
 * A request that conflicts is refused at once with what holds the set — a
 * nightly script wants a clear "busy", not a wait of unknown length.
 *
 * Keyed by the set's resolved path. It does not bind other processes: the
 * daemon is the one writer of its sets (docs/backup-sets.md).
 */
import { err, ok, type Result } from "neverthrow";
import type { SetError } from "./errors.js";

export type SetOp = "backup" | "prune" | "restore" | "verify" | "export";

const READERS: ReadonlySet<SetOp> = new Set(["restore", "verify", "export"]);

interface Held {
  readonly op: SetOp;
  readonly what: string;
}

export class SetLocks {
  private readonly held = new Map<string, Held[]>();

  /** Take the set for `op`; the returned function gives it back (once). */
  acquire(root: string, op: SetOp, what: string): Result<() => void, SetError> {
    const now = this.held.get(root) ?? [];
    const clash = now.find((h) => op === "prune" || h.op === "prune" || (op === "backup" && h.op === "backup"));
    if (clash !== undefined)
      return err({
        code: "busy",
        message: `backup set ${root} is busy: ${clash.what}${READERS.has(op) ? "" : "; try again when it is done"}`,
      });
    const mine: Held = { op, what };
    this.held.set(root, [...now, mine]);
    let given = false;
    return ok(() => {
      if (given) return;
      given = true;
      const left = (this.held.get(root) ?? []).filter((h) => h !== mine);
      if (left.length === 0) this.held.delete(root);
      else this.held.set(root, left);
    });
  }

  holders(root: string): readonly Held[] {
    return this.held.get(root) ?? [];
  }
}
