#!/usr/bin/env node
// Installs what `npm run demo` / `npm test` need and lack: npm dependencies
// (npm ci) when node_modules is missing, and QEMU and its tools through
// apt-get when running as root. Otherwise prints one line saying what to
// install. Plain JavaScript: it runs before dependencies exist.
import { execFileSync, spawnSync } from "node:child_process";
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const TOOLS = {
  "qemu-system-x86_64": "qemu-system-x86",
  "qemu-storage-daemon": "qemu-system-x86",
  "qemu-img": "qemu-utils",
  "qemu-io": "qemu-utils",
  nbdinfo: "libnbd-bin",
  nbdcopy: "libnbd-bin",
  xmllint: "libxml2-utils",
  openssl: "openssl",
  // checks the metrics exposition and the example alert rules (test/unit/metrics.test.ts)
  promtool: "prometheus",
};
const APT = ["qemu-system-x86", "qemu-utils", "libnbd-bin", "libxml2-utils", "openssl", "prometheus"];

function have(cmd) {
  return spawnSync("sh", ["-c", `command -v ${cmd}`], { stdio: "ignore" }).status === 0;
}

function run(cmd, args, opts = {}) {
  const r = spawnSync(cmd, args, { stdio: "inherit", cwd: root, ...opts });
  if (r.status !== 0) {
    console.error(`qbackupd: '${cmd} ${args.join(" ")}' failed (exit ${r.status ?? r.signal})`);
    process.exit(1);
  }
}

if (!existsSync(join(root, "node_modules", ".package-lock.json"))) {
  console.error("qbackupd: installing npm dependencies (npm ci)…");
  run("npm", ["ci", "--no-audit", "--no-fund"]);
}

const missing = Object.keys(TOOLS).filter((c) => !have(c));
if (missing.length > 0) {
  const isRoot = typeof process.getuid === "function" && process.getuid() === 0;
  if (isRoot && have("apt-get")) {
    console.error(`qbackupd: installing ${APT.join(" ")} (missing: ${missing.join(", ")})…`);
    const env = { ...process.env, DEBIAN_FRONTEND: "noninteractive" };
    run("apt-get", ["update", "-q"], { env, stdio: ["ignore", "ignore", "inherit"] });
    run("apt-get", ["install", "-y", "-q", "--no-install-recommends", ...APT], { env, stdio: ["ignore", "ignore", "inherit"] });
  } else {
    const pkgs = [...new Set(missing.map((c) => TOOLS[c]))].join(" ");
    console.error(`qbackupd: missing ${missing.join(", ")}; install them with: apt-get install -y --no-install-recommends ${pkgs}`);
    process.exit(1);
  }
}
// systemd-analyze scores the unit's hardening (test/unit/systemd-hardening.test.ts);
// no running systemd is needed, only the package's tools. Optional: without it
// that test is skipped, and .ci/run counts a skip as not passed.
if (!have("systemd-analyze")) {
  const isRoot = typeof process.getuid === "function" && process.getuid() === 0;
  if (isRoot && have("apt-get")) {
    console.error("qbackupd: installing systemd (for systemd-analyze security)…");
    const env = { ...process.env, DEBIAN_FRONTEND: "noninteractive" };
    spawnSync("apt-get", ["update", "-q"], { env, stdio: ["ignore", "ignore", "inherit"] });
    const r = spawnSync("apt-get", ["install", "-y", "-q", "--no-install-recommends", "systemd"], {
      env,
      stdio: ["ignore", "ignore", "inherit"],
    });
    if (r.status !== 0) console.error("qbackupd: could not install systemd; the unit's exposure test will be skipped");
  } else {
    console.error("qbackupd: no systemd-analyze (apt-get install systemd); the unit's exposure test will be skipped");
  }
}
try {
  execFileSync("qemu-system-x86_64", ["--version"], { stdio: "ignore" });
} catch {
  console.error("qbackupd: qemu-system-x86_64 is installed but does not run");
  process.exit(1);
}

// ---------------------------------------------------------------------------
// The QEMU matrix: besides the system's QEMU (7.2 on bookworm), QEMU 10.0 from
// Debian bookworm-backports, fetched with `apt-get download` through an apt
// configuration of our own (the system's sources plus the backports suite) and
// extracted under a cache directory. The system's QEMU and apt state are never
// touched. `scripts/qemu-matrix.mjs` lists the result; tests pick one with
// QBACKUPD_QEMU_BIN (a directory put first on PATH).
// ---------------------------------------------------------------------------
const BACKPORTS_VERSION = "1:10.0.2+ds-2+deb13u1~bpo12+1";
const BACKPORTS_PKGS = ["qemu-system-x86", "qemu-system-common", "qemu-system-data", "qemu-utils", "qemu-block-extra"];
const cacheRoot = process.env.QBACKUPD_CACHE ?? join(process.env.HOME ?? "/root", ".cache", "qbackupd");
const q10 = join(cacheRoot, "qemu-10.0.2");

function systemMirror() {
  // deb822 first, then the classic one-line format
  for (const f of ["/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"]) {
    if (!existsSync(f)) continue;
    const text = readFileSync(f, "utf8");
    const m = /^URIs:\s*(\S+)/m.exec(text) ?? /^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+bookworm\s/m.exec(text);
    if (m) return m[1];
  }
  return "http://deb.debian.org/debian";
}

function fetchQemu10() {
  if (existsSync(join(q10, "usr", "bin", "qemu-system-x86_64"))) return true;
  if (process.env.QBACKUPD_QEMU_MATRIX === "system") return false;
  if (!have("apt-get") || !have("dpkg-deb")) {
    console.error("qbackupd: cannot fetch QEMU 10.0 (no apt-get/dpkg-deb); the suite runs on the system's QEMU only");
    return false;
  }
  console.error(`qbackupd: fetching QEMU ${BACKPORTS_VERSION} from bookworm-backports into ${q10}…`);
  const work = join(cacheRoot, "apt");
  const debs = join(work, "debs");
  mkdirSync(join(work, "lists", "partial"), { recursive: true });
  mkdirSync(join(work, "cache", "archives", "partial"), { recursive: true });
  mkdirSync(debs, { recursive: true });
  const list = join(work, "sources.list");
  writeFileSync(list, `deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${systemMirror()} bookworm-backports main\n`);
  const opts = [
    "-o",
    `Dir::Etc::sourcelist=${list}`,
    "-o",
    "Dir::Etc::sourceparts=/dev/null",
    "-o",
    `Dir::State::Lists=${join(work, "lists")}`,
    "-o",
    `Dir::Cache=${join(work, "cache")}`,
    "-o",
    "APT::Get::List-Cleanup=0",
    "-o",
    "APT::Sandbox::User=root",
  ];
  const quiet = { stdio: ["ignore", "ignore", "inherit"] };
  let r = spawnSync("apt-get", [...opts, "update", "-q"], quiet);
  if (r.status !== 0) {
    console.error("qbackupd: apt-get update of bookworm-backports failed; the suite runs on the system's QEMU only");
    return false;
  }
  r = spawnSync("apt-get", [...opts, "download", ...BACKPORTS_PKGS.map((p) => `${p}=${BACKPORTS_VERSION}`)], { ...quiet, cwd: debs });
  if (r.status !== 0) {
    console.error("qbackupd: apt-get download of QEMU 10.0 failed; the suite runs on the system's QEMU only");
    return false;
  }
  const tmp = `${q10}.tmp-${process.pid}`;
  rmSync(tmp, { recursive: true, force: true });
  mkdirSync(tmp, { recursive: true });
  for (const deb of readdirSync(debs).filter((f) => f.endsWith(".deb"))) run("dpkg-deb", ["-x", join(debs, deb), tmp]);
  // The system's firmware (seabios) and keymaps serve the extracted binaries; point them there explicitly.
  rmSync(q10, { recursive: true, force: true });
  renameSync(tmp, q10);
  rmSync(debs, { recursive: true, force: true });
  return true;
}

if (fetchQemu10()) {
  const v = spawnSync(join(q10, "usr", "bin", "qemu-system-x86_64"), ["--version"], { encoding: "utf8" });
  if (v.status !== 0) {
    console.error(`qbackupd: the extracted QEMU 10.0 does not run (${v.stderr.trim().split("\n")[0]}); removing it`);
    rmSync(q10, { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------------------
// The Node.js matrix: Node.js 24 LTS (the runtime the Dockerfile and the unit
// ship on) besides the machine's own node. The npm registry's `node@24`
// package carries no binary: its preinstall script installs
// `node-linux-<arch>@<same version>`, whose tarball holds bin/node. We fetch
// that package directly with `npm pack` (no install script runs, so npm's
// allowScripts policy cannot skip it, and nothing but the npm registry is
// asked) and unpack it under the cache directory. scripts/test-matrix.mjs
// runs the unit layer and one QEMU layer with its bin/ first on PATH.
// QBACKUPD_NODE_MATRIX=system skips it.
// ---------------------------------------------------------------------------
const NODE24_VERSION = "24.21.0";
const n24 = join(cacheRoot, `node-${NODE24_VERSION}`);

function fetchNode24() {
  const bin = join(n24, "bin", "node");
  if (existsSync(bin)) return true;
  if (process.env.QBACKUPD_NODE_MATRIX === "system") return false;
  const pkg = `node-${process.platform}-${process.arch}@${NODE24_VERSION}`;
  console.error(`qbackupd: fetching Node.js ${NODE24_VERSION} (npm package ${pkg}) into ${n24}…`);
  const tmp = `${n24}.tmp-${process.pid}`;
  rmSync(tmp, { recursive: true, force: true });
  mkdirSync(tmp, { recursive: true });
  const packed = spawnSync("npm", ["pack", pkg, "--pack-destination", tmp, "--silent"], {
    encoding: "utf8",
    stdio: ["ignore", "pipe", "inherit"],
  });
  const tgz = packed.stdout?.trim().split("\n").at(-1);
  if (packed.status !== 0 || !tgz) {
    console.error(`qbackupd: npm pack ${pkg} failed; the suite runs on this machine's node only`);
    rmSync(tmp, { recursive: true, force: true });
    return false;
  }
  const x = spawnSync("tar", ["-xzf", join(tmp, tgz), "-C", tmp, "--strip-components=1"], { stdio: "inherit" });
  rmSync(join(tmp, tgz), { force: true });
  if (x.status !== 0 || !existsSync(join(tmp, "bin", "node"))) {
    console.error(`qbackupd: ${pkg} did not unpack to bin/node; the suite runs on this machine's node only`);
    rmSync(tmp, { recursive: true, force: true });
    return false;
  }
  rmSync(n24, { recursive: true, force: true });
  renameSync(tmp, n24);
  return true;
}

if (fetchNode24()) {
  const v = spawnSync(join(n24, "bin", "node"), ["--version"], { encoding: "utf8" });
  if (v.status !== 0 || v.stdout.trim() !== `v${NODE24_VERSION}`) {
    console.error(`qbackupd: the fetched Node.js ${NODE24_VERSION} does not run (${(v.stderr ?? "").trim().split("\n")[0]}); removing it`);
    rmSync(n24, { recursive: true, force: true });
  }
}
