#!/usr/bin/env node
// Builds a small real Linux guest for the guest-agent tests, from Debian
// packages only: a bookworm kernel (bzImage) and an initramfs holding
// busybox, qemu-ga with its libraries, the virtio/ext4 modules and an /init
// that mounts the data disk (/dev/vda) at /data, starts qemu-ga and a
// workload writing checksummed files. Cached under
// ${QBACKUPD_CACHE:-~/.cache/qbackupd}/guest/; rebuilt only when missing.
// Plain JavaScript without dependencies (no cpio or modinfo on the host:
// both are done here). Prints the guest directory on success.
import { execFileSync, spawnSync } from "node:child_process";
import {
  copyFileSync,
  existsSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  realpathSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { homedir, tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { gzipSync } from "node:zlib";

const cache = process.env.QBACKUPD_CACHE ?? join(homedir(), ".cache", "qbackupd");
const out = join(cache, "guest");
const KERNEL = join(out, "bzImage");
const INITRD = join(out, "initramfs.cpio.gz");
// virtio_console carries the agent's virtio-serial port; ext4 the data disk.
// crc32c_generic is ext4's soft dependency (a softdep, not in depends=): without
// it mount fails with "Cannot load crc32c driver".
const WANTED = ["virtio_pci", "virtio_blk", "virtio_console", "crc32c_generic", "ext4"];

function fail(msg) {
  console.error(`build-guest: ${msg}`);
  console.error(
    "build-guest: the guest needs a Debian (bookworm) host with apt-get and its package sources reachable " +
      "(linux-image-6.1.0-*-amd64, busybox-static, qemu-guest-agent), and the libraries qemu-ga links against",
  );
  process.exit(1);
}

function run(cmd, args, opts = {}) {
  const r = spawnSync(cmd, args, { encoding: "utf8", ...opts });
  if (r.error !== undefined) fail(`cannot run '${cmd}': ${r.error.message}`);
  if (r.status !== 0) fail(`'${cmd} ${args.join(" ")}' failed (exit ${r.status ?? r.signal}): ${(r.stderr ?? "").trim()}`);
  return r.stdout ?? "";
}

// bump when what goes into the guest changes: a cached guest of another version is rebuilt
const VERSION = "2";
const STAMP = join(out, "version");
if (existsSync(KERNEL) && existsSync(INITRD) && existsSync(STAMP) && readFileSync(STAMP, "utf8") === VERSION) {
  console.log(out);
  process.exit(0);
}

const work = mkdtempSync(join(tmpdir(), "qbackupd-guest-"));
process.once("exit", () => rmSync(work, { recursive: true, force: true }));

// linux-image-amd64 is the metapackage; its dependency names the versioned kernel
const kpkg = /Depends: (linux-image-6\.1\.0-[0-9]+-amd64)\b/.exec(run("apt-cache", ["depends", "linux-image-amd64"]))?.[1];
if (kpkg === undefined) fail("no linux-image-6.1.0-*-amd64 package known to apt (apt-get update?)");
const pkgs = [kpkg, "busybox-static", "qemu-guest-agent"];
const dl = join(work, "debs");
mkdirSync(dl);
run("apt-get", ["download", "-q", ...pkgs], { cwd: dl });
const x = join(work, "x");
for (const deb of readdirSync(dl).filter((f) => f.endsWith(".deb"))) run("dpkg-deb", ["-x", join(dl, deb), x]);

// kernel and modules
const vmlinuz = readdirSync(join(x, "boot")).find((f) => f.startsWith("vmlinuz-"));
if (vmlinuz === undefined) fail(`${kpkg} has no boot/vmlinuz-*`);
const kver = vmlinuz.slice("vmlinuz-".length);
const modDir = join(x, "lib", "modules", kver);
const modFiles = new Map(); // module name (underscores) -> path
(function walk(d) {
  for (const e of readdirSync(d, { withFileTypes: true })) {
    const p = join(d, e.name);
    if (e.isDirectory()) walk(p);
    else if (/\.ko(\.xz)?$/.test(e.name)) modFiles.set(e.name.replace(/\.ko(\.xz)?$/, "").replaceAll("-", "_"), p);
  }
})(modDir);
const builtin = new Set(
  readFileSync(join(modDir, "modules.builtin"), "utf8")
    .split("\n")
    .filter(Boolean)
    .map((l) => l.split("/").pop().replace(/\.ko$/, "").replaceAll("-", "_")),
);
/** A module's bytes, decompressed (busybox insmod may not read .ko.xz). */
function moduleBytes(p) {
  return p.endsWith(".xz") ? execFileSync("xz", ["-dc", p], { maxBuffer: 1 << 28 }) : readFileSync(p);
}
/** `depends=` from the module's .modinfo strings (what modinfo -F depends prints). */
function depends(bytes) {
  const i = bytes.indexOf(Buffer.from("\0depends="));
  if (i === -1) return [];
  const start = i + "\0depends=".length;
  const s = bytes.subarray(start, bytes.indexOf(0, start)).toString("latin1");
  return s.split(",").filter(Boolean);
}
const order = []; // dependencies first
const modules = new Map(); // name -> bytes
function need(name) {
  if (modules.has(name) || builtin.has(name)) return;
  const p = modFiles.get(name);
  if (p === undefined) fail(`module ${name}: neither built in nor in ${kpkg}`);
  const bytes = moduleBytes(p);
  modules.set(name, bytes);
  for (const d of depends(bytes)) need(d);
  order.push(name);
}
for (const m of WANTED) need(m);

// the initramfs tree, as [path, entry] with entry {dir} | {link} | {data, mode}
const files = new Map();
function dir(p) {
  for (let d = p; d !== "/" && d !== "." && !files.has(d); d = dirname(d)) files.set(d, { dir: true });
}
function file(p, data, mode = 0o644) {
  dir(dirname(p));
  files.set(p, { data, mode });
}
function link(p, target) {
  dir(dirname(p));
  files.set(p, { link: target });
}
for (const d of ["/bin", "/sbin", "/usr/bin", "/usr/sbin", "/proc", "/sys", "/dev", "/run", "/tmp", "/data", "/var/log", "/lib/mod"])
  dir(d);
file("/bin/busybox", readFileSync(join(x, "bin", "busybox")), 0o755);
for (const m of order) file(`/lib/mod/${m}.ko`, modules.get(m));

// qemu-ga with the libraries ldd finds on the host (its Debian dependencies are QEMU's own) and the loader
const qga = join(x, "usr", "sbin", "qemu-ga");
file("/usr/sbin/qemu-ga", readFileSync(qga), 0o755);
for (const line of run("ldd", [qga]).split("\n")) {
  const m = /=>\s*(\/\S+)/.exec(line) ?? /^\s*(\/\S+)\s*\(/.exec(line);
  if (/not found/.test(line)) fail(`qemu-ga needs a library the host lacks: ${line.trim()}`);
  if (m === null) continue;
  const lib = m[1];
  const real = realpathSync(lib);
  file(real, readFileSync(real), 0o755);
  if (real !== lib) link(lib, real);
  // /lib64/ld-linux… is a symlink on merged-/usr hosts: keep its path valid
  if (lstatSync(lib).isSymbolicLink() && !files.has(lib)) link(lib, readlinkSync(lib));
}
if (!files.has("/lib64/ld-linux-x86-64.so.2")) fail("ldd did not name the dynamic loader");
// merged /usr: /lib/x86_64-linux-gnu is where both /lib and /usr/lib paths resolve on the host
for (const p of [...files.keys()]) if (p.startsWith("/usr/lib/") && !files.has(p.slice(4))) link(p.slice(4), p);

const init = `#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "GUEST-INIT kernel $(uname -r)" > /dev/ttyS0
for m in ${order.join(" ")}; do insmod /lib/mod/$m.ko || echo "GUEST-ERROR insmod $m" > /dev/ttyS0; done
# no udev: the agent's port by name, as udev's rule would link it
for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
  ls /sys/class/virtio-ports/*/name >/dev/null 2>&1 && [ -e /dev/vda ] && break
  sleep 0.25
done
mkdir -p /dev/virtio-ports
for p in /sys/class/virtio-ports/*; do
  [ -e "$p/name" ] && ln -sf "../\${p##*/}" "/dev/virtio-ports/$(cat $p/name)"
done
# qemu-ga logs "guest-fsfreeze called" to syslog: straight to the serial console, which the host reads
syslogd -O /dev/ttyS0
if ! mount -t ext4 /dev/vda /data; then echo "GUEST-ERROR mount /dev/vda" > /dev/ttyS0; exec sleep 100000; fi
mkdir -p /run/qga
if ! qemu-ga -d -F/etc/qemu/fsfreeze-hook -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 -t /run/qga -f /run/qga.pid; then
  echo "GUEST-ERROR qemu-ga" > /dev/ttyS0; exec sleep 100000
fi
# the workload: each file written in full and fsynced before its line goes
# into the manifest (also fsynced: busybox "sync FILE" is fsync), so every
# file the manifest lists is complete
cd /data
touch manifest
n=$(wc -l < manifest)
echo "WORKLOAD-RUNNING" > /dev/ttyS0
while :; do
  n=$((n + 1))
  f=f$n
  head -c $((4096 + (n % 32) * 4096)) /dev/urandom > $f
  sync $f
  echo "$f $(sha256sum $f | cut -d' ' -f1)" >> manifest
  sync manifest
  usleep 50000
done
`;
file("/init", Buffer.from(init), 0o755);
// qemu-ga runs its fsfreeze hook with "freeze" before freezing and "thaw" after
// thawing; its syslog line covers only the freeze, the hook shows both. The
// second's sleep before a freeze (the filesystems are not frozen yet) gives a
// test time to act between "guest-fsfreeze called" and the freeze's answer.
const hook = '#!/bin/sh\necho "FSFREEZE-HOOK $1" > /dev/ttyS0\n[ "$1" = freeze ] && sleep 1\nexit 0\n';
file("/etc/qemu/fsfreeze-hook", Buffer.from(hook), 0o755);

// cpio "newc", written here: the host may have no cpio
const chunks = [];
let ino = 1;
function entry(name, mode, data) {
  const nameBuf = Buffer.from(`${name}\0`);
  const hex = (n) => n.toString(16).padStart(8, "0");
  const fields = [ino++, mode, 0, 0, 1, 0, data.length, 0, 0, 0, 0, nameBuf.length, 0];
  const hdr = Buffer.from(`070701${fields.map(hex).join("")}`);
  const pad = (n) => Buffer.alloc((4 - (n % 4)) % 4);
  chunks.push(hdr, nameBuf, pad(hdr.length + nameBuf.length), data, pad(data.length));
}
for (const p of [...files.keys()].sort()) {
  const e = files.get(p);
  const name = p.slice(1);
  if (e.dir) entry(name, 0o040755, Buffer.alloc(0));
  else if (e.link !== undefined) entry(name, 0o120777, Buffer.from(e.link));
  else entry(name, 0o100000 | e.mode, e.data);
}
entry("TRAILER!!!", 0, Buffer.alloc(0));

mkdirSync(out, { recursive: true });
copyFileSync(join(x, "boot", vmlinuz), `${KERNEL}.tmp`);
writeFileSync(`${INITRD}.tmp`, gzipSync(Buffer.concat(chunks)));
writeFileSync(join(out, "modules.txt"), `${kver}\n${order.join("\n")}\n`);
renameSync(`${INITRD}.tmp`, INITRD);
renameSync(`${KERNEL}.tmp`, KERNEL);
writeFileSync(STAMP, VERSION);
console.error(`build-guest: kernel ${kver}, ${order.length} modules, initramfs ${statSync(INITRD).size} bytes`);
console.log(out);
