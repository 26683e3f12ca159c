/**
 * <domaincheckpoint>: parse, format, and align with a domain's disks, as
 * libvirt's conf/checkpoint_conf.c does. Pure: no QEMU, no files.
 */
import { err, ok, type Result } from "neverthrow";
import type { ConfError } from "./errors.js";
import { checkName } from "./names.js";
import { checkAllowed, invalid, onlyChild, parseUnsignedLong, type XmlElement, XmlWriter, xmlParse } from "./xml.js";

export type CheckpointDiskType = "bitmap" | "no";

export interface CheckpointDiskDef {
  readonly name: string;
  readonly checkpoint: CheckpointDiskType;
  /** Bitmap name inside QEMU; set for checkpoint='bitmap' after alignment. */
  readonly bitmap?: string;
  /** Output only: bytes changed since the checkpoint. */
  readonly size?: number;
  /**
   * The bitmap is not persistent: the disk's format cannot store one (raw),
   * so it lives only as long as the QEMU process. A qbackupd extension
   * (`volatile='yes'`, outside libvirt's schema, written only when set);
   * decided by alignment from the disk's format, kept on redefine.
   */
  readonly volatile?: boolean;
}

export interface CheckpointDef {
  readonly name?: string;
  readonly description?: string;
  readonly parent?: string;
  readonly creationTime?: number;
  readonly disks?: readonly CheckpointDiskDef[];
}

/** A definition after alignment: everything filled in. */
export interface CheckpointDefFull extends CheckpointDef {
  readonly name: string;
  readonly creationTime: number;
  readonly disks: readonly CheckpointDiskDef[];
}

export interface CheckpointParseOptions {
  /** Redefine: keep parent, creationTime and disk bitmaps from the XML (libvirt's PARSE_REDEFINE). */
  readonly redefine?: boolean;
}

/** Disk names: libvirt's diskTargetDev or an absolute path; we also take node names (qemu-storage-daemon). */
function checkDiskName(name: string): Result<string, ConfError> {
  if (name.startsWith("/")) return name.length > 1 && !name.includes("\0") ? ok(name) : invalid(`invalid disk name '${name}'`);
  return checkName(name, "disk name");
}

function parseDisk(el: XmlElement): Result<CheckpointDiskDef, ConfError> {
  const allowed = checkAllowed(el, [], ["name", "checkpoint", "bitmap", "size", "volatile"], "<disk> in <domaincheckpoint>");
  if (allowed.isErr()) return err(allowed.error);
  const name = el.attrs.name;
  if (name === undefined) return invalid("a <disk> in <domaincheckpoint> needs a name attribute");
  const n = checkDiskName(name);
  if (n.isErr()) return err(n.error);
  const type = el.attrs.checkpoint ?? "bitmap";
  if (type !== "bitmap" && type !== "no") return invalid(`disk '${name}': checkpoint must be 'bitmap' or 'no', got '${type}'`);
  if (type === "no" && (el.attrs.bitmap !== undefined || el.attrs.size !== undefined || el.attrs.volatile !== undefined)) {
    return invalid(`disk '${name}': checkpoint='no' takes no bitmap, size or volatile`);
  }
  const vol = el.attrs.volatile;
  if (vol !== undefined && vol !== "yes" && vol !== "no") return invalid(`disk '${name}': volatile must be 'yes' or 'no', got '${vol}'`);
  let bitmap: string | undefined;
  if (el.attrs.bitmap !== undefined) {
    const b = checkName(el.attrs.bitmap, `bitmap name of disk '${name}'`);
    if (b.isErr()) return err(b.error);
    bitmap = b.value;
  }
  if (el.attrs.size !== undefined) {
    // Output only: the schema accepts it on input, so we check it, but a size is never taken from a caller.
    const s = parseUnsignedLong(el.attrs.size, `size of disk '${name}'`);
    if (s.isErr()) return err(s.error);
  }
  return ok({ name, checkpoint: type, ...(bitmap !== undefined ? { bitmap } : {}), ...(vol === "yes" ? { volatile: true } : {}) });
}

export function checkpointDefParse(xml: string, opts: CheckpointParseOptions = {}): Result<CheckpointDef, ConfError> {
  const root = xmlParse(xml);
  if (root.isErr()) return err(root.error);
  return checkpointDefFromElement(root.value, opts);
}

export function checkpointDefFromElement(root: XmlElement, opts: CheckpointParseOptions = {}): Result<CheckpointDef, ConfError> {
  const redefine = opts.redefine === true;
  if (root.name !== "domaincheckpoint") return invalid(`expected <domaincheckpoint>, got <${root.name}>`);
  const allowed = checkAllowed(root, ["name", "description", "creationTime", "disks", "domain", "parent"], []);
  if (allowed.isErr()) return err(allowed.error);
  const def: { -readonly [K in keyof CheckpointDef]: CheckpointDef[K] } = {};

  const nameEl = onlyChild(root, "name");
  if (nameEl.isErr()) return err(nameEl.error);
  if (nameEl.value !== undefined) {
    const n = checkName(nameEl.value.text, "checkpoint name");
    if (n.isErr()) return err(n.error);
    def.name = n.value;
  }
  const descEl = onlyChild(root, "description");
  if (descEl.isErr()) return err(descEl.error);
  if (descEl.value !== undefined) def.description = descEl.value.text;

  const timeEl = onlyChild(root, "creationTime");
  if (timeEl.isErr()) return err(timeEl.error);
  if (timeEl.value !== undefined) {
    const t = parseUnsignedLong(timeEl.value.text, "creationTime");
    if (t.isErr()) return err(t.error);
    if (redefine) def.creationTime = t.value;
  }
  const parentEl = onlyChild(root, "parent");
  if (parentEl.isErr()) return err(parentEl.error);
  if (parentEl.value !== undefined) {
    const pa = checkAllowed(parentEl.value, ["name"], []);
    if (pa.isErr()) return err(pa.error);
    const pn = onlyChild(parentEl.value, "name");
    if (pn.isErr()) return err(pn.error);
    if (pn.value === undefined) return invalid("<parent> needs a <name>");
    const n = checkName(pn.value.text, "parent checkpoint name");
    if (n.isErr()) return err(n.error);
    if (redefine) def.parent = n.value;
  }
  const disksEl = onlyChild(root, "disks");
  if (disksEl.isErr()) return err(disksEl.error);
  if (disksEl.value !== undefined) {
    const da = checkAllowed(disksEl.value, ["disk"], []);
    if (da.isErr()) return err(da.error);
    if (disksEl.value.children.length === 0) return invalid("<disks> needs at least one <disk>");
    const disks: CheckpointDiskDef[] = [];
    for (const d of disksEl.value.children) {
      const r = parseDisk(d);
      if (r.isErr()) return err(r.error);
      if (disks.some((x) => x.name === r.value.name)) return invalid(`disk '${r.value.name}' is listed twice`);
      disks.push(r.value);
    }
    def.disks = disks;
  }
  if (redefine && def.name === undefined) return invalid("a redefined checkpoint needs a <name>");
  return ok(def);
}

export interface CheckpointFormatOptions {
  /** Include each disk's size (bytes changed since the checkpoint) when known. */
  readonly size?: boolean;
}

export function checkpointDefFormat(def: CheckpointDef, opts: CheckpointFormatOptions = {}): string {
  const w = new XmlWriter();
  w.open("domaincheckpoint");
  if (def.name !== undefined) w.text("name", def.name);
  if (def.description !== undefined) w.text("description", def.description);
  if (def.parent !== undefined) w.open("parent").text("name", def.parent).close("parent");
  if (def.creationTime !== undefined) w.text("creationTime", def.creationTime);
  if (def.disks !== undefined && def.disks.length > 0) {
    w.open("disks");
    for (const d of def.disks) {
      w.empty("disk", {
        name: d.name,
        checkpoint: d.checkpoint,
        bitmap: d.checkpoint === "bitmap" ? d.bitmap : undefined,
        size: opts.size === true && d.checkpoint === "bitmap" ? d.size : undefined,
        volatile: d.checkpoint === "bitmap" && d.volatile === true ? "yes" : undefined,
      });
    }
    w.close("disks");
  }
  w.close("domaincheckpoint");
  return w.toString();
}

/**
 * Can a disk of this format hold a checkpoint's bitmap, and how: qcow2
 * stores it in the image (persistent); raw cannot store one, so QEMU keeps
 * it in memory only (volatile); others not at all (undefined).
 */
function bitmapKind(format: string): { volatile?: true } | undefined {
  if (format === "qcow2") return {};
  if (format === "raw") return { volatile: true };
  return undefined;
}

/** What alignment needs to know of each disk of the domain. */
export interface DomainDiskSummary {
  readonly name: string;
  readonly format: string;
  readonly readOnly: boolean;
}

export interface AlignOptions {
  /** Unix seconds; the default name and the creation time. */
  readonly now: number;
  /** The domain's current checkpoint, which becomes the parent. */
  readonly parent?: string;
}

/**
 * Fill defaults and check against the domain (libvirt's
 * virDomainCheckpointAlignDisks + the QEMU driver's disk checks): name
 * defaults to the time, every disk is listed, bitmaps are named after the
 * checkpoint, unknown disks and bitmaps on disks of other formats than
 * qcow2 and raw are refused. A raw disk's bitmap is volatile (no file to
 * keep it in); libvirt refuses raw disks instead. Without <disks>, writable
 * qcow2 and raw disks take part and the others are 'no'.
 */
export function checkpointDefAlign(
  def: CheckpointDef,
  domainDisks: readonly DomainDiskSummary[],
  opts: AlignOptions,
): Result<CheckpointDefFull, ConfError> {
  const name = def.name ?? String(opts.now);
  const byName = new Map(domainDisks.map((d) => [d.name, d]));
  const disks: CheckpointDiskDef[] = [];
  if (def.disks === undefined) {
    for (const d of domainDisks) {
      const kind = bitmapKind(d.format);
      const takesPart = kind !== undefined && !d.readOnly;
      disks.push(takesPart ? { name: d.name, checkpoint: "bitmap", bitmap: name, ...kind } : { name: d.name, checkpoint: "no" });
    }
  } else {
    for (const d of def.disks) {
      const dd = byName.get(d.name);
      if (dd === undefined) {
        return err({ code: "unknown-disk", message: `checkpoint '${name}' names disk '${d.name}', which the domain does not have` });
      }
      const kind = bitmapKind(dd.format);
      if (d.checkpoint === "bitmap" && kind === undefined) {
        return err({
          code: "unsupported-disk",
          message: `disk '${d.name}' is ${dd.format}: only qcow2 disks (persistent) and raw disks (volatile) can hold a checkpoint bitmap (use checkpoint='no')`,
        });
      }
      if (d.checkpoint === "bitmap" && dd.readOnly) {
        return err({ code: "unsupported-disk", message: `disk '${d.name}' is read-only: it cannot record changes for a checkpoint` });
      }
      disks.push(d.checkpoint === "bitmap" ? { name: d.name, checkpoint: "bitmap", bitmap: d.bitmap ?? name, ...kind } : d);
    }
    for (const d of domainDisks) if (!def.disks.some((x) => x.name === d.name)) disks.push({ name: d.name, checkpoint: "no" });
  }
  if (!disks.some((d) => d.checkpoint === "bitmap")) {
    return err({
      code: "xml-invalid",
      message: `checkpoint '${name}' would cover no disk: no writable qcow2 or raw disk of the domain can hold a bitmap`,
    });
  }
  return ok({
    name,
    ...(def.description !== undefined ? { description: def.description } : {}),
    ...(opts.parent !== undefined ? { parent: opts.parent } : {}),
    creationTime: opts.now,
    disks,
  });
}
