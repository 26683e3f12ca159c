/**
 * `npm run demo`: the whole product on real QEMU in a minute. Starts a
 * throwaway VM (two disks, no guest OS) and the qbackupd daemon, then drives
 * it with the qbackup CLI: full push with a checkpoint, guest writes, an
 * incremental push, a pull backup read with nbdinfo and nbdcopy, and checks
 * the restored chain byte for byte. Cleans everything up.
 */
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { cli, startDaemon } from "../test/helpers/daemon.js";
import { execFileP, imagesIdentical, startVm } from "../test/helpers/qemu.js";
import { Cleanup } from "./lib/teardown.js";

const MiB = 1 << 20;

function say(s: string): void {
  process.stdout.write(`\n\x1b[1m• ${s}\x1b[0m\n`);
}

async function demo(c: Cleanup): Promise<void> {
  say("starting a throwaway VM: qemu-system-x86_64 -S, disks vda and vdb (64 MiB qcow2 each), no guest OS");
  const vm = await startVm(c, { disks: [{ size: "64M" }, { size: "64M" }] });
  say("starting qbackupd (foreground daemon, API on a unix socket)");
  const d = await startDaemon(c);
  const q = async (...args: string[]) => {
    process.stdout.write(`$ qbackup ${args.join(" ")}\n`);
    const r = await cli(d.socket, args);
    process.stdout.write(r.stdout);
    if (r.code !== 0) throw new Error(`qbackup ${args[0]} exited ${r.code}: ${r.stderr.trim()}`);
    return r;
  };
  await q("domain-add", "demo", "--qmp", vm.qmpPath);
  for (let i = 0; i < 100; i++) {
    const r = await cli(d.socket, ["--json", "domain-list"]);
    if ((JSON.parse(r.stdout) as { state: string }[])[0]?.state === "connected") break;
    await new Promise((r2) => setTimeout(r2, 50));
  }
  await q("domain-list");

  say("the guest writes 8 MiB to vda and 4 MiB to vdb; full push backup that starts checkpoint 'monday'");
  await vm.write(0, 0x11, 0, 8 * MiB);
  await vm.write(1, 0x22, 16 * MiB, 4 * MiB);
  const cp = join(vm.dir, "cp.xml");
  writeFileSync(cp, "<domaincheckpoint><name>monday</name><description>weekly full</description></domaincheckpoint>");
  await q("backup-begin", "demo", "", cp);
  await q("wait", "demo");
  const full = (
    JSON.parse((await cli(d.socket, ["--json", "domjobinfo", "demo", "--completed"])).stdout) as { disks: { file: string }[] }
  ).disks.map((x) => x.file);
  await q("domjobinfo", "demo", "--completed");

  say("the guest writes 1 MiB more; incremental push since 'monday' that starts 'tuesday'");
  await vm.write(0, 0x33, 32 * MiB, MiB);
  await q("checkpoint-dumpxml", "demo", "monday", "--size");
  const bx = join(vm.dir, "inc.xml");
  writeFileSync(bx, "<domainbackup><incremental>monday</incremental></domainbackup>");
  writeFileSync(cp, "<domaincheckpoint><name>tuesday</name></domaincheckpoint>");
  await q("backup-begin", "demo", bx, cp);
  await q("wait", "demo");
  const inc = (
    JSON.parse((await cli(d.socket, ["--json", "domjobinfo", "demo", "--completed"])).stdout) as { disks: { file: string }[] }
  ).disks.map((x) => x.file);
  const size = (f: string) =>
    execFileP("qemu-img", ["info", "-U", "--output=json", f]).then(
      (r) => (JSON.parse(r.stdout) as { "actual-size": number })["actual-size"],
    );
  process.stdout.write(
    `full vda image: ${((await size(full[0]!)) / MiB).toFixed(1)} MiB on disk; incremental vda image: ${((await size(inc[0]!)) / MiB).toFixed(1)} MiB\n`,
  );
  await q("checkpoint-list", "demo", "--tree");

  say("pull backup since 'tuesday' over NBD; the guest keeps writing while a reader copies");
  await vm.write(1, 0x44, 0, 2 * MiB);
  const sock = join(d.stateDir, "backups", "nbd.sock");
  const px = join(vm.dir, "pull.xml");
  writeFileSync(
    px,
    `<domainbackup mode='pull'><incremental>tuesday</incremental><server transport='unix' socket='${sock}'/></domainbackup>`,
  );
  await q("backup-begin", "demo", px);
  await q("backup-dumpxml", "demo");
  await vm.write(1, 0x55, 0, 2 * MiB); // after the point in time: not in the export
  process.stdout.write(`$ nbdinfo --map=qemu:dirty-bitmap:backup-vdb nbd+unix:///vdb?socket=…\n`);
  process.stdout.write((await execFileP("nbdinfo", ["--map=qemu:dirty-bitmap:backup-vdb", `nbd+unix:///vdb?socket=${sock}`])).stdout);
  const copy = join(vm.dir, "vdb-pull.raw");
  process.stdout.write(`$ nbdcopy nbd+unix:///vdb?socket=… vdb-pull.raw\n`);
  await execFileP("nbdcopy", [`nbd+unix:///vdb?socket=${sock}`, copy]);
  const pattern = await execFileP("qemu-io", ["-f", "raw", "-c", "read -P 0x44 0 2M", copy]);
  process.stdout.write(
    pattern.stdout.includes("Pattern verification failed")
      ? "pull copy: WRONG data\n"
      : "pull copy holds the data as of the backup's begin (0x44), not the later 0x55 write\n",
  );
  await q("domjobabort", "demo");

  say("restore check: the full with the incremental rebased on it equals a fresh copy of vda at 'tuesday'");
  await execFileP("qemu-img", ["rebase", "-u", "-f", "qcow2", "-b", full[0]!, "-F", "qcow2", inc[0]!]);
  const copyNow = join(vm.dir, "vda-now.qcow2");
  // vda has not changed since 'tuesday'; once QEMU quits its image is consistent on disk
  (await vm.monitor.execute("quit")).match(
    () => undefined,
    () => undefined,
  );
  await vm.exited;
  await execFileP("qemu-img", ["convert", "-O", "qcow2", vm.disks[0]!.path, copyNow]);
  const cmp = await imagesIdentical(inc[0]!, copyNow);
  process.stdout.write(`qemu-img compare: ${cmp.output.trim()}\n`);
  if (!cmp.identical) throw new Error("restored chain differs");
  say("cleaning up");
}

const cleanup = new Cleanup();
try {
  await demo(cleanup);
  await cleanup.run();
  console.log("demo finished: full, incremental and pull backups worked, and the restore is byte-exact");
} catch (e) {
  await cleanup.run();
  console.error(`demo failed: ${(e as Error).message}`);
  process.exitCode = 1;
}
