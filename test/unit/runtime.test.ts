/**
 * The Node.js runtime contract: Node.js 24 LTS is what ships (the
 * Dockerfile's stages, the version ensure-env fetches for the suite's Node 24
 * leg), and `npm ci` warns EBADENGINE on none of the Node versions the
 * project admits. The check is npm's own (npm-install-checks' checkEngine:
 * `semver.satisfies(node, engines.node, { includePrerelease: true })`),
 * applied to every package in package-lock.json. Reads files only.
 */
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";
import t from "tap";

const ROOT = join(import.meta.dirname, "..", "..");
const read = (p: string) => readFileSync(join(ROOT, p), "utf8");
const semver = createRequire(import.meta.url)("semver") as {
  satisfies(version: string, range: string, options?: { includePrerelease?: boolean }): boolean;
};

interface LockEntry {
  readonly version?: string;
  readonly engines?: { readonly node?: string };
}
const pkg = JSON.parse(read("package.json")) as { engines: { node: string } };
const lock = JSON.parse(read("package-lock.json")) as { packages: Record<string, LockEntry> };
const node24 = /const NODE24_VERSION = "(\d+\.\d+\.\d+)"/.exec(read("scripts/ensure-env.mjs"))?.[1];

/** The oldest release of each line `engines` admits, the Node 24 the suite runs on, and the node running this test. */
const versions = ["20.19.0", "22.12.0", "24.0.0", ...(node24 === undefined ? [] : [node24]), process.versions.node];

t.test("Node.js 24 LTS ships", async (t) => {
  const froms = [...read("Dockerfile").matchAll(/^FROM\s+(\S+)/gm)].map((m) => m[1]);
  t.ok(froms.length >= 2, "a build and a runtime stage");
  for (const f of froms) t.equal(f, "node:24-bookworm-slim", "every stage builds on Node 24 LTS");
  t.ok(node24?.startsWith("24."), `ensure-env fetches a Node 24 (${node24})`);
  for (const v of versions) t.ok(semver.satisfies(v, pkg.engines.node), `engines ${pkg.engines.node} admits ${v}`);
  t.notOk(semver.satisfies("20.18.0", pkg.engines.node), "nor older than the dependencies need");
});

t.test("no EBADENGINE from npm ci on any admitted Node", async (t) => {
  let checked = 0;
  for (const [path, entry] of Object.entries(lock.packages)) {
    const range = entry.engines?.node;
    if (path === "" || range === undefined) continue;
    checked++;
    const refused = versions.filter((v) => !semver.satisfies(v, range, { includePrerelease: true }));
    if (refused.length > 0) t.fail(`${path}@${entry.version} wants node ${range}: refuses ${refused.join(", ")}`);
  }
  t.ok(checked > 100, `${checked} packages with an engines field checked against ${versions.join(", ")}`);
});
