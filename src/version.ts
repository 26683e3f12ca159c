/** The package's version, read once from package.json (two levels above src/ and dist/). Never throws. */
import { readFileSync } from "node:fs";
import { join } from "node:path";

export function packageVersion(): string {
  try {
    const p = JSON.parse(readFileSync(join(import.meta.dirname, "..", "package.json"), "utf8")) as { version?: string };
    return p.version ?? "unknown";
  } catch {
    return "unknown";
  }
}
