/**
 * The checkpoint hierarchy as pure functions over a name → definition map:
 * roots, leaves, descendants, topological order, the `--tree` rendering,
 * and the consistency check run at load.
 */
import type { CheckpointDefFull } from "../conf/checkpoint.js";

export type CheckpointMap = ReadonlyMap<string, CheckpointDefFull>;

/** Oldest first; ties broken by name so output is stable. */
export function byAge(a: CheckpointDefFull, b: CheckpointDefFull): number {
  return a.creationTime - b.creationTime || (a.name < b.name ? -1 : a.name > b.name ? 1 : 0);
}

export function childrenIndex(all: CheckpointMap): Map<string | undefined, CheckpointDefFull[]> {
  const idx = new Map<string | undefined, CheckpointDefFull[]>();
  for (const c of all.values()) {
    // a parent that does not exist makes the checkpoint a root (reported by checkTree)
    const p = c.parent !== undefined && all.has(c.parent) ? c.parent : undefined;
    const list = idx.get(p);
    if (list === undefined) idx.set(p, [c]);
    else list.push(c);
  }
  for (const list of idx.values()) list.sort(byAge);
  return idx;
}

export function roots(all: CheckpointMap): CheckpointDefFull[] {
  return childrenIndex(all).get(undefined) ?? [];
}

export function leaves(all: CheckpointMap): CheckpointDefFull[] {
  const idx = childrenIndex(all);
  return [...all.values()].filter((c) => !idx.has(c.name)).sort(byAge);
}

/** Children of `name`, or all its descendants when `deep`; oldest first within each level, parents before children. */
export function descendants(all: CheckpointMap, name: string, deep: boolean): CheckpointDefFull[] {
  const idx = childrenIndex(all);
  const out: CheckpointDefFull[] = [];
  const walk = (n: string): void => {
    for (const c of idx.get(n) ?? []) {
      out.push(c);
      if (deep) walk(c.name);
    }
  };
  walk(name);
  return out;
}

/** Every checkpoint, each after its parent (depth-first from the roots, oldest sibling first). */
export function topological(all: CheckpointMap): CheckpointDefFull[] {
  const idx = childrenIndex(all);
  const out: CheckpointDefFull[] = [];
  const stack = [...(idx.get(undefined) ?? [])].reverse();
  const seen = new Set<string>();
  while (stack.length > 0) {
    const c = stack.pop()!;
    if (seen.has(c.name)) continue;
    seen.add(c.name);
    out.push(c);
    const kids = idx.get(c.name) ?? [];
    for (let i = kids.length - 1; i >= 0; i--) stack.push(kids[i]!);
  }
  return out;
}

/** `virsh checkpoint-list --tree` style rendering. */
export function renderTree(all: CheckpointMap): string {
  const idx = childrenIndex(all);
  const lines: string[] = [];
  const walk = (c: CheckpointDefFull, prefix: string, last: boolean, top: boolean): void => {
    lines.push(top ? c.name : `${prefix}${last ? "└─ " : "├─ "}${c.name}`);
    const kids = idx.get(c.name) ?? [];
    const next = top ? "" : `${prefix}${last ? "   " : "│  "}`;
    for (const [i, k] of kids.entries()) walk(k, next, i === kids.length - 1, false);
  };
  for (const r of idx.get(undefined) ?? []) walk(r, "", true, true);
  return lines.length > 0 ? `${lines.join("\n")}\n` : "";
}

/** Relations that do not hold: missing parents, cycles. Reported, never fatal. */
export function checkTree(all: CheckpointMap): string[] {
  const problems: string[] = [];
  for (const c of all.values()) {
    if (c.parent !== undefined && !all.has(c.parent)) {
      problems.push(`checkpoint '${c.name}' names parent '${c.parent}', which does not exist; treated as a root`);
    }
  }
  const reachable = new Set(topological(all).map((c) => c.name));
  for (const c of all.values()) {
    if (!reachable.has(c.name)) problems.push(`checkpoint '${c.name}' is part of a parent cycle`);
  }
  return problems;
}
