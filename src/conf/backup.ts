/**
 * <domainbackup>: parse, format and align with a domain's disks, as libvirt's
 * conf/backup_conf.c does. Pure: no QEMU, no files. The job manager fills
 * what libvirt fills at job start (export names, bitmaps, port, driver)
 * from the job's plan (src/jobs/manager.ts), so backup-dumpxml shows every
 * default.
 *
 * `internal` parsing/formatting accepts libvirt's status format (per-disk
 * `state`, `<privateData>`), which never validates against the public schema.
 */
import { err, ok, type Result } from "neverthrow";
import type { ConfError } from "./errors.js";
import { checkName } from "./names.js";
import { checkAllowed, invalid, onlyChild, parseUnsignedLong, type XmlElement, XmlWriter, xmlParse } from "./xml.js";

export type BackupMode = "push" | "pull";
export type DiskBackupMode = "full" | "incremental";
/** libvirt's virDomainBackupDiskState, kept in the internal format. */
export type BackupDiskState = "none" | "running" | "complete" | "failed" | "cancelling" | "cancelled";
const DISK_STATES: readonly BackupDiskState[] = ["none", "running", "complete", "failed", "cancelling", "cancelled"];

export type BackupServer =
  | { readonly transport: "tcp"; readonly name: string; readonly port?: number; readonly tls?: boolean }
  | { readonly transport: "unix"; readonly socket: string; readonly tls?: boolean }
  | { readonly transport: "fd"; readonly fdgroup: string; readonly tls?: boolean };

/** Where a disk's data goes: <target> (push) or <scratch> (pull). */
export interface BackupStore {
  readonly file?: string;
  readonly dev?: string;
  /** <encryption>, <seclabel>: kept and written back; the job refuses encryption. */
  readonly extra: readonly XmlElement[];
}

export interface BackupDiskDef {
  readonly name: string;
  readonly backup: boolean;
  readonly type?: "file" | "block";
  readonly backupmode?: DiskBackupMode;
  readonly incremental?: string;
  readonly exportname?: string;
  readonly exportbitmap?: string;
  /** Image format of the target/scratch (<driver type>). */
  readonly driver?: string;
  readonly store?: BackupStore;
  readonly state?: BackupDiskState;
}

export interface BackupDef {
  readonly mode: BackupMode;
  readonly incremental?: string;
  readonly server?: BackupServer;
  readonly disks?: readonly BackupDiskDef[];
  /** Internal format only: libvirt's <privateData>, opaque. */
  readonly privateData?: XmlElement;
}

export interface BackupParseOptions {
  readonly internal?: boolean;
}

/** More disks than any VM has: a larger list is not a real request. */
export const MAX_DISKS = 256;

const STORAGE_FORMATS = new Set([
  "raw",
  "qcow2",
  "qcow",
  "qed",
  "vmdk",
  "vpc",
  "vdi",
  "vhdx",
  "luks",
  "dir",
  "bochs",
  "cloop",
  "dmg",
  "iso",
  "fat",
]);

function yesNo(v: string | undefined, what: string): Result<boolean | undefined, ConfError> {
  if (v === undefined) return ok(undefined);
  if (v === "yes") return ok(true);
  if (v === "no") return ok(false);
  return invalid(`${what} must be 'yes' or 'no', got '${v}'`);
}

function checkPath(p: string, what: string): Result<string, ConfError> {
  if (!p.startsWith("/")) return invalid(`${what} must be an absolute path, got '${p}'`);
  if (p.includes("\0") || p.length > 4096) return invalid(`${what} is not a usable path`);
  return ok(p);
}

function parseServer(el: XmlElement): Result<BackupServer, ConfError> {
  const a = checkAllowed(el, [], ["transport", "tls", "name", "port", "socket", "fdgroup"], "<server>");
  if (a.isErr()) return err(a.error);
  const tls = yesNo(el.attrs.tls, "<server tls>");
  if (tls.isErr()) return err(tls.error);
  const t = tls.value === undefined ? {} : { tls: tls.value };
  const transport = el.attrs.transport ?? "tcp";
  switch (transport) {
    case "tcp": {
      const name = el.attrs.name;
      if (name === undefined || name === "") return invalid("<server transport='tcp'> needs a name (host) attribute");
      if (!/^[a-zA-Z0-9_.:[\]-]+$/.test(name)) return invalid(`<server name='${name}'> is not a host name or address`);
      if (el.attrs.socket !== undefined || el.attrs.fdgroup !== undefined)
        return invalid("<server transport='tcp'> takes name and port only");
      if (el.attrs.port === undefined) return ok({ transport, name, ...t });
      const port = parseUnsignedLong(el.attrs.port, "<server port>");
      if (port.isErr()) return err(port.error);
      if (port.value < 1 || port.value > 65535) return invalid(`<server port='${el.attrs.port}'> is not a TCP port`);
      return ok({ transport, name, port: port.value, ...t });
    }
    case "unix": {
      if (el.attrs.socket === undefined) return invalid("<server transport='unix'> needs a socket attribute");
      const s = checkPath(el.attrs.socket, "<server socket>");
      if (s.isErr()) return err(s.error);
      if (el.attrs.name !== undefined || el.attrs.port !== undefined) return invalid("<server transport='unix'> takes socket only");
      return ok({ transport, socket: s.value, ...t });
    }
    case "fd":
      if (el.attrs.fdgroup === undefined) return invalid("<server transport='fd'> needs an fdgroup attribute");
      return ok({ transport, fdgroup: el.attrs.fdgroup, ...t });
    default:
      return invalid(`<server transport='${transport}'> is not one of tcp, unix, fd`);
  }
}

function parseStore(el: XmlElement, type: "file" | "block"): Result<BackupStore, ConfError> {
  const where = `<${el.name}>`;
  const a = checkAllowed(el, ["encryption", "seclabel"], ["file", "dev"], where);
  if (a.isErr()) return err(a.error);
  const attr = type === "file" ? "file" : "dev";
  const other = type === "file" ? "dev" : "file";
  if (el.attrs[other] !== undefined) return invalid(`${where} of a disk of type='${type}' takes '${attr}', not '${other}'`);
  const v = el.attrs[attr];
  if (v === undefined) return ok({ extra: el.children });
  const p = checkPath(v, `${where} ${attr}`);
  if (p.isErr()) return err(p.error);
  return ok({ [attr]: p.value, extra: el.children });
}

function parseDisk(el: XmlElement, mode: BackupMode, internal: boolean): Result<BackupDiskDef, ConfError> {
  const attrs = ["name", "backup", "type", "backupmode", "incremental", "exportname", "exportbitmap", ...(internal ? ["state"] : [])];
  const storeName = mode === "push" ? "target" : "scratch";
  const a = checkAllowed(el, ["driver", storeName], attrs, "<disk> in <domainbackup>");
  if (a.isErr()) return err(a.error);
  const name = el.attrs.name;
  if (name === undefined) return invalid("a <disk> in <domainbackup> needs a name attribute");
  const n = checkName(name, "disk name");
  if (n.isErr()) return err(n.error);
  const backup = yesNo(el.attrs.backup, `disk '${name}': backup`);
  if (backup.isErr()) return err(backup.error);
  if (backup.value === false) {
    if (el.children.length > 0 || Object.keys(el.attrs).some((k) => !["name", "backup", "state"].includes(k))) {
      return invalid(`disk '${name}' has backup='no' and takes no other settings`);
    }
    return ok({ name, backup: false });
  }
  const type = el.attrs.type ?? "file";
  if (type !== "file" && type !== "block") return invalid(`disk '${name}': type must be 'file' or 'block', got '${type}'`);
  const bm = el.attrs.backupmode;
  if (bm !== undefined && bm !== "full" && bm !== "incremental")
    return invalid(`disk '${name}': backupmode must be 'full' or 'incremental'`);
  if (bm === "full" && el.attrs.incremental !== undefined)
    return invalid(`disk '${name}': backupmode='full' takes no incremental checkpoint`);
  if (el.attrs.incremental !== undefined) {
    const c = checkName(el.attrs.incremental, `disk '${name}': incremental checkpoint name`);
    if (c.isErr()) return err(c.error);
  }
  if (mode === "push" && (el.attrs.exportname !== undefined || el.attrs.exportbitmap !== undefined)) {
    return invalid(`disk '${name}': exportname and exportbitmap are for pull backups`);
  }
  if (el.attrs.exportname !== undefined && (el.attrs.exportname === "" || el.attrs.exportname.length > 4096)) {
    return invalid(`disk '${name}': invalid exportname`);
  }
  if (el.attrs.exportbitmap !== undefined) {
    const c = checkName(el.attrs.exportbitmap, `disk '${name}': exportbitmap`);
    if (c.isErr()) return err(c.error);
  }
  let state: BackupDiskState | undefined;
  if (el.attrs.state !== undefined) {
    if (!DISK_STATES.includes(el.attrs.state as BackupDiskState)) return invalid(`disk '${name}': unknown state '${el.attrs.state}'`);
    state = el.attrs.state as BackupDiskState;
  }
  const driverEl = onlyChild(el, "driver");
  if (driverEl.isErr()) return err(driverEl.error);
  let driver: string | undefined;
  if (driverEl.value !== undefined) {
    const da = checkAllowed(driverEl.value, [], ["type"], `<driver> of disk '${name}'`);
    if (da.isErr()) return err(da.error);
    driver = driverEl.value.attrs.type;
    if (driver === undefined) return invalid(`<driver> of disk '${name}' needs a type`);
    if (mode === "pull" && driver !== "qcow2") return invalid(`disk '${name}': a pull backup's scratch must be qcow2, got '${driver}'`);
    if (!STORAGE_FORMATS.has(driver)) return invalid(`disk '${name}': unknown image format '${driver}'`);
  }
  const storeEl = onlyChild(el, storeName);
  if (storeEl.isErr()) return err(storeEl.error);
  let store: BackupStore | undefined;
  if (storeEl.value !== undefined) {
    const s = parseStore(storeEl.value, type);
    if (s.isErr()) return err(s.error);
    store = s.value;
  }
  return ok({
    name,
    backup: true,
    ...(el.attrs.type !== undefined ? { type } : {}),
    ...(bm !== undefined ? { backupmode: bm } : {}),
    ...(el.attrs.incremental !== undefined ? { incremental: el.attrs.incremental } : {}),
    ...(el.attrs.exportname !== undefined ? { exportname: el.attrs.exportname } : {}),
    ...(el.attrs.exportbitmap !== undefined ? { exportbitmap: el.attrs.exportbitmap } : {}),
    ...(driver !== undefined ? { driver } : {}),
    ...(store !== undefined ? { store } : {}),
    ...(state !== undefined ? { state } : {}),
  });
}

export function backupDefParse(xml: string, opts: BackupParseOptions = {}): Result<BackupDef, ConfError> {
  const root = xmlParse(xml);
  if (root.isErr()) return err(root.error);
  return backupDefFromElement(root.value, opts);
}

export function backupDefFromElement(root: XmlElement, opts: BackupParseOptions = {}): Result<BackupDef, ConfError> {
  const internal = opts.internal === true;
  if (root.name !== "domainbackup") return invalid(`expected <domainbackup>, got <${root.name}>`);
  const a = checkAllowed(root, ["incremental", "server", "disks", ...(internal ? ["privateData"] : [])], ["mode"]);
  if (a.isErr()) return err(a.error);
  const mode = root.attrs.mode ?? "push";
  if (mode !== "push" && mode !== "pull") return invalid(`<domainbackup mode='${mode}'> must be 'push' or 'pull'`);
  const def: { -readonly [K in keyof BackupDef]: BackupDef[K] } = { mode };
  const inc = onlyChild(root, "incremental");
  if (inc.isErr()) return err(inc.error);
  if (inc.value !== undefined) {
    const c = checkName(inc.value.text, "incremental checkpoint name");
    if (c.isErr()) return err(c.error);
    def.incremental = c.value;
  }
  const server = onlyChild(root, "server");
  if (server.isErr()) return err(server.error);
  if (server.value !== undefined) {
    if (mode === "push") return invalid("a push backup takes no <server>");
    const s = parseServer(server.value);
    if (s.isErr()) return err(s.error);
    def.server = s.value;
  }
  const disks = onlyChild(root, "disks");
  if (disks.isErr()) return err(disks.error);
  if (disks.value !== undefined) {
    const da = checkAllowed(disks.value, ["disk"], []);
    if (da.isErr()) return err(da.error);
    if (disks.value.children.length === 0) return invalid("<disks> needs at least one <disk>");
    if (disks.value.children.length > MAX_DISKS) return invalid(`<disks> lists more than ${MAX_DISKS} disks`);
    const list: BackupDiskDef[] = [];
    for (const d of disks.value.children) {
      const r = parseDisk(d, mode, internal);
      if (r.isErr()) return err(r.error);
      if (list.some((x) => x.name === r.value.name)) return invalid(`disk '${r.value.name}' is listed twice`);
      list.push(r.value);
    }
    def.disks = list;
  }
  const priv = onlyChild(root, "privateData");
  if (priv.isErr()) return err(priv.error);
  if (priv.value !== undefined) def.privateData = priv.value;
  return ok(def);
}

export interface BackupFormatOptions {
  readonly internal?: boolean;
}

export function backupDefFormat(def: BackupDef, opts: BackupFormatOptions = {}): string {
  const internal = opts.internal === true;
  const w = new XmlWriter();
  w.open("domainbackup", { mode: def.mode });
  if (def.incremental !== undefined) w.text("incremental", def.incremental);
  const s = def.server;
  if (s !== undefined) {
    const tls = s.tls === undefined ? undefined : s.tls ? "yes" : "no";
    switch (s.transport) {
      case "tcp":
        w.empty("server", { transport: "tcp", tls, name: s.name, port: s.port });
        break;
      case "unix":
        w.empty("server", { transport: "unix", tls, socket: s.socket });
        break;
      case "fd":
        w.empty("server", { transport: "fd", tls, fdgroup: s.fdgroup });
        break;
    }
  }
  if (def.disks !== undefined && def.disks.length > 0) {
    w.open("disks");
    for (const d of def.disks) {
      const state = internal ? d.state : undefined;
      if (!d.backup) {
        w.empty("disk", { name: d.name, backup: "no", state });
        continue;
      }
      const attrs = {
        name: d.name,
        backup: "yes",
        state,
        type: d.type,
        backupmode: d.backupmode,
        incremental: d.incremental,
        exportname: d.exportname,
        exportbitmap: d.exportbitmap,
      };
      if (d.driver === undefined && d.store === undefined) {
        w.empty("disk", attrs);
        continue;
      }
      w.open("disk", attrs);
      if (d.driver !== undefined) w.empty("driver", { type: d.driver });
      if (d.store !== undefined) {
        const storeName = def.mode === "push" ? "target" : "scratch";
        const sa = { file: d.store.file, dev: d.store.dev };
        if (d.store.extra.length === 0) w.empty(storeName, sa);
        else {
          w.open(storeName, sa);
          for (const x of d.store.extra) w.element(x);
          w.close(storeName);
        }
      }
      w.close("disk");
    }
    w.close("disks");
  }
  if (internal && def.privateData !== undefined) w.element(def.privateData);
  w.close("domainbackup");
  return w.toString();
}

export interface BackupAlignOptions {
  /** Default target (push) or scratch (pull) file for a disk. */
  readonly defaultFile: (disk: string) => string;
}

/**
 * libvirt's virDomainBackupAlignDisks: every domain disk listed once (those
 * the XML does not name get backup='no', or all get 'yes' without <disks>),
 * type defaults to file, each disk's backupmode and incremental checkpoint
 * resolved, default file names generated.
 */
export function backupDefAlign(def: BackupDef, domainDisks: readonly string[], opts: BackupAlignOptions): Result<BackupDef, ConfError> {
  const disks: BackupDiskDef[] = [];
  const listed = def.disks ?? domainDisks.map((name): BackupDiskDef => ({ name, backup: true }));
  for (const d of listed) {
    if (!domainDisks.includes(d.name))
      return err({ code: "unknown-disk", message: `backup names disk '${d.name}', which the domain does not have` });
    if (!d.backup) {
      disks.push(d);
      continue;
    }
    const incremental = d.backupmode === "full" ? undefined : (d.incremental ?? def.incremental);
    if (d.backupmode === "incremental" && incremental === undefined) {
      return invalid(`disk '${d.name}' asks for an incremental backup, but no checkpoint is given (<incremental> or incremental='…')`);
    }
    const type = d.type ?? "file";
    const store =
      d.store?.file !== undefined || d.store?.dev !== undefined
        ? d.store
        : { ...(d.store ?? { extra: [] }), file: opts.defaultFile(d.name) };
    if (type === "block" && store.dev === undefined) return invalid(`disk '${d.name}' of type='block' needs a device path`);
    disks.push({
      ...d,
      type,
      backupmode: incremental === undefined ? "full" : "incremental",
      ...(incremental !== undefined ? { incremental } : {}),
      store,
    });
  }
  for (const name of domainDisks) if (!listed.some((d) => d.name === name)) disks.push({ name, backup: false });
  if (!disks.some((d) => d.backup)) return invalid("the backup would include no disk");
  return ok({ ...def, disks });
}
