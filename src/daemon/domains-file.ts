/**
 * domains.json: the domains registered through the API, so that they survive
 * a restart. The registry (domains.ts) decides what an entry means; this
 * module reads and writes the file and keeps what it cannot read.
 *
 * Must never lose an entry nobody removed: entries the registry cannot load
 * (an unknown key from a newer version, a name clash, a store that would not
 * open) are written back as they were read, and a file that is not a JSON
 * list, or cannot be read, is copied aside before anything overwrites it.
 * Writes are atomic (temp file, fsync, rename, fsync of the directory): a
 * crash leaves the old file or the new one.
 */
import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { okAsync, ResultAsync } from "neverthrow";
import type { DomainConfig } from "../conf/config.js";
import type { Logger } from "../log.js";
import { type IoError, ioError, writeFileAtomic } from "../util/atomic-file.js";

/** One element of domains.json, in the file's order. */
export type DomainsFileEntry =
  /** A domain registered from this entry (or by domain-add). */
  | { readonly kind: "domain"; readonly config: DomainConfig }
  /** An entry not loaded, written back exactly as it was read. */
  | { readonly kind: "kept"; readonly raw: unknown; readonly name: string | undefined; readonly reason: string };

export class DomainsFile {
  /** The file on disk is one we could not read or parse, and no copy of it is made yet. */
  private asideNeeded = false;

  constructor(
    readonly path: string,
    private readonly log: Logger,
  ) {}

  /**
   * The file's entries as parsed JSON; none when there is no file. A file
   * that cannot be read or is not a JSON list counts as none, and is copied
   * aside first (or, if even that fails, before the first write).
   */
  async read(): Promise<readonly unknown[]> {
    let text: string;
    try {
      text = await readFile(this.path, "utf8");
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") return [];
      return this.unusable((e as Error).message);
    }
    let reason: string;
    try {
      const raw: unknown = JSON.parse(text);
      if (Array.isArray(raw)) return raw;
      reason = "not a JSON list";
    } catch (e) {
      reason = `not valid JSON: ${(e as Error).message}`;
    }
    return this.unusable(reason);
  }

  private async unusable(reason: string): Promise<readonly unknown[]> {
    this.asideNeeded = true;
    const copy = await this.keepAside();
    if (copy.isOk()) {
      this.asideNeeded = false;
      this.log.error(
        { file: this.path, error: reason, copy: copy.value },
        "domains.json cannot be used: no domain registered through the API is loaded; the file is kept as the copy named here",
      );
    } else
      this.log.error(
        { file: this.path, error: reason, copyError: copy.error.message },
        "domains.json cannot be used, nor copied aside: no domain registered through the API is loaded, and domain-add/domain-remove fail until a copy can be made",
      );
    return [];
  }

  /**
   * Copy the file as it is to <file>.corrupt-<hash of its bytes>: the same
   * bad file met at every start makes one copy, not one per start.
   */
  private keepAside(): ResultAsync<string | undefined, IoError> {
    return ResultAsync.fromPromise(readFile(this.path), (e) => ioError(`cannot read ${this.path} to copy it aside`, e)).andThen((bytes) => {
      const copy = `${this.path}.corrupt-${createHash("sha256").update(bytes).digest("hex").slice(0, 12)}`;
      if (existsSync(copy)) return okAsync(copy);
      return writeFileAtomic(copy, bytes).map(() => copy);
    });
  }

  /** Replace the file by `entries`. On an error the file is as it was. */
  write(entries: readonly DomainsFileEntry[]): ResultAsync<void, IoError> {
    const aside = this.asideNeeded
      ? this.keepAside().map(() => {
          this.asideNeeded = false;
        })
      : okAsync(undefined);
    const raw = entries.map((e) => (e.kind === "domain" ? e.config : e.raw));
    return aside.andThen(() => writeFileAtomic(this.path, `${JSON.stringify(raw, null, 2)}\n`));
  }
}
