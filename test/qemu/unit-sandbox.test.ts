/**
 * The systemd unit's sandbox, held against a real daemon without a running
 * systemd (there is none here): the daemon runs under the system calls the
 * unit denies, `~@privileged @resources` less `@chown` (expanded by
 * `systemd-analyze syscall-filter`, compiled into a seccomp filter that
 * answers EPERM, as SystemCallErrorNumber=EPERM makes systemd do), and with
 * /proc mounted `hidepid=invisible,subset=pid` in a mount namespace of its own
 * (ProtectProc=invisible, ProcSubset=pid). It then does what needs the most:
 * QEMU runs as nobody (targets chowned to it), a push, a pull over a unix
 * socket and one over TCP on a free port, SIGTERM. Not emulated: the
 * @system-service allow list, IPAddressDeny= (cgroup BPF), the capability
 * bounding set. Root only (unshare, mount); needs cc and systemd-analyze,
 * which scripts/ensure-env.mjs installs.
 */
import { spawnSync } from "node:child_process";
import { chmodSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { addDomain, cli, startDaemon } from "../helpers/daemon.js";
import { leftovers } from "../helpers/domain.js";
import { rangeHolds, startVm, tempDir } from "../helpers/qemu.js";

const ROOT = join(import.meta.dirname, "..", "..");
const MiB = 1024 * 1024;
const NOBODY = { uid: 65534, gid: 65534 };

/** The syscalls of a systemd group (or a single call), nested groups expanded. */
function expand(item: string, seen = new Set<string>()): Set<string> {
  if (!item.startsWith("@")) return new Set([item]);
  if (seen.has(item)) return new Set();
  seen.add(item);
  const r = spawnSync("systemd-analyze", ["syscall-filter", "--no-pager", item], { encoding: "utf8" });
  if (r.status !== 0) throw new Error(`systemd-analyze syscall-filter ${item}: ${r.stderr}`);
  const out = new Set<string>();
  for (const l of r.stdout.split("\n").slice(1)) {
    const w = l.trim();
    if (w === "" || w.startsWith("#")) continue;
    for (const s of expand(w, seen)) out.add(s);
  }
  return out;
}

/** What the unit's SystemCallFilter= lines deny on top of the allow list: the `~` lines less what later lines allow again. */
function deniedByUnit(): string[] {
  const lines = readFileSync(join(ROOT, "packaging", "qbackupd.service"), "utf8")
    .split("\n")
    .filter((l) => l.startsWith("SystemCallFilter="))
    .map((l) => l.slice("SystemCallFilter=".length).trim());
  const denied = new Set<string>();
  for (const l of lines.slice(1)) {
    const deny = l.startsWith("~");
    for (const item of (deny ? l.slice(1) : l).split(/\s+/))
      for (const s of expand(item)) {
        if (deny) denied.add(s);
        else denied.delete(s);
      }
  }
  return [...denied].sort();
}

function why(): string | false {
  if (process.getuid?.() !== 0) return "needs root (unshare -m, mount)";
  for (const [cmd, arg] of [
    ["systemd-analyze", "--version"],
    ["cc", "--version"],
    ["unshare", "--version"],
  ] as const)
    if (spawnSync(cmd, [arg], { stdio: "ignore" }).status !== 0) return `${cmd} is not installed`;
  return false;
}
const skip = why();

/** A program that installs the seccomp filter (denied calls fail with EPERM) and executes its arguments. */
function buildFilter(dir: string, calls: readonly string[]): string {
  const src = join(dir, "deny.c");
  const entries = calls.map((c) => `#ifdef SYS_${c}\n  SYS_${c},\n#endif`).join("\n");
  writeFileSync(
    src,
    `#include <stddef.h>
#include <stdio.h>
#include <errno.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
static const int deny[] = {
${entries}
};
int main(int argc, char **argv) {
  enum { N = sizeof deny / sizeof deny[0] };
  static struct sock_filter f[2 * N + 4];
  int i = 0;
  f[i++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch));
  f[i++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0);
  f[i++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS);
  f[i++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
  for (int k = 0; k < N; k++) {
    f[i++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, deny[k], 0, 1);
    f[i++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM);
  }
  f[i++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
  struct sock_fprog prog = { .len = i, .filter = f };
  if (argc < 2 || prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog)) { perror("seccomp"); return 125; }
  execvp(argv[1], argv + 1);
  perror("execvp");
  return 126;
}
`,
  );
  const exe = join(dir, "deny");
  const r = spawnSync("cc", ["-O2", "-o", exe, src], { encoding: "utf8" });
  if (r.status !== 0) throw new Error(`cc: ${r.stderr}`);
  return exe;
}

t.test("the daemon under the unit's system-call deny list and /proc subset", { skip }, async (t) => {
  if (process.arch !== "x64") {
    t.pass("the filter is written for x86_64 only");
    return;
  }
  const calls = deniedByUnit();
  t.ok(calls.includes("setrlimit") && calls.includes("setuid"), `${calls.length} calls denied (@resources, @privileged)`);
  t.notOk(calls.includes("chown") || calls.includes("fchown"), "chown is allowed again");
  const filter = buildFilter(tempDir(t, "qbackupd-seccomp-"), calls);
  // the filter bites: setpriority (@resources) is refused, chown is not
  const probe = spawnSync(
    filter,
    [
      process.execPath,
      "-e",
      "const os=require('os'),fs=require('fs');let p='ok';try{os.setPriority(5)}catch(e){p=e.info?.code??e.code}fs.chownSync(process.argv[1],0,0);console.log(p)",
      filter,
    ],
    { encoding: "utf8", env: { ...process.env, NODE_OPTIONS: "" } },
  );
  t.match(probe.stdout.trim(), /^(EPERM|EACCES)$/, `setpriority refused under the filter (${probe.stderr.trim()})`);

  const vm = await startVm(t, { disks: [{ size: "16M" }, { size: "16M" }], runAs: NOBODY });
  await vm.write(0, 0x3c, 2 * MiB, MiB);
  const backups = tempDir(t, "qbk-backups-");
  chmodSync(backups, 0o755);
  const dir = tempDir(t, "qbackupd-daemon-");
  writeFileSync(join(dir, "config.json"), JSON.stringify({ backupDir: backups, allowDirs: [backups, vm.dir] }));
  const entry = join(ROOT, "dist", "daemon", "main-entry.js");
  const d = await startDaemon(t, {
    dir,
    command: [
      "unshare",
      "--mount",
      "--propagation",
      "private",
      "sh",
      "-c",
      'mount -t proc -o hidepid=invisible,subset=pid proc /proc && exec "$@"',
      "sh",
      filter,
      process.execPath,
      "--max-semi-space-size=1",
      entry,
    ],
  });
  const pid = d.proc.pid!;
  t.match(readFileSync(`/proc/${pid}/status`, "utf8"), /^Seccomp:\s+2$/m, "the daemon runs under the filter");
  t.match(readFileSync(`/proc/${pid}/mountinfo`, "utf8"), /\/proc .*hidepid=invisible,subset=pid/, "its /proc shows only processes");
  t.match(readFileSync(`/proc/${pid}/cmdline`, "utf8"), /main-entry\.js/, "it is the daemon itself (exec, no fork)");

  await addDomain(d, "vm", vm.qmpPath);
  const cp = join(vm.dir, "cp.xml");
  writeFileSync(cp, "<domaincheckpoint><name>c1</name></domaincheckpoint>");
  t.equal((await cli(d.socket, ["backup-begin", "vm", "", cp])).code, 0);
  const w = await cli(d.socket, ["--json", "wait", "vm", "--timeout", "30"]);
  const done = JSON.parse(w.stdout) as { state: string; error?: string; disks: { file: string }[] };
  t.equal(done.state, "ready", done.error ?? "");
  for (const f of done.disks.map((x) => x.file)) t.equal(statSync(f).uid, 65534, `${f}: chowned to QEMU's user`);
  t.ok(await rangeHolds(done.disks[0]!.file, "qcow2", 0x3c, 2 * MiB, MiB));

  // pull over TCP without a port: the daemon binds to find a free one
  await vm.write(1, 0x3e, 0, MiB);
  const px = join(vm.dir, "pull.xml");
  writeFileSync(px, "<domainbackup mode='pull'><incremental>c1</incremental><server name='localhost'/></domainbackup>");
  const begin = await cli(d.socket, ["backup-begin", "vm", px]);
  t.equal(begin.code, 0, begin.stderr);
  const xml = (await cli(d.socket, ["backup-dumpxml", "vm"])).stdout;
  const port = /port='(\d+)'/.exec(xml)?.[1];
  t.ok(port, `a free port (${port})`);
  t.ok(await rangeHolds(`nbd://localhost:${port}/vdb`, "raw", 0x3e, 0, MiB), "the export reads");
  t.equal((await cli(d.socket, ["domjobabort", "vm"])).code, 0);
  t.same(await leftovers(vm.monitor), []);
  t.equal(await d.stop("SIGTERM"), 0, "SIGTERM: clean exit");
  t.notMatch(d.log(), /EPERM|Operation not permitted|SIGSYS/, "nothing refused along the way");
});
