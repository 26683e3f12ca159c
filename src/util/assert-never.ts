/** Exhaustiveness guard for switches over closed unions (libvirt's `_LAST` habit). */
export function assertNever(value: never, what = "value"): never {
  throw new Error(`unexpected ${what}: ${JSON.stringify(value)}`);
}
