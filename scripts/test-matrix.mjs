#!/usr/bin/env node
// Runs the test suite once per QEMU of the matrix: the system's QEMU (on PATH)
// and each QEMU that scripts/ensure-env.mjs extracted under the cache
// directory (QEMU 10.0 from bookworm-backports). One setting selects the QEMU
// of a run: QBACKUPD_QEMU_BIN, a directory holding qemu-system-x86_64,
// qemu-storage-daemon, qemu-img, qemu-io and qemu-nbd, put first on PATH
// ("system" for the system's own). Set it yourself to run one version only:
//   QBACKUPD_QEMU_BIN=~/.cache/qbackupd/qemu-10.0.2/usr/bin npm test
// The tests come in two layers (test/unit: no QEMU, seconds; test/qemu:
// real QEMU). Without arguments the unit layer runs once, first, and the
// QEMU layer once per QEMU; with arguments (test files, tap options) every
// run gets them as they are.
// Node.js: the runs above use the node on PATH (this machine's default,
// Node 20); then, when scripts/ensure-env.mjs fetched Node.js 24 LTS (the
// runtime the Dockerfile and the systemd unit ship on) under the cache
// directory, the unit layer and the QEMU layer of the newest QEMU run once
// more with its bin/ first on PATH, so tap, the tests and the daemon they
// start all run on it. QBACKUPD_NODE_MATRIX=system leaves that leg out. To
// run files on Node 24 by hand:
//   PATH=~/.cache/qbackupd/node-24.21.0/bin:$PATH npx tap test/unit/foo.test.ts
// Each run says what it tested; the last line is tap's summary format with
// the totals of all runs, which .ci/run reads.
import { spawn, spawnSync } from "node:child_process";
import { existsSync, readdirSync } from "node:fs";
import { delimiter, join } from "node:path";

const cacheRoot = process.env.QBACKUPD_CACHE ?? join(process.env.HOME ?? "/root", ".cache", "qbackupd");
const args = process.argv.slice(2);

function versionOf(bin) {
  const exe = bin === "system" ? "qemu-system-x86_64" : join(bin, "qemu-system-x86_64");
  const r = spawnSync(exe, ["--version"], { encoding: "utf8" });
  const m = /version (\d+\.\d+\.\d+)/.exec(r.stdout ?? "");
  return m ? m[1] : "unknown";
}

const chosen = process.env.QBACKUPD_QEMU_BIN;
const bins = chosen
  ? [chosen]
  : ["system", join(cacheRoot, "qemu-10.0.2", "usr", "bin")].filter((b) => b === "system" || existsSync(join(b, "qemu-system-x86_64")));

/** One tap run; resolves with its totals read from tap's summary line. */
function tap(label, tapArgs, env) {
  return new Promise((resolve) => {
    const child = spawn("npx", ["tap", ...tapArgs], { env, stdio: ["ignore", "pipe", "inherit"] });
    let last = "";
    let buf = "";
    child.stdout.on("data", (d) => {
      process.stdout.write(d);
      buf += d.toString();
      const lines = buf.split("\n");
      buf = lines.pop() ?? "";
      for (const l of lines) if (/^# \{ total: \d+/.test(l)) last = l;
    });
    child.on("close", (code, signal) => {
      if (/^# \{ total: \d+/.test(buf)) last = buf;
      const num = (k) => Number(new RegExp(`${k}: (\\d+)`).exec(last)?.[1] ?? 0);
      const total = num("total");
      const pass = num("pass");
      resolve({ label, total, pass, ok: code === 0 && signal === null && total > 0 });
    });
  });
}

/** Node.js 24's bin directory as ensure-env.mjs left it (the newest node-24.* there), or undefined. */
function node24Bin() {
  if (process.env.QBACKUPD_NODE_MATRIX === "system" || !existsSync(cacheRoot)) return undefined;
  const dirs = readdirSync(cacheRoot)
    .filter((d) => /^node-24\.\d+\.\d+$/.test(d) && existsSync(join(cacheRoot, d, "bin", "node")))
    .sort((a, b) => a.localeCompare(b, "en", { numeric: true }));
  return dirs.length > 0 ? join(cacheRoot, dirs.at(-1), "bin") : undefined;
}

/** The environment of a run on the node in nodeBin (undefined: the node on PATH). */
function withNode(env, nodeBin) {
  return nodeBin === undefined ? env : { ...env, PATH: `${nodeBin}${delimiter}${env.PATH ?? ""}` };
}

function nodeVersion(env) {
  return spawnSync("node", ["--version"], { env, encoding: "utf8" }).stdout?.trim() ?? "unknown";
}

function runUnit(nodeBin) {
  const env = withNode(process.env, nodeBin);
  const node = nodeVersion(env);
  console.log(`# ==== unit tests (no QEMU), Node ${node} ====`);
  return tap(`unit, Node ${node}`, ["-j", "4", "test/unit/**/*.test.ts"], env);
}

function runQemu(bin, nodeBin) {
  const version = versionOf(bin);
  const base = { ...process.env, QBACKUPD_QEMU_BIN: bin, QBACKUPD_QEMU_VERSION: version };
  if (bin !== "system") base.PATH = `${bin}${delimiter}${process.env.PATH ?? ""}`;
  const env = withNode(base, nodeBin);
  const node = nodeVersion(env);
  console.log(`# ==== QEMU ${version} (${bin === "system" ? "system, on PATH" : bin}), Node ${node} ====`);
  return tap(`QEMU ${version}, Node ${node}`, args.length > 0 ? args : ["test/qemu/**/*.test.ts"], env);
}

const results = [];
if (args.length === 0) results.push(await runUnit(undefined));
for (const bin of bins) results.push(await runQemu(bin, undefined));
const n24 = args.length === 0 ? node24Bin() : undefined;
if (n24 !== undefined && nodeVersion(process.env).startsWith("v24.")) {
  console.log("# note: the node on PATH is already Node 24; no second Node leg");
} else if (n24 !== undefined) {
  results.push(await runUnit(n24));
  results.push(await runQemu(bins.at(-1), n24));
}
let total = 0;
let pass = 0;
for (const r of results) {
  const fail = Math.max(r.total - r.pass, r.ok ? 0 : 1);
  console.log(`# ${r.label}: ${r.pass} passed, ${fail} failed`);
  total += Math.max(r.total, r.pass + fail);
  pass += r.pass;
}
if (bins.length < 2 && !chosen) console.log("# note: only the system's QEMU was available; QEMU 10.0 was not fetched");
if (args.length === 0 && n24 === undefined) {
  const why = process.env.QBACKUPD_NODE_MATRIX === "system" ? "left out (QBACKUPD_NODE_MATRIX=system)" : "not fetched";
  console.log(`# note: Node.js 24 was ${why}; the suite ran on this machine's node only`);
}
console.log(`# { total: ${total}, pass: ${pass}, fail: ${total - pass} }`);
process.exit(results.every((r) => r.ok) ? 0 : 1);
