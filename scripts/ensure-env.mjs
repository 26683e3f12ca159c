#!/usr/bin/env node
// Installs what `npm run demo` / `npm test` need and lack: npm dependencies
// (npm ci) when node_modules is missing, and QEMU and its tools through
// apt-get when running as root. Otherwise prints one line saying what to
// install. Plain JavaScript: it runs before dependencies exist.
import { execFileSync, spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
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
};
const APT = ["qemu-system-x86", "qemu-utils", "libnbd-bin", "libxml2-utils", "openssl"];

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
try {
  execFileSync("qemu-system-x86_64", ["--version"], { stdio: "ignore" });
} catch {
  console.error("qbackupd: qemu-system-x86_64 is installed but does not run");
  process.exit(1);
}
