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
// Each run says what it tested; the last line is tap's summary format with
// the totals of all runs, which .ci/run reads.
import { spawn, spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
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

function runQemu(bin) {
  const version = versionOf(bin);
  const env = { ...process.env, QBACKUPD_QEMU_BIN: bin, QBACKUPD_QEMU_VERSION: version };
  if (bin !== "system") env.PATH = `${bin}${delimiter}${process.env.PATH ?? ""}`;
  console.log(`# ==== QEMU ${version} (${bin === "system" ? "system, on PATH" : bin}) ====`);
  return tap(`QEMU ${version}`, args.length > 0 ? args : ["test/qemu/**/*.test.ts"], env);
}

const results = [];
if (args.length === 0) {
  console.log("# ==== unit tests (no QEMU) ====");
  results.push(await tap("unit", ["-j", "4", "test/unit/**/*.test.ts"], process.env));
}
for (const bin of bins) results.push(await runQemu(bin));
let total = 0;
let pass = 0;
for (const r of results) {
  const fail = Math.max(r.total - r.pass, r.ok ? 0 : 1);
  console.log(`# ${r.label}: ${r.pass} passed, ${fail} failed`);
  total += Math.max(r.total, r.pass + fail);
  pass += r.pass;
}
if (bins.length < 2 && !chosen) console.log("# note: only the system's QEMU was available; QEMU 10.0 was not fetched");
console.log(`# { total: ${total}, pass: ${pass}, fail: ${total - pass} }`);
process.exit(results.every((r) => r.ok) ? 0 : 1);
