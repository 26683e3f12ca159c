/**
 * QEMU running as another user than the daemon (here: nobody, via setpriv):
 * the files the daemon creates for it are given to QEMU's user, found from
 * the QMP socket's owner or configured; without that, a clear error.
 * Root only (CI runs as root).
 */
import { chmodSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { addDomain, cli, startDaemon } from "../helpers/daemon.js";
import { leftovers } from "../helpers/domain.js";
import { rangeHolds, startVm, type Teardown, tempDir } from "../helpers/qemu.js";

const MiB = 1024 * 1024;
const NOBODY = { uid: 65534, gid: 65534 };

async function setup(t: Teardown, domainArgs: string[] = []) {
  const vm = await startVm(t, { disks: [{ size: "16M" }, { size: "16M" }], runAs: NOBODY });
  await vm.write(0, 0x3c, 2 * MiB, MiB);
  await vm.write(1, 0x3d, 0, 2 * MiB);
  // backups outside the daemon's 0700 state directory, in a directory QEMU can traverse
  const backups = tempDir(t, "qbk-backups-");
  chmodSync(backups, 0o755);
  const dir = tempDir(t, "qbackupd-daemon-");
  writeFileSync(join(dir, "config.json"), JSON.stringify({ backupDir: backups, allowDirs: [backups, vm.dir] }));
  const d = await startDaemon(t, { dir });
  await addDomain(d, "vm", vm.qmpPath, domainArgs);
  return { vm, d, backups };
}

t.test("QEMU as nobody: push and pull work, files are nobody's and 0600 (user read off the QMP socket)", async (t) => {
  const { vm, d, backups } = await setup(t);
  const list = JSON.parse((await cli(d.socket, ["--json", "domain-list"])).stdout) as { qemuUser: string | null }[];
  t.equal(list[0]!.qemuUser, "65534:65534", "QEMU's user, from the socket it created");

  const cp = join(vm.dir, "cp.xml");
  writeFileSync(cp, "<domaincheckpoint><name>c1</name></domaincheckpoint>");
  t.equal((await cli(d.socket, ["backup-begin", "vm", "", cp])).code, 0);
  const w = await cli(d.socket, ["--json", "wait", "vm", "--timeout", "30"]);
  const done = JSON.parse(w.stdout) as { state: string; error?: string; disks: { file: string }[] };
  t.equal(done.state, "ready", done.error ?? "");
  for (const f of done.disks.map((x) => x.file)) {
    const st = statSync(f);
    t.same([st.uid, st.gid, st.mode & 0o777], [65534, 65534, 0o600], `${f}: nobody's, 0600`);
  }
  t.equal(statSync(join(backups, "vm")).uid, 65534, "the domain's backup directory is QEMU's");
  t.ok(await rangeHolds(done.disks[0]!.file, "qcow2", 0x3c, 2 * MiB, MiB));
  t.ok(await rangeHolds(done.disks[1]!.file, "qcow2", 0x3d, 0, 2 * MiB));

  // pull: scratch files are QEMU's too, and the export reads
  const sock = join(vm.dir, "nbd.sock");
  const px = join(vm.dir, "pull.xml");
  writeFileSync(px, `<domainbackup mode='pull'><incremental>c1</incremental><server transport='unix' socket='${sock}'/></domainbackup>`);
  await vm.write(0, 0x3e, 4 * MiB, 64 * 1024);
  t.equal((await cli(d.socket, ["backup-begin", "vm", px])).code, 0);
  const pull = JSON.parse((await cli(d.socket, ["--json", "domjobinfo", "vm"])).stdout) as { state: string; disks: { file: string }[] };
  t.equal(pull.state, "ready");
  t.equal(statSync(pull.disks[0]!.file).uid, 65534, "scratch file is QEMU's");
  t.ok(await rangeHolds(`nbd+unix:///vda?socket=${sock}`, "raw", 0x3e, 4 * MiB, 64 * 1024));
  t.equal((await cli(d.socket, ["domjobabort", "vm"])).code, 0);
  t.same(await leftovers(vm.monitor), []);
});

t.test("QEMU as nobody but told it runs as root: a clear error, nothing left", async (t) => {
  const { vm, d, backups } = await setup(t, ["--qemu-user", "0:0"]);
  const r = await cli(d.socket, ["backup-begin", "vm"]);
  t.not(r.code, 0);
  t.match(r.stderr, /Permission denied.*see qemuUser/);
  t.same(await leftovers(vm.monitor), []);
  const { readdirSync } = await import("node:fs");
  t.same(readdirSync(join(backups, "vm")), [], "no file left");
});
