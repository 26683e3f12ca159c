/**
 * A backup set's directory on disk: where it is (checked to lie under an
 * allowed directory, on a path nobody untrusted can change: jobs/safe-fs.ts),
 * and the manifest files in it, each written atomically and durably
 * (util/atomic-file.ts). The layout:
 *
 *     DIR/set.json             the index: domain, restore points, next number
 *     DIR/points/NNNNNN.json   one per restore point: kind, parent, disks
 *     DIR/data/NNNNNN.DISK.qcow2
 *     DIR/pending.json         a backup whose job has not settled
 *     DIR/prune.json           a prune under way
 *
 * The index is the truth: a point file it does not list is not a restore
 * point (a crash between the two writes leaves one, removed later).
 */
import { chown, mkdir, readdir, readFile, realpath } from "node:fs/promises";
import { basename, dirname, isAbsolute, join } from "node:path";
import { errAsync, okAsync, ResultAsync } from "neverthrow";
import { isUnder } from "../jobs/paths.js";
import { below, openTrustedDir, type Trust } from "../jobs/safe-fs.js";
import { ioError, removeFileDurable, TEMP_PREFIX, writeFileAtomic } from "../util/atomic-file.js";
import type { SetError } from "./errors.js";
import {
  DATA_DIR,
  INDEX_FILE,
  PENDING_FILE,
  type PendingBackup,
  POINTS_DIR,
  type Point,
  PRUNE_FILE,
  type PruneJournal,
  parseIndex,
  parsePending,
  parsePoint,
  parsePrune,
  pointFile,
  type SetIndex,
} from "./manifest.js";

export interface LocateOptions {
  readonly allowedDirs: readonly string[];
  readonly trust: Trust;
  /** Create the directory (and data/, points/) when absent. */
  readonly create?: boolean;
  /** QEMU's user when it is not ours: it creates the images in data/. */
  readonly owner?: { readonly uid: number; readonly gid: number } | undefined;
}

const refused = (message: string): SetError => ({ code: "path-refused", message });

async function resolveAllowed(dirs: readonly string[]): Promise<string[]> {
  const out: string[] = [];
  for (const d of dirs)
    out.push(
      ...(await realpath(d).then(
        (r) => [r],
        () => [],
      )),
    );
  return out;
}

/** Where the set `dir` is, resolved; created when asked. Refused outside the allowed directories or on an untrusted path. */
export function locateSet(dir: string, o: LocateOptions): ResultAsync<SetDir, SetError> {
  if (!isAbsolute(dir)) return errAsync(refused(`backup set '${dir}' is not an absolute path`));
  // biome-ignore lint/suspicious/noControlCharactersInRegex: refusing control characters
  if (/[\u0000-\u001f]/.test(dir)) return errAsync(refused("backup set path contains control characters"));
  const run = async (): Promise<SetDir | SetError> => {
    const allowed = await resolveAllowed(o.allowedDirs);
    let root = await realpath(dir).catch(() => undefined);
    if (root === undefined) {
      if (o.create !== true) return { code: "not-found", message: `backup set '${dir}' does not exist` };
      const parent = await realpath(dirname(dir)).catch(() => undefined);
      if (parent === undefined) return refused(`backup set '${dir}': directory ${dirname(dir)} does not exist`);
      root = join(parent, basename(dir));
      if (!allowed.some((a) => isUnder(root!, a) && root !== a))
        return refused(`backup set '${dir}' is outside the allowed directories (${o.allowedDirs.join(", ")})`);
      const w = await openTrustedDir(parent, o.trust);
      if (!w.ok) return refused(`backup set '${dir}': ${w.reason}`);
      try {
        // below the walked directory: a symlink swapped in at the last component is not followed (EEXIST)
        await mkdir(below(w.dir, basename(dir)), { mode: 0o700 }).catch((e: NodeJS.ErrnoException) => {
          if (e.code !== "EEXIST") throw e;
        });
      } catch (e) {
        return ioError(`cannot create backup set ${dir}`, e) as SetError;
      } finally {
        await w.dir.close();
      }
    }
    if (!allowed.some((a) => isUnder(root!, a) && root !== a))
      return refused(`backup set '${dir}' is outside the allowed directories (${o.allowedDirs.join(", ")})`);
    const w = await openTrustedDir(root, o.trust);
    if (!w.ok)
      return refused(
        `backup set '${dir}': ${w.reason}, and only root, the daemon and QEMU's user may be able to change the directories on the way`,
      );
    try {
      if (o.create === true) {
        for (const sub of [DATA_DIR, POINTS_DIR]) {
          await mkdir(below(w.dir, sub), { mode: 0o700 }).catch((e: NodeJS.ErrnoException) => {
            if (e.code !== "EEXIST") throw e;
          });
        }
        if (o.owner !== undefined) {
          // QEMU creates and writes the images in data/ by path
          await chown(root, o.owner.uid, o.owner.gid);
          await chown(join(root, DATA_DIR), o.owner.uid, o.owner.gid);
        }
      }
      for (const sub of [DATA_DIR, POINTS_DIR]) {
        const s = await openTrustedDir(join(root, sub), o.trust);
        if (s.ok) await s.dir.close();
        else if (o.create === true || !/ENOENT|not a directory now/.test(s.reason)) return refused(`backup set '${dir}': ${s.reason}`);
      }
    } catch (e) {
      return ioError(`cannot prepare backup set ${dir}`, e) as SetError;
    } finally {
      await w.dir.close();
    }
    return new SetDir(root);
  };
  return ResultAsync.fromSafePromise(run()).andThen((r) => (r instanceof SetDir ? okAsync(r) : errAsync(r)));
}

function readJson<T>(path: string, parse: (v: unknown, what: string) => import("neverthrow").Result<T, SetError>, what: string) {
  return ResultAsync.fromPromise(
    readFile(path, "utf8").then(
      (t) => t,
      (e: NodeJS.ErrnoException) => (e.code === "ENOENT" ? undefined : Promise.reject(e)),
    ),
    (e) => ioError(`cannot read ${path}`, e) as SetError,
  ).andThen((text): ResultAsync<T | undefined, SetError> => {
    if (text === undefined) return okAsync(undefined);
    let v: unknown;
    try {
      v = JSON.parse(text);
    } catch {
      return errAsync({ code: "set-corrupt", message: `${what}: not JSON` });
    }
    const r = parse(v, what);
    return r.isErr() ? errAsync(r.error) : okAsync(r.value);
  });
}

const json = (v: unknown) => `${JSON.stringify(v, null, 2)}\n`;

/** A located set: its manifest files. */
export class SetDir {
  constructor(readonly root: string) {}

  path(rel: string): string {
    return join(this.root, rel);
  }

  readIndex(): ResultAsync<SetIndex | undefined, SetError> {
    return readJson(this.path(INDEX_FILE), parseIndex, join(this.root, INDEX_FILE));
  }
  writeIndex(i: SetIndex): ResultAsync<void, SetError> {
    return writeFileAtomic(this.path(INDEX_FILE), json(i));
  }

  readPoint(seq: number): ResultAsync<Point, SetError> {
    const what = this.path(pointFile(seq));
    return readJson(what, parsePoint, what).andThen((p) => {
      if (p === undefined) return errAsync<Point, SetError>({ code: "set-corrupt", message: `${what} is missing (the index lists it)` });
      if (p.seq !== seq) return errAsync<Point, SetError>({ code: "set-corrupt", message: `${what} holds point ${p.seq}` });
      return okAsync(p);
    });
  }
  writePoint(p: Point): ResultAsync<void, SetError> {
    return writeFileAtomic(this.path(pointFile(p.seq)), json(p));
  }
  removePoint(seq: number): ResultAsync<void, SetError> {
    return removeFileDurable(this.path(pointFile(seq)));
  }

  /** Every restore point the index lists, by number. */
  readPoints(index: SetIndex): ResultAsync<Map<number, Point>, SetError> {
    return ResultAsync.combine(index.points.map((p) => this.readPoint(p.seq))).andThen((ps) => {
      for (const [i, p] of ps.entries())
        if (p.checkpoint !== index.points[i]!.checkpoint)
          return errAsync<Map<number, Point>, SetError>({
            code: "set-corrupt",
            message: `${this.path(pointFile(p.seq))} names checkpoint '${p.checkpoint}', the index '${index.points[i]!.checkpoint}'`,
          });
      return okAsync(new Map(ps.map((p) => [p.seq, p])));
    });
  }

  readPending(): ResultAsync<PendingBackup | undefined, SetError> {
    return readJson(this.path(PENDING_FILE), parsePending, this.path(PENDING_FILE));
  }
  writePending(p: PendingBackup): ResultAsync<void, SetError> {
    return writeFileAtomic(this.path(PENDING_FILE), json(p));
  }
  removePending(): ResultAsync<void, SetError> {
    return removeFileDurable(this.path(PENDING_FILE));
  }

  readPrune(): ResultAsync<PruneJournal | undefined, SetError> {
    return readJson(this.path(PRUNE_FILE), parsePrune, this.path(PRUNE_FILE));
  }
  writePrune(p: PruneJournal): ResultAsync<void, SetError> {
    return writeFileAtomic(this.path(PRUNE_FILE), json(p));
  }
  removePrune(): ResultAsync<void, SetError> {
    return removeFileDurable(this.path(PRUNE_FILE));
  }

  /** Point files the index does not list, and temp files of interrupted writes: left by a crash between two writes. */
  async strays(index: SetIndex | undefined): Promise<string[]> {
    const listed = new Set((index?.points ?? []).map((p) => pointFile(p.seq)));
    const out: string[] = [];
    for (const sub of ["", POINTS_DIR]) {
      const names = await readdir(this.path(sub)).catch(() => [] as string[]);
      for (const n of names) {
        const rel = sub === "" ? n : `${sub}/${n}`;
        if (n.startsWith(TEMP_PREFIX) || (sub === POINTS_DIR && !listed.has(rel))) out.push(rel);
      }
    }
    return out;
  }
}
