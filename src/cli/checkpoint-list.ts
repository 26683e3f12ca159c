/**
 * `checkpoint-list` as virsh computes it (tools/virsh-checkpoint.c), done on
 * the client from the daemon's full list, so every filter combines with every
 * other the way virsh's flags do. Pure functions; never talks to the daemon.
 */
import { err, ok, type Result } from "neverthrow";

export interface CheckpointRow {
  readonly name: string;
  readonly parent: string | null;
  readonly creationTime: number;
  readonly valid: boolean | null;
  readonly current: boolean;
  readonly disks?: readonly { readonly name: string; readonly volatile?: boolean }[];
}

/** The disks whose bitmap in this checkpoint is volatile (raw disks: gone when their QEMU process ends). */
export function volatileDisks(c: CheckpointRow): string[] {
  return (c.disks ?? []).filter((d) => d.volatile === true).map((d) => d.name);
}

export interface ListOptions {
  readonly name?: boolean | undefined;
  readonly tree?: boolean | undefined;
  readonly roots?: boolean | undefined;
  readonly leaves?: boolean | undefined;
  readonly noLeaves?: boolean | undefined;
  readonly topological?: boolean | undefined;
  readonly parent?: boolean | undefined;
  readonly from?: string | undefined;
  readonly descendants?: boolean | undefined;
}

export type ListError = { readonly code: "usage"; readonly message: string } | { readonly code: "not-found"; readonly message: string };

/** virsh's exclusions, in its order and words. */
export function listOptionsCheck(o: ListOptions): Result<void, ListError> {
  const pairs: [keyof ListOptions, keyof ListOptions][] = [
    ["tree", "name"],
    ["parent", "roots"],
    ["parent", "tree"],
    ["roots", "tree"],
    ["roots", "from"],
  ];
  const flag = (k: keyof ListOptions) => `--${k}`;
  for (const [a, b] of pairs)
    if (o[a] !== undefined && o[a] !== false && o[b] !== undefined && o[b] !== false)
      return err({ code: "usage", message: `options ${flag(a)} and ${flag(b)} are mutually exclusive` });
  if (o.tree && o.leaves) return err({ code: "usage", message: "--leaves and --tree are mutually exclusive" });
  if (o.tree && o.noLeaves) return err({ code: "usage", message: "--no-leaves and --tree are mutually exclusive" });
  if (o.descendants && o.from === undefined) return err({ code: "usage", message: "--descendants requires --from" });
  return ok(undefined);
}

/** Parents before children; among siblings and roots, by name (a stable order for a test). */
function topological(all: readonly CheckpointRow[]): CheckpointRow[] {
  const kids = new Map<string | null, CheckpointRow[]>();
  const names = new Set(all.map((c) => c.name));
  for (const c of all) {
    const p = c.parent !== null && names.has(c.parent) ? c.parent : null;
    kids.set(p, [...(kids.get(p) ?? []), c]);
  }
  const out: CheckpointRow[] = [];
  const walk = (p: string | null) => {
    for (const c of [...(kids.get(p) ?? [])].sort(byName)) {
      out.push(c);
      walk(c.name);
    }
  };
  walk(null);
  return out;
}

/** virsh sorts with vshStrcasecmp. */
function byName(a: CheckpointRow, b: CheckpointRow): number {
  const x = a.name.toLowerCase();
  const y = b.name.toLowerCase();
  return x < y ? -1 : x > y ? 1 : 0;
}

/**
 * The rows virsh lists, in its order. With --tree and --from, the starting
 * checkpoint is included as the tree's root (virsh does the same).
 */
export function checkpointListSelect(all: readonly CheckpointRow[], o: ListOptions): Result<CheckpointRow[], ListError> {
  const checked = listOptionsCheck(o);
  if (checked.isErr()) return err(checked.error);
  const byNameMap = new Map(all.map((c) => [c.name, c]));
  const hasChildren = new Set(all.map((c) => c.parent).filter((p): p is string => p !== null));
  let list: CheckpointRow[] = [...all];
  if (o.from !== undefined) {
    const start = byNameMap.get(o.from);
    if (start === undefined) return err({ code: "not-found", message: `checkpoint '${o.from}' does not exist` });
    // with --tree virsh lists all descendants (the tree below --from)
    const deep = o.descendants === true || o.tree === true;
    const below = new Set<string>([o.from]);
    const picked: CheckpointRow[] = [];
    let grew = true;
    while (grew) {
      grew = false;
      for (const c of all)
        if (c.parent !== null && below.has(c.parent) && !picked.includes(c) && (deep || c.parent === o.from)) {
          picked.push(c);
          below.add(c.name);
          grew = true;
        }
    }
    list = o.tree ? [start, ...picked] : picked;
  }
  if (o.roots) list = list.filter((c) => c.parent === null);
  if (o.leaves) list = list.filter((c) => !hasChildren.has(c.name));
  if (o.noLeaves) list = list.filter((c) => hasChildren.has(c.name));
  if (o.topological) {
    const keep = new Set(list);
    return ok(topological(all).filter((c) => keep.has(c)));
  }
  return ok(list.sort(byName));
}

/** virsh's tree (vshTreePrint): roots are the rows without a parent among the rows. */
export function checkpointTreeRender(rows: readonly CheckpointRow[], from?: string): string {
  const names = new Set(rows.map((c) => c.name));
  const isRoot = (c: CheckpointRow) => c.name === from || c.parent === null || !names.has(c.parent);
  const kids = (p: string) => rows.filter((c) => c.parent === p && c.name !== from).sort(byName);
  const lines: string[] = [];
  const walk = (c: CheckpointRow, prefix: string, last: boolean, top: boolean) => {
    lines.push(top ? c.name : `${prefix}${last ? "└─ " : "├─ "}${c.name}`);
    const ks = kids(c.name);
    const next = top ? "" : `${prefix}${last ? "   " : "│  "}`;
    ks.forEach((k, i) => walk(k, next, i === ks.length - 1, false));
  };
  for (const r of rows.filter(isRoot).sort(byName)) walk(r, "", true, true);
  return lines.length === 0 ? "" : `${lines.join("\n")}\n`;
}

/** "%Y-%m-%d %H:%M:%S %z" in local time, as virsh prints a creation time. */
export function localTime(epochSeconds: number): string {
  const d = new Date(epochSeconds * 1000);
  const p = (n: number, w = 2) => String(Math.abs(n)).padStart(w, "0");
  const off = -d.getTimezoneOffset();
  const z = `${off >= 0 ? "+" : "-"}${p(Math.trunc(Math.abs(off) / 60))}${p(Math.abs(off) % 60)}`;
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())} ${z}`;
}
