/** Shared XML test helpers: the libvirt fixtures and xmllint --relaxng validation. */
import { execFile } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";

const run = promisify(execFile);

// a copy of ../shared/libvirt-xml (libvirt's LGPL test data and schemas; see its README), so a clone anywhere runs the tests
export const LIBVIRT_XML = join(import.meta.dirname, "..", "fixtures", "libvirt-xml");

export function fixture(dir: string, file: string): string {
  return readFileSync(join(LIBVIRT_XML, dir, file), "utf8");
}

/** Validate documents against one of libvirt's schemas; returns xmllint's complaint per invalid document. */
export async function relaxngValidate(
  schema: "domaincheckpoint" | "domainbackup",
  docs: readonly string[],
): Promise<(string | undefined)[]> {
  const dir = mkdtempSync(join(tmpdir(), "qbackupd-rng-"));
  try {
    const results: (string | undefined)[] = [];
    for (const [i, doc] of docs.entries()) {
      const f = join(dir, `${i}.xml`);
      writeFileSync(f, doc);
      try {
        await run("xmllint", ["--noout", "--relaxng", join(LIBVIRT_XML, "schemas", `${schema}.rng`), f]);
        results.push(undefined);
      } catch (e) {
        results.push(String((e as { stderr?: string }).stderr ?? e));
      }
    }
    return results;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
