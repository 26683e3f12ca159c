/**
 * What the QEMU at the other end can do: its version, and from
 * query-qmp-schema whether the commands and optional members qbackupd relies
 * on exist. A QEMU older than MIN_QEMU_VERSION is refused with a clear error.
 */
import { errAsync, okAsync, type ResultAsync } from "neverthrow";
import type { QmpClient } from "./client.js";
import type { QmpError } from "./errors.js";
import type { SchemaInfo, VersionTriple } from "./qapi.js";

/** block-export-add with a `bitmaps` list and job-based backups with auto-dismiss need 5.2; we test from 7.2. */
export const MIN_QEMU_VERSION: VersionTriple = { major: 6, minor: 0, micro: 0 };

/** Commands without which no backup can run. */
export const REQUIRED_COMMANDS = [
  "blockdev-add",
  "blockdev-del",
  "blockdev-backup",
  "transaction",
  "block-dirty-bitmap-add",
  "block-dirty-bitmap-merge",
  "block-dirty-bitmap-remove",
  "query-jobs",
  "job-dismiss",
  "job-cancel",
  "nbd-server-start",
  "block-export-add",
  "block-export-del",
] as const;

export interface QemuCapabilities {
  readonly version: VersionTriple;
  readonly package: string;
  /** blockdev-backup's experimental `x-perf` (use-copy-range, max-workers, max-chunk). */
  readonly backupPerf: boolean;
  /** blockdev-backup's `filter-node-name`. */
  readonly backupFilterNodeName: boolean;
  /** block-export-add's `allocation-depth` (qemu:allocation-depth meta context). */
  readonly exportAllocationDepth: boolean;
  /** BlockDirtyInfo's `inconsistent` flag (QEMU marks bitmaps after an unclean exit). */
  readonly bitmapInconsistent: boolean;
  /** The `commands` the schema lists, for anyone who needs to ask more. */
  readonly commands: ReadonlySet<string>;
}

export function versionAtLeast(v: VersionTriple, min: VersionTriple): boolean {
  if (v.major !== min.major) return v.major > min.major;
  if (v.minor !== min.minor) return v.minor > min.minor;
  return v.micro >= min.micro;
}

export function formatVersion(v: VersionTriple): string {
  return `${v.major}.${v.minor}.${v.micro}`;
}

/** Pure: derive capabilities from a version and a schema (testable with a captured schema). */
export function capabilitiesFromSchema(version: VersionTriple, pkg: string, schema: readonly SchemaInfo[]): QemuCapabilities {
  const byName = new Map(schema.map((s) => [s.name, s]));
  const commands = new Set(schema.filter((s) => s["meta-type"] === "command").map((s) => s.name));
  // an alternate's members have no name
  const names = (s: SchemaInfo | undefined): string[] => (s?.members ?? []).flatMap((m) => (m.name === undefined ? [] : [m.name]));
  const members = (command: string): Set<string> => {
    const argType = byName.get(command)?.["arg-type"];
    const t = argType === undefined ? undefined : byName.get(argType);
    return new Set(names(t));
  };
  const typeMembers = (pred: (s: SchemaInfo) => boolean): Set<string> => new Set(schema.filter(pred).flatMap(names));
  const backup = members("blockdev-backup");
  // block-export-add's argument type is a union object; its nbd variant carries the members.
  const exportMembers = typeMembers((s) => s["meta-type"] === "object" && (s.members ?? []).some((m) => m.name === "bitmaps"));
  const dirtyInfo = typeMembers(
    (s) =>
      s["meta-type"] === "object" &&
      (s.members ?? []).some((m) => m.name === "recording") &&
      (s.members ?? []).some((m) => m.name === "busy"),
  );
  return {
    version,
    package: pkg,
    backupPerf: backup.has("x-perf"),
    backupFilterNodeName: backup.has("filter-node-name"),
    exportAllocationDepth: exportMembers.has("allocation-depth"),
    bitmapInconsistent: dirtyInfo.has("inconsistent"),
    commands,
  };
}

/**
 * Capabilities by QEMU version and package string. A host usually runs every
 * VM on the same QEMU build, and query-qmp-schema is ~250 KiB of JSON per
 * probe: with a cache, a daemon serving many VMs parses it once per build.
 */
export type CapabilityCache = Map<string, QemuCapabilities>;

/** Ask QEMU; refuse a QEMU too old or lacking a required command. */
export function probeCapabilities(client: QmpClient, cache?: CapabilityCache): ResultAsync<QemuCapabilities, QmpError> {
  return client.execute("query-version").andThen((v) => {
    const key = `${formatVersion(v.qemu)} ${v.package}`;
    const cached = cache?.get(key);
    if (cached !== undefined) return okAsync(cached);
    if (!versionAtLeast(v.qemu, MIN_QEMU_VERSION)) {
      return errAsync<never, QmpError>({
        code: "unsupported",
        message: `QEMU ${formatVersion(v.qemu)} is too old: qbackupd needs QEMU ${formatVersion(MIN_QEMU_VERSION)} or newer`,
      });
    }
    return client.execute("query-qmp-schema").andThen((schema) => {
      const caps = capabilitiesFromSchema(v.qemu, v.package, schema);
      const missing = REQUIRED_COMMANDS.filter((c) => !caps.commands.has(c));
      if (missing.length > 0) {
        return errAsync<never, QmpError>({
          code: "unsupported",
          message: `QEMU ${formatVersion(v.qemu)} lacks QMP commands qbackupd needs: ${missing.join(", ")}`,
        });
      }
      cache?.set(key, caps);
      return okAsync(caps);
    });
  });
}
