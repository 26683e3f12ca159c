/**
 * The content digest of a set's image: SHA-256 of the whole file, read after
 * QEMU wrote it (a push never passes through the daemon, so the digest
 * cannot be taken on the way). A whole-file digest, not one of the data
 * clusters alone: it needs no qcow2 parser, and any changed byte — data,
 * L2 table or header — changes it. The image is read once, right after it
 * was written, mostly from the page cache; scripts/bench-backup measures
 * what it costs per GiB.
 */
import { createHash } from "node:crypto";
import { constants } from "node:fs";
import { open } from "node:fs/promises";
import { ResultAsync } from "neverthrow";
import { ioError } from "../util/atomic-file.js";
import type { SetError } from "./errors.js";

export interface FileDigest {
  readonly sha256: string;
  /** Bytes the file occupies on disk. */
  readonly dataSize: number;
}

const CHUNK = 4 << 20;

export function digestFile(path: string): ResultAsync<FileDigest, SetError> {
  return ResultAsync.fromPromise(
    (async () => {
      const fh = await open(path, constants.O_RDONLY | constants.O_NOFOLLOW);
      try {
        const st = await fh.stat();
        if (!st.isFile()) throw new Error("not a regular file");
        const h = createHash("sha256");
        const buf = Buffer.allocUnsafe(CHUNK);
        for (let pos = 0; ; ) {
          const { bytesRead } = await fh.read(buf, 0, CHUNK, pos);
          if (bytesRead === 0) break;
          h.update(buf.subarray(0, bytesRead));
          pos += bytesRead;
        }
        return { sha256: h.digest("hex"), dataSize: st.blocks * 512 };
      } finally {
        await fh.close();
      }
    })(),
    (e) => ioError(`cannot read ${path}`, e) as SetError,
  );
}
