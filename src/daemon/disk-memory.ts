/**
 * What a domain's disks were when qbackupd last saw its QEMU run: for each
 * disk the image file and format its node opened (the backing chain is in
 * the image's own header), its node and device names. Kept in
 * `<stateDir>/images/<domain>.json`, written atomically and durably whenever
 * it changes, so that a domain whose QEMU is not running can still be backed
 * up: offline.ts opens the same images in a qemu-storage-daemon.
 *
 * Only disks a storage daemon can open by themselves are remembered: qcow2
 * or raw over a plain file name (not a `json:{…}` pseudo-filename, which
 * says QEMU opened it with options the file alone does not carry).
 */
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { okAsync, type ResultAsync } from "neverthrow";
import { fileStem } from "../conf/names.js";
import type { Logger } from "../log.js";
import type { DiskInfo } from "../qmp/disks.js";
import { ensureDir, type IoError, writeFileAtomic } from "../util/atomic-file.js";

export interface RememberedDisk {
  /** The disk's name (device id), as checkpoints and backups name it. */
  readonly name: string;
  readonly file: string;
  /**
   * The backing files below it, top-down, as QEMU had the chain. The storage
   * daemon opens the chain the image headers name; a graph QEMU was given
   * otherwise (an overlay added with blockdev-snapshot names no backing in
   * its header) would read as other data: offline.ts refuses unless it opened
   * this very chain. Absent for disks registered by hand (domain-add --disk):
   * the chain their headers give is taken.
   */
  readonly chain?: readonly string[];
  readonly format: "qcow2" | "raw";
  readonly readOnly: boolean;
  /** The node-name it had in the VM (for people; the storage daemon names nodes itself). */
  readonly node: string;
  /** The guest device's qdev path in the VM ("" when none, or registered by hand). */
  readonly device?: string;
}

interface MemoryFile {
  readonly version: 1;
  /** Unix seconds of the sighting this was taken from. */
  readonly seenAt: number;
  readonly disks: readonly RememberedDisk[];
  /**
   * Disks QEMU had that a storage daemon cannot open by themselves (their
   * names): an offline backup is refused while there are any, as a backup
   * of the others would leave them out without a word.
   */
  readonly unopenable: readonly string[];
}

/** A disk the storage daemon can open from its file alone, as it was seen. */
export function rememberable(d: DiskInfo): RememberedDisk | undefined {
  if (d.format !== "qcow2" && d.format !== "raw") return undefined;
  if (!d.file.startsWith("/") || d.file.startsWith("json:")) return undefined;
  return {
    name: d.name,
    file: d.file,
    chain: d.below.map((l) => l.file),
    format: d.format,
    readOnly: d.readOnly,
    node: d.nodeName,
    device: d.qdev ?? "",
  };
}

function same(a: readonly RememberedDisk[], b: readonly RememberedDisk[]): boolean {
  return JSON.stringify(a) === JSON.stringify(b);
}

function parse(text: string): MemoryFile | string {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (e) {
    return `not JSON: ${(e as Error).message}`;
  }
  const m = v as Partial<MemoryFile>;
  if (m.version !== 1 || typeof m.seenAt !== "number" || !Array.isArray(m.disks)) return "not a version 1 disk memory";
  if (!Array.isArray(m.unopenable) || !m.unopenable.every((x) => typeof x === "string")) return "no list of unopenable disks";
  for (const d of m.disks as Partial<RememberedDisk>[]) {
    if (typeof d.name !== "string" || typeof d.file !== "string" || !d.file.startsWith("/")) return "a disk without name or absolute file";
    if (d.chain !== undefined && (!Array.isArray(d.chain) || !d.chain.every((f) => typeof f === "string")))
      return `disk '${d.name}': its backing chain is not a list of files`;
    if (d.format !== "qcow2" && d.format !== "raw") return `disk '${d.name}': format must be qcow2 or raw`;
    if (typeof d.readOnly !== "boolean" || typeof d.node !== "string") return `disk '${d.name}': readOnly or node missing`;
  }
  return m as MemoryFile;
}

export class DiskMemory {
  private value: MemoryFile | undefined;

  private constructor(
    readonly path: string,
    private readonly log: Logger,
  ) {}

  /**
   * The domain's memory, read from its file (none when there is no file; an
   * unreadable one is logged and ignored). Without a file, the disks
   * registered by hand (`registered`) stand for it until QEMU is seen: what
   * QEMU shows then is kept, and wins at later starts.
   */
  static async open(
    stateDir: string,
    domain: string,
    log: Logger,
    registered?: readonly { name: string; file: string; format: "qcow2" | "raw" }[],
  ): Promise<DiskMemory> {
    const m = new DiskMemory(join(stateDir, "images", `${fileStem(domain)}.json`), log);
    let text: string | undefined;
    try {
      text = await readFile(m.path, "utf8");
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "ENOENT")
        log.warn({ file: m.path, error: (e as Error).message }, "cannot read the disk memory");
    }
    if (text !== undefined) {
      const p = parse(text);
      if (typeof p === "string") log.error({ file: m.path, reason: p }, "disk memory ignored: the domain cannot be backed up offline");
      else m.value = p;
    }
    if (m.value === undefined && registered !== undefined)
      m.value = { version: 1, seenAt: 0, disks: registered.map((d) => ({ ...d, readOnly: false, node: "" })), unopenable: [] };
    return m;
  }

  /** The disks as last seen (undefined: never seen, nor registered). */
  get disks(): readonly RememberedDisk[] | undefined {
    return this.value?.disks;
  }

  /** The disks of that sighting a storage daemon cannot open by themselves. */
  get unopenable(): readonly string[] {
    return this.value?.unopenable ?? [];
  }

  /** Unix seconds of that sighting. */
  get seenAt(): number | undefined {
    return this.value?.seenAt;
  }

  /** Keep what QEMU shows now; written only when it differs from what is kept. */
  remember(disks: readonly DiskInfo[], now = Math.floor(Date.now() / 1000)): ResultAsync<void, IoError> {
    const kept = disks.flatMap((d) => {
      const r = rememberable(d);
      return r === undefined ? [] : [r];
    });
    const unopenable = disks.filter((d) => rememberable(d) === undefined).map((d) => d.name);
    if (this.value !== undefined && same(this.value.disks, kept) && this.value.unopenable.join("\n") === unopenable.join("\n"))
      return okAsync(undefined);
    const next: MemoryFile = { version: 1, seenAt: now, disks: kept, unopenable };
    return ensureDir(join(this.path, ".."))
      .andThen(() => writeFileAtomic(this.path, `${JSON.stringify(next, null, 2)}\n`))
      .map(() => {
        this.value = next;
        this.log.info({ disks: kept.map((d) => `${d.name}=${d.file}`), unopenable }, "disk memory updated");
      });
  }
}
