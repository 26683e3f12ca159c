/**
 * The daemon's configuration file (JSON; see qbackupd.example.json) and the
 * command-line flags that override it. Parsing and validation only.
 */
import { readFileSync } from "node:fs";
import { isAbsolute, join, relative } from "node:path";
import { err, ok, type Result } from "neverthrow";
import { isLogLevel, LOG_LEVELS } from "../log.js";
import type { ConfError } from "./errors.js";
import { checkName } from "./names.js";

/** A disk registered by hand (for a VM qbackupd never saw run): its image, opened offline. */
export interface DomainDiskConfig {
  readonly name: string;
  readonly file: string;
  readonly format: "qcow2" | "raw";
}

export interface DomainConfig {
  readonly name: string;
  /** QMP socket path, or host:port; unset: the VM is backed up offline only, from `disks`. */
  readonly qmp?: string | undefined;
  /** Images registered by hand: what the disks are until QEMU is seen running (disk-memory.ts). */
  readonly disks?: readonly DomainDiskConfig[] | undefined;
  /** Guest agent socket path (for quiesce). */
  readonly agent?: string | undefined;
  /**
   * "uid:gid" QEMU runs as, to whom target and scratch files are given.
   * Unset: the owner of the QMP socket (QEMU created it), or nobody else's
   * when QMP is reached over TCP.
   */
  readonly qemuUser?: string | undefined;
}

/** "uid:gid" → numbers (validated by parseDomainConfig). */
export function parseOwner(s: string): { uid: number; gid: number } {
  const [uid, gid] = s.split(":").map(Number);
  return { uid: uid!, gid: gid! };
}

export interface DaemonConfig {
  readonly socket: string;
  readonly socketMode: number;
  /** Group that owns the API socket (name or gid); unset: the daemon's group. */
  readonly socketGroup: string | undefined;
  readonly stateDir: string;
  readonly backupDir: string;
  readonly allowDirs: readonly string[];
  readonly tlsDir: string | undefined;
  readonly allowPlainTcp: boolean;
  readonly maxBodyBytes: number;
  readonly maxConnections: number;
  readonly domains: readonly DomainConfig[];
  /** pino level name; unset: info. */
  readonly logLevel: LogLevel | undefined;
}

export type LogLevel = "trace" | "debug" | "info" | "warn" | "error" | "fatal" | "silent";

export interface ConfigFlags {
  readonly config?: string | undefined;
  readonly socket?: string | undefined;
  readonly stateDir?: string | undefined;
  /** Where targets are generated for a backup without XML (default <stateDir>/backups). */
  readonly backupDir?: string | undefined;
  readonly allowDir?: readonly string[] | undefined;
  /** --log-level (or QBACKUPD_LOG_LEVEL, which main.ts passes here): wins over the file's logLevel. */
  readonly logLevel?: string | undefined;
}

export const DEFAULT_CONFIG_PATH = "/etc/qbackupd/config.json";
export const DEFAULT_SOCKET = "/run/qbackupd/qbackupd.sock";
export const DEFAULT_STATE_DIR = "/var/lib/qbackupd";

const KEYS = new Set([
  "socket",
  "socketMode",
  "socketGroup",
  "stateDir",
  "backupDir",
  "allowDirs",
  "tlsDir",
  "allowPlainTcp",
  "maxBodyBytes",
  "maxConnections",
  "domains",
  "logLevel",
]);

const bad = (message: string): Result<never, ConfError> => err({ code: "config-invalid", message: `configuration: ${message}` });

function absPath(v: unknown, what: string): Result<string, ConfError> {
  if (typeof v !== "string" || !isAbsolute(v)) return bad(`${what} must be an absolute path`);
  return ok(v);
}

function parseDisks(v: unknown, where: string): Result<DomainDiskConfig[] | undefined, ConfError> {
  if (v === undefined) return ok(undefined);
  if (!Array.isArray(v) || v.length === 0) return bad(`${where}: disks must be a non-empty array`);
  const out: DomainDiskConfig[] = [];
  for (const [i, d] of v.entries()) {
    const at = `${where}: disks[${i}]`;
    if (typeof d !== "object" || d === null) return bad(`${at} must be an object`);
    const x = d as Record<string, unknown>;
    for (const k of Object.keys(x)) if (!["name", "file", "format"].includes(k)) return bad(`${at}: unknown key '${k}'`);
    if (typeof x.name !== "string") return bad(`${at}: name is required`);
    const n = checkName(x.name, "disk name");
    if (n.isErr()) return err(n.error);
    const f = absPath(x.file, `${at}: file`);
    if (f.isErr()) return err(f.error);
    const format = x.format ?? "qcow2";
    if (format !== "qcow2" && format !== "raw") return bad(`${at}: format must be qcow2 or raw`);
    if (out.some((o) => o.name === x.name)) return bad(`${at}: disk '${x.name}' is listed twice`);
    out.push({ name: x.name, file: f.value, format });
  }
  return ok(out);
}

export function parseDomainConfig(v: unknown, where: string): Result<DomainConfig, ConfError> {
  if (typeof v !== "object" || v === null) return bad(`${where} must be an object`);
  const o = v as Record<string, unknown>;
  for (const k of Object.keys(o))
    if (!["name", "qmp", "agent", "qemuUser", "disks"].includes(k)) return bad(`${where}: unknown key '${k}'`);
  if (typeof o.name !== "string") return bad(`${where}: name is required`);
  const n = checkName(o.name, "domain name");
  if (n.isErr()) return err(n.error);
  if (o.qmp !== undefined && (typeof o.qmp !== "string" || o.qmp === "")) return bad(`${where}: qmp must be a socket path or host:port`);
  const disks = parseDisks(o.disks, where);
  if (disks.isErr()) return err(disks.error);
  if (o.qmp === undefined && disks.value === undefined) return bad(`${where}: qmp (socket path or host:port) or disks is required`);
  if (o.agent !== undefined) {
    const a = absPath(o.agent, `${where}: agent`);
    if (a.isErr()) return err(a.error);
  }
  if (o.qemuUser !== undefined && (typeof o.qemuUser !== "string" || !/^\d{1,10}:\d{1,10}$/.test(o.qemuUser)))
    return bad(`${where}: qemuUser must be "uid:gid" (numbers)`);
  return ok({
    name: o.name,
    ...(typeof o.qmp === "string" ? { qmp: o.qmp } : {}),
    ...(disks.value !== undefined ? { disks: disks.value } : {}),
    ...(typeof o.agent === "string" ? { agent: o.agent } : {}),
    ...(typeof o.qemuUser === "string" ? { qemuUser: o.qemuUser } : {}),
  });
}

/** Merge file and flags (flags win) and validate. `fileText` undefined: no file. */
export function parseConfig(fileText: string | undefined, flags: ConfigFlags): Result<DaemonConfig, ConfError> {
  let o: Record<string, unknown> = {};
  if (fileText !== undefined) {
    try {
      const parsed: unknown = JSON.parse(fileText);
      if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) return bad("the file must hold a JSON object");
      o = parsed as Record<string, unknown>;
    } catch (e) {
      return bad(`not valid JSON: ${(e as Error).message}`);
    }
  }
  for (const k of Object.keys(o)) if (!KEYS.has(k)) return bad(`unknown key '${k}'`);
  const stateDir = absPath(flags.stateDir ?? o.stateDir ?? DEFAULT_STATE_DIR, "stateDir");
  if (stateDir.isErr()) return err(stateDir.error);
  const socket = absPath(flags.socket ?? o.socket ?? DEFAULT_SOCKET, "socket");
  if (socket.isErr()) return err(socket.error);
  const backupDir = absPath(flags.backupDir ?? o.backupDir ?? join(stateDir.value, "backups"), "backupDir");
  if (backupDir.isErr()) return err(backupDir.error);
  const allowRaw = flags.allowDir !== undefined && flags.allowDir.length > 0 ? flags.allowDir : (o.allowDirs ?? [backupDir.value]);
  if (!Array.isArray(allowRaw)) return bad("allowDirs must be a list of absolute paths");
  const allowDirs: string[] = [];
  for (const a of allowRaw) {
    const p = absPath(a, "allowDirs entry");
    if (p.isErr()) return err(p.error);
    allowDirs.push(p.value);
  }
  let socketMode = 0o660;
  if (o.socketMode !== undefined) {
    if (typeof o.socketMode !== "string" || !/^0?[0-7]{3}$/.test(o.socketMode))
      return bad('socketMode must be an octal string such as "0660"');
    socketMode = Number.parseInt(o.socketMode, 8);
  }
  if (o.socketGroup !== undefined && typeof o.socketGroup !== "string" && typeof o.socketGroup !== "number")
    return bad("socketGroup must be a group name or id");
  let tlsDir: string | undefined;
  if (o.tlsDir !== undefined) {
    const t = absPath(o.tlsDir, "tlsDir");
    if (t.isErr()) return err(t.error);
    tlsDir = t.value;
  }
  const int = (v: unknown, def: number, what: string, min: number, max: number): Result<number, ConfError> => {
    if (v === undefined) return ok(def);
    if (typeof v !== "number" || !Number.isInteger(v) || v < min || v > max) return bad(`${what} must be an integer from ${min} to ${max}`);
    return ok(v);
  };
  const maxBodyBytes = int(o.maxBodyBytes, 1024 * 1024, "maxBodyBytes", 1024, 64 * 1024 * 1024);
  if (maxBodyBytes.isErr()) return err(maxBodyBytes.error);
  const maxConnections = int(o.maxConnections, 128, "maxConnections", 1, 100_000);
  if (maxConnections.isErr()) return err(maxConnections.error);
  if (o.allowPlainTcp !== undefined && typeof o.allowPlainTcp !== "boolean") return bad("allowPlainTcp must be true or false");
  const logLevel = flags.logLevel ?? o.logLevel;
  if (logLevel !== undefined && !isLogLevel(logLevel))
    return bad(`logLevel must be one of ${LOG_LEVELS.join(", ")} (got ${JSON.stringify(logLevel)})`);
  const domains: DomainConfig[] = [];
  if (o.domains !== undefined) {
    if (!Array.isArray(o.domains)) return bad("domains must be a list");
    for (const [i, d] of o.domains.entries()) {
      const r = parseDomainConfig(d, `domains[${i}]`);
      if (r.isErr()) return err(r.error);
      if (domains.some((x) => x.name === r.value.name)) return bad(`domain '${r.value.name}' is listed twice`);
      domains.push(r.value);
    }
  }
  return ok({
    socket: socket.value,
    socketMode,
    socketGroup: o.socketGroup === undefined ? undefined : String(o.socketGroup),
    stateDir: stateDir.value,
    backupDir: backupDir.value,
    allowDirs,
    tlsDir,
    allowPlainTcp: o.allowPlainTcp === true,
    maxBodyBytes: maxBodyBytes.value,
    maxConnections: maxConnections.value,
    domains,
    logLevel,
  });
}

/**
 * What holds but will not work as meant: generated targets (backupDir) outside
 * every allowed directory make each backup without XML fail with "path refused".
 */
export function configWarnings(cfg: DaemonConfig): string[] {
  const inside = (dir: string, p: string) => {
    const r = relative(dir, p);
    return r === "" || (!r.startsWith("..") && !isAbsolute(r));
  };
  if (cfg.allowDirs.some((a) => inside(a, cfg.backupDir))) return [];
  return [
    `backupDir ${cfg.backupDir} is outside the allowed directories (${cfg.allowDirs.join(", ")}): a backup without XML, whose targets are generated there, will be refused; set --backup-dir (backupDir) inside one of them, or allow it`,
  ];
}

/** Read the file named by --config (required to exist) or the default path (optional). */
export function loadConfig(flags: ConfigFlags): Result<DaemonConfig, ConfError> {
  const path = flags.config ?? DEFAULT_CONFIG_PATH;
  let text: string | undefined;
  try {
    text = readFileSync(path, "utf8");
  } catch (e) {
    if (flags.config !== undefined || (e as NodeJS.ErrnoException).code !== "ENOENT") {
      return bad(`cannot read ${path}: ${(e as Error).message}`);
    }
  }
  return parseConfig(text, flags);
}
