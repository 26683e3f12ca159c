/**
 * `verify`: is every restore point of the set restorable as it was written?
 * Each image once: it exists as a regular file, `qemu-img check` finds its
 * metadata sound, its virtual size and backing link are what the manifest
 * says (the link names the previous image of its chain, relative, qcow2),
 * and its SHA-256 is the one recorded when it was written. A restore point
 * is intact when every image of every one of its disks' chains is.
 */
import { lstat } from "node:fs/promises";
import { ResultAsync } from "neverthrow";
import { digestFile } from "./digest.js";
import type { SetError } from "./errors.js";
import { backingLink, chainOf, type Point, type PointDisk } from "./manifest.js";
import type { QemuImg } from "./qemu-img.js";
import type { SetDir } from "./store.js";

export interface FileVerdict {
  readonly file: string;
  readonly point: string;
  readonly disk: string;
  readonly problems: readonly string[];
}

export interface VerifyReport {
  readonly intact: boolean;
  readonly images: number;
  readonly bytesRead: number;
  readonly damaged: readonly FileVerdict[];
  /** Restore points that cannot be restored as written: their own image or one below it is damaged. */
  readonly damagedPoints: readonly string[];
  readonly points: readonly { readonly checkpoint: string; readonly intact: boolean }[];
}

async function verifyImage(set: SetDir, d: PointDisk, img: QemuImg): Promise<{ problems: string[]; read: number }> {
  const path = set.path(d.file);
  const st = await lstat(path).catch(() => undefined);
  if (st === undefined) return { problems: ["missing"], read: 0 };
  if (!st.isFile()) return { problems: ["not a regular file"], read: 0 };
  const problems: string[] = [];
  const chk = await img.check(path);
  if (chk.isOk() && chk.value.message !== undefined) problems.push(chk.value.message);
  const info = await img.info(path);
  if (info.isErr()) problems.push(info.error.message);
  else {
    if (info.value.virtualSize !== d.virtualSize)
      problems.push(`virtual size ${info.value.virtualSize}, the manifest says ${d.virtualSize}`);
    const want = d.backing === null ? undefined : backingLink(d.backing);
    if (info.value.backing !== want)
      problems.push(
        `backing link ${info.value.backing === undefined ? "absent" : `'${info.value.backing}'`}, expected ${want === undefined ? "none" : `'${want}'`}`,
      );
    else if (want !== undefined && info.value.backingFormat !== "qcow2")
      problems.push(`backing format ${info.value.backingFormat ?? "not recorded"}, expected qcow2`);
  }
  const dg = await digestFile(path);
  if (dg.isErr()) problems.push(dg.error.message);
  else if (dg.value.sha256 !== d.sha256)
    problems.push(`content digest ${dg.value.sha256.slice(0, 16)}… differs from the recorded ${d.sha256.slice(0, 16)}…`);
  return { problems, read: st.size };
}

export function verifySet(set: SetDir, points: ReadonlyMap<number, Point>, img: QemuImg): ResultAsync<VerifyReport, SetError> {
  return ResultAsync.fromSafePromise(
    (async (): Promise<VerifyReport> => {
      const bad = new Map<string, FileVerdict>();
      let images = 0;
      let bytesRead = 0;
      for (const p of points.values()) {
        for (const d of p.disks) {
          images++;
          const v = await verifyImage(set, d, img);
          bytesRead += v.read;
          if (v.problems.length > 0) bad.set(d.file, { file: d.file, point: p.checkpoint, disk: d.name, problems: v.problems });
        }
      }
      const verdicts = [...points.values()].map((p) => {
        const intact = p.disks.every((d) => {
          const chain = chainOf(points, p.seq, d.name);
          return chain.isOk() && chain.value.every((x) => !bad.has(x.file));
        });
        return { checkpoint: p.checkpoint, intact };
      });
      const damagedPoints = verdicts.filter((v) => !v.intact).map((v) => v.checkpoint);
      return {
        intact: bad.size === 0 && damagedPoints.length === 0,
        images,
        bytesRead,
        damaged: [...bad.values()],
        damagedPoints,
        points: verdicts,
      };
    })(),
  );
}
