/**
 * The backup set's manifest, as data: the index (`set.json`), one file per
 * restore point (`points/NNNNNN.json`), and the two journals of operations
 * that span several files (`pending.json`: a backup whose job has not
 * settled; `prune.json`: a prune under way). Parsing and checking only, no
 * I/O: store.ts reads and writes these files.
 *
 * Every file name a manifest holds is checked against the one pattern the
 * set itself writes (`data/NNNNNN.<disk>.qcow2`), so a manifest edited by
 * hand can never make the daemon open, rebase, merge or delete a file
 * outside the set.
 *
 * The format is meant to be read without the daemon (docs/backup-sets.md):
 * a restore point is the top image of each disk's chain, and each image's
 * qcow2 backing link names the previous one relative to its own directory.
 */
import { err, ok, type Result } from "neverthrow";
import { checkName, fileStem } from "../conf/names.js";
import type { SetError } from "./errors.js";

export const SET_FORMAT = "qbackupd-set/1";
export const POINT_FORMAT = "qbackupd-point/1";
export const INDEX_FILE = "set.json";
export const PENDING_FILE = "pending.json";
export const PRUNE_FILE = "prune.json";
export const DATA_DIR = "data";
export const POINTS_DIR = "points";

export type PointKind = "full" | "incremental";

export interface PointDisk {
  readonly name: string;
  /** Relative to the set: data/NNNNNN.<disk>.qcow2 */
  readonly file: string;
  /** The image this one's qcow2 backing link names (relative to the set), or null for a full. */
  readonly backing: string | null;
  readonly virtualSize: number;
  /** Bytes the image occupies on disk. */
  readonly dataSize: number;
  /** SHA-256 of the whole image file, computed when the point was recorded (and again after a merge). */
  readonly sha256: string;
}

export interface Point {
  readonly format: typeof POINT_FORMAT;
  readonly seq: number;
  /** The checkpoint that marks this point in the domain (the point's name). */
  readonly checkpoint: string;
  readonly time: string;
  readonly kind: PointKind;
  /** Why a full was made when none was asked for (absent for an incremental or an asked-for full). */
  readonly reason?: string | undefined;
  /** The point this one's images back onto (null for a full). */
  readonly parent: number | null;
  /** A prune merged the older images of its chains into this point's (it is a full now). */
  readonly merged?: boolean | undefined;
  readonly disks: readonly PointDisk[];
}

export interface SetIndex {
  readonly format: typeof SET_FORMAT;
  readonly domain: string;
  readonly created: string;
  /** Restore points, oldest first. */
  readonly points: readonly { readonly seq: number; readonly checkpoint: string }[];
  /** Checkpoints this set made whose backup did not become a point (deleted by the next prune). */
  readonly abandoned: readonly string[];
  /** The next point's sequence number (never reused, so a file name never means two images). */
  readonly nextSeq: number;
}

export interface PendingBackup {
  readonly format: typeof POINT_FORMAT;
  readonly seq: number;
  readonly checkpoint: string;
  readonly domain: string;
  readonly job: string;
  readonly time: string;
  readonly kind: PointKind;
  readonly reason?: string | undefined;
  readonly parent: number | null;
}

export interface PruneJournal {
  readonly format: typeof SET_FORMAT;
  readonly keep: readonly number[];
  readonly drop: readonly number[];
  /** Per disk of the oldest kept point when it is an incremental: its chain's full is merged up into it. */
  readonly merges: readonly { readonly point: number; readonly disk: string; readonly base: string; readonly top: string }[];
}

const FILE_RE = /^data\/[0-9]{6}\.[A-Za-z0-9_.:+-]+\.qcow2$/;
const SHA_RE = /^[0-9a-f]{64}$/;

export function seqName(seq: number): string {
  return String(seq).padStart(6, "0");
}

export function pointFile(seq: number): string {
  return `${POINTS_DIR}/${seqName(seq)}.json`;
}

/** Where a point's image of `disk` goes, relative to the set. */
export function imageFile(seq: number, disk: string): string {
  return `${DATA_DIR}/${seqName(seq)}.${fileStem(disk)}.qcow2`;
}

/** The qcow2 backing link of an image in data/ naming another one there: relative to the image's own directory. */
export function backingLink(file: string): string {
  return file.slice(DATA_DIR.length + 1);
}

type R<T> = Result<T, SetError>;
const corrupt = (what: string, why: string): SetError => ({ code: "set-corrupt", message: `${what}: ${why}` });

function obj(v: unknown, what: string): R<Record<string, unknown>> {
  return typeof v === "object" && v !== null && !Array.isArray(v) ? ok(v as Record<string, unknown>) : err(corrupt(what, "not an object"));
}
function str(o: Record<string, unknown>, k: string, what: string): R<string> {
  const v = o[k];
  return typeof v === "string" ? ok(v) : err(corrupt(what, `${k} is not a string`));
}
function nat(o: Record<string, unknown>, k: string, what: string): R<number> {
  const v = o[k];
  return typeof v === "number" && Number.isSafeInteger(v) && v >= 0 ? ok(v) : err(corrupt(what, `${k} is not a non-negative integer`));
}
function arr(o: Record<string, unknown>, k: string, what: string): R<unknown[]> {
  const v = o[k];
  return Array.isArray(v) ? ok(v) : err(corrupt(what, `${k} is not a list`));
}
function name(o: Record<string, unknown>, k: string, what: string, kind: string): R<string> {
  return str(o, k, what).andThen((v) => checkName(v, kind).mapErr((e) => corrupt(what, e.message)));
}
function file(o: Record<string, unknown>, k: string, what: string): R<string> {
  return str(o, k, what).andThen((v) =>
    FILE_RE.test(v) && !v.includes("..") ? ok(v) : err(corrupt(what, `${k} '${v}' is not a file of the set`)),
  );
}
function fileOrNull(o: Record<string, unknown>, k: string, what: string): R<string | null> {
  return o[k] === null ? ok(null) : file(o, k, what);
}
function kind(o: Record<string, unknown>, what: string): R<PointKind> {
  const v = o.kind;
  return v === "full" || v === "incremental" ? ok(v) : err(corrupt(what, "kind is neither full nor incremental"));
}
function optStr(o: Record<string, unknown>, k: string, what: string): R<string | undefined> {
  return o[k] === undefined ? ok(undefined) : str(o, k, what);
}
function seqOrNull(o: Record<string, unknown>, k: string, what: string): R<number | null> {
  return o[k] === null ? ok(null) : nat(o, k, what);
}

function all<T>(xs: readonly R<T>[]): R<T[]> {
  const out: T[] = [];
  for (const x of xs) {
    if (x.isErr()) return err(x.error);
    out.push(x.value);
  }
  return ok(out);
}

export function parseIndex(v: unknown, what = INDEX_FILE): R<SetIndex> {
  return obj(v, what).andThen((o) => {
    if (o.format !== SET_FORMAT) return err(corrupt(what, `format is not ${SET_FORMAT}`));
    return name(o, "domain", what, "domain name").andThen((domain) =>
      str(o, "created", what).andThen((created) =>
        nat(o, "nextSeq", what).andThen((nextSeq) =>
          arr(o, "points", what).andThen((ps) =>
            all(
              ps.map((p) =>
                obj(p, what).andThen((po) =>
                  nat(po, "seq", what).andThen((seq) =>
                    name(po, "checkpoint", what, "checkpoint name").map((checkpoint) => ({ seq, checkpoint })),
                  ),
                ),
              ),
            ).andThen((points) =>
              arr(o, "abandoned", what).andThen((ab) =>
                all(
                  ab.map((a) =>
                    typeof a === "string"
                      ? checkName(a, "checkpoint name").mapErr((e) => corrupt(what, e.message))
                      : err(corrupt(what, "abandoned holds a non-string")),
                  ),
                ).andThen((abandoned) => {
                  for (const [i, p] of points.entries()) {
                    if (p.seq >= nextSeq) return err(corrupt(what, `point ${p.seq} is not below nextSeq ${nextSeq}`));
                    if (i > 0 && p.seq <= points[i - 1]!.seq) return err(corrupt(what, "points are not in increasing order"));
                  }
                  return ok<SetIndex, SetError>({ format: SET_FORMAT, domain, created, nextSeq, points, abandoned });
                }),
              ),
            ),
          ),
        ),
      ),
    );
  });
}

function parseDisk(v: unknown, what: string): R<PointDisk> {
  return obj(v, what).andThen((o) =>
    name(o, "name", what, "disk name").andThen((n) =>
      file(o, "file", what).andThen((f) =>
        fileOrNull(o, "backing", what).andThen((backing) =>
          nat(o, "virtualSize", what).andThen((virtualSize) =>
            nat(o, "dataSize", what).andThen((dataSize) =>
              str(o, "sha256", what).andThen((sha256) =>
                SHA_RE.test(sha256)
                  ? ok({ name: n, file: f, backing, virtualSize, dataSize, sha256 })
                  : err(corrupt(what, "sha256 is not 64 hex digits")),
              ),
            ),
          ),
        ),
      ),
    ),
  );
}

export function parsePoint(v: unknown, what: string): R<Point> {
  return obj(v, what).andThen((o) => {
    if (o.format !== POINT_FORMAT) return err(corrupt(what, `format is not ${POINT_FORMAT}`));
    return nat(o, "seq", what).andThen((seq) =>
      name(o, "checkpoint", what, "checkpoint name").andThen((checkpoint) =>
        str(o, "time", what).andThen((time) =>
          kind(o, what).andThen((k) =>
            optStr(o, "reason", what).andThen((reason) =>
              seqOrNull(o, "parent", what).andThen((parent) =>
                arr(o, "disks", what)
                  .andThen((ds) => all(ds.map((d) => parseDisk(d, what))))
                  .andThen((disks) => {
                    if ((k === "full") !== (parent === null)) return err(corrupt(what, "a full has no parent, an incremental has one"));
                    if (disks.some((d) => (d.backing === null) !== (k === "full")))
                      return err(corrupt(what, "backing links disagree with the kind"));
                    return ok<Point, SetError>({
                      format: POINT_FORMAT,
                      seq,
                      checkpoint,
                      time,
                      kind: k,
                      ...(reason !== undefined ? { reason } : {}),
                      parent,
                      ...(o.merged === true ? { merged: true } : {}),
                      disks,
                    });
                  }),
              ),
            ),
          ),
        ),
      ),
    );
  });
}

export function parsePending(v: unknown, what = PENDING_FILE): R<PendingBackup> {
  return obj(v, what).andThen((o) => {
    if (o.format !== POINT_FORMAT) return err(corrupt(what, `format is not ${POINT_FORMAT}`));
    return nat(o, "seq", what).andThen((seq) =>
      name(o, "checkpoint", what, "checkpoint name").andThen((checkpoint) =>
        name(o, "domain", what, "domain name").andThen((domain) =>
          str(o, "job", what).andThen((job) =>
            str(o, "time", what).andThen((time) =>
              kind(o, what).andThen((k) =>
                optStr(o, "reason", what).andThen((reason) =>
                  seqOrNull(o, "parent", what).map(
                    (parent): PendingBackup => ({
                      format: POINT_FORMAT,
                      seq,
                      checkpoint,
                      domain,
                      job,
                      time,
                      kind: k,
                      ...(reason !== undefined ? { reason } : {}),
                      parent,
                    }),
                  ),
                ),
              ),
            ),
          ),
        ),
      ),
    );
  });
}

export function parsePrune(v: unknown, what = PRUNE_FILE): R<PruneJournal> {
  return obj(v, what).andThen((o) => {
    if (o.format !== SET_FORMAT) return err(corrupt(what, `format is not ${SET_FORMAT}`));
    const seqs = (k: string) =>
      arr(o, k, what).andThen((xs) =>
        all(
          xs.map((x) =>
            typeof x === "number" && Number.isSafeInteger(x) && x >= 0 ? ok(x) : err(corrupt(what, `${k} holds a non-number`)),
          ),
        ),
      );
    return seqs("keep").andThen((keep) =>
      seqs("drop").andThen((drop) =>
        arr(o, "merges", what)
          .andThen((ms) =>
            all(
              ms.map((m) =>
                obj(m, what).andThen((x) =>
                  nat(x, "point", what).andThen((point) =>
                    name(x, "disk", what, "disk name").andThen((disk) =>
                      file(x, "base", what).andThen((base) => file(x, "top", what).map((top) => ({ point, disk, base, top }))),
                    ),
                  ),
                ),
              ),
            ),
          )
          .map((merges): PruneJournal => ({ format: SET_FORMAT, keep, drop, merges })),
      ),
    );
  });
}

/** The images a point's disk reads, top first: its own, then its parent's, down to the chain's full. */
export function chainOf(points: ReadonlyMap<number, Point>, seq: number, disk: string): R<PointDisk[]> {
  const out: PointDisk[] = [];
  let at: number | null = seq;
  const seen = new Set<number>();
  while (at !== null) {
    if (seen.has(at)) return err(corrupt(pointFile(seq), "its chain loops"));
    seen.add(at);
    const p = points.get(at);
    if (p === undefined) return err(corrupt(pointFile(seq), `its chain names point ${at}, which the set does not hold`));
    const d = p.disks.find((x) => x.name === disk);
    if (d === undefined) return err(corrupt(pointFile(at), `it has no image of disk '${disk}'`));
    const prev = out[out.length - 1];
    if (prev !== undefined && prev.backing !== d.file)
      return err(corrupt(pointFile(seq), `the backing link of ${prev.file} does not name ${d.file}`));
    out.push(d);
    at = p.parent;
  }
  return ok(out);
}
