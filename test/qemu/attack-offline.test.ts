/**
 * Attacks on offline backups (issue 13): what the storage daemon opens, and
 * what a crash or a stuck process leaves. Through the CLI against real QEMU.
 */
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { allocatedRanges, rebaseOnto } from "../helpers/backup.js";
import { addDomain, cliOn, connected, fileWriter, startDaemon, until } from "../helpers/daemon.js";
import { reply, startFakeQmp } from "../helpers/fake-qmp.js";
import { imageFree, killedMidPush, runningTarget, shutDown, stoppedVm, storageDaemonPids, storageDaemons } from "../helpers/offline.js";
import { createImage, execFileP, imagesIdentical, startVm, tempDir } from "../helpers/qemu.js";

const KiB = 1024;
const MiB = 1024 * KiB;

t.test("an external snapshot seen while the VM ran: offline backups are refused, never of the stale base", async (t) => {
  const vm = await startVm(t, { disks: [{ size: "16M" }] });
  const d = await startDaemon(t);
  const { q, ok } = cliOn(t, d.socket);
  const file = fileWriter(vm.dir);
  await addDomain(d, "vm1", vm.qmpPath);
  await vm.write(0, 0x11, 0, MiB);
  await ok("backup-begin", "vm1", "", file("c1.xml", "<domaincheckpoint><name>c1</name></domaincheckpoint>"));
  await ok("wait", "vm1", "--timeout", "60");
  // another tool takes an external snapshot; the guest then writes into the overlay
  const ov = join(vm.dir, "ov1.qcow2");
  await createImage(ov, "16M");
  (
    await vm.monitor.execute("blockdev-add", { driver: "qcow2", "node-name": "ov1", file: { driver: "file", filename: ov }, backing: null })
  )._unsafeUnwrap();
  (await vm.monitor.executeRaw("blockdev-snapshot", { node: vm.disks[0]!.node, overlay: "ov1" }))._unsafeUnwrap();
  await vm.write(0, 0x12, 3 * MiB, 128 * KiB);
  // the daemon looks at the disks every few seconds: it sees the overlay before the VM stops. QEMU names it
  // json:{…} (its header names no backing file; QEMU was given the chain): opened alone it is other data
  const memory = () => JSON.parse(readFileSync(join(d.stateDir, "images", "vm1.json"), "utf8")) as { unopenable: string[] };
  await until("the overlay seen", async () => memory().unopenable.includes("vda"), 15_000);
  await shutDown(vm);
  await until("offline", async () => (await ok("domain-list")).stdout.includes("offline"));
  const inc = await q("backup-begin", "vm1", file("inc-c1.xml", "<domainbackup><incremental>c1</incremental></domainbackup>"));
  t.not(inc.code, 0, "the incremental is refused");
  t.match(inc.stderr, /cannot be backed up offline: QEMU last had disk\(s\) 'vda' opened in a way the image file alone does not give/);
  const fullOff = await q("backup-begin", "vm1");
  t.not(fullOff.code, 0, `a full too: ${fullOff.stderr.trim()}`);
  t.equal((await q("checkpoint-create-as", "vm1", "c9")).code === 0, false, "and a checkpoint");
  t.equal(storageDaemons(), 0, "no storage daemon left by the refusals");
  t.ok(await imageFree(ov), "the overlay is free");
});

t.test(
  "a daemon and its storage daemon both killed mid offline push: the job is failed, its target removed, the next backup runs",
  async (t) => {
    const { image, target, again } = await killedMidPush(t, "SIGKILL");
    await until("the job known failed", async () => {
      const r = await again.q("--json", "domjobinfo", "vm1", "--completed");
      return r.code === 0 && (JSON.parse(r.stdout) as { state: string }).state === "failed";
    });
    t.notOk(existsSync(target), "the partial target is removed");
    t.ok(await imageFree(image), "the image is free");
    await again.ok("backup-begin", "vm1");
    const w = await again.ok("--json", "wait", "vm1", "--timeout", "60");
    t.match(JSON.parse(w.stdout), { state: "ready" }, "the next offline backup completes");
    await until("storage daemon ended", async () => storageDaemons() === 0);
  },
);

t.test("a leftover storage daemon that does not answer (stopped) at start: it is ended, not orphaned with its image lock", async (t) => {
  const { image, sd } = await killedMidPush(t, "SIGSTOP");
  // the new daemon has given up on it (its connect timed out): it runs again, slow but alive
  await new Promise((r) => setTimeout(r, 8000));
  try {
    process.kill(sd, "SIGCONT");
  } catch {
    // already gone
  }
  await until("no storage daemon left", async () => storageDaemons() === 0 && (await imageFree(image)), 15_000);
});

t.test("offline after the VM was killed: the incremental is refused (bitmaps not written back), a full works", async (t) => {
  const vm = await startVm(t, { disks: [{ size: "16M" }] });
  const d = await startDaemon(t);
  const { q, ok } = cliOn(t, d.socket);
  const file = fileWriter(vm.dir);
  await addDomain(d, "vm1", vm.qmpPath);
  await ok("backup-begin", "vm1", "", file("c1.xml", "<domaincheckpoint><name>c1</name></domaincheckpoint>"));
  await ok("wait", "vm1", "--timeout", "60");
  await vm.write(0, 0x31, MiB, 64 * KiB);
  await vm.kill("SIGKILL");
  await until("offline", async () => (await ok("domain-list")).stdout.includes("offline"));
  const inc = await q("backup-begin", "vm1", file("inc-c1.xml", "<domainbackup><incremental>c1</incremental></domainbackup>"));
  t.not(inc.code, 0, `refused: ${inc.stderr.trim()}`);
  t.match(inc.stderr, /c1/);
  await ok("backup-begin", "vm1");
  t.match(JSON.parse((await ok("--json", "wait", "vm1", "--timeout", "60")).stdout), { state: "ready" });
  await until("storage daemon ended", async () => storageDaemons() === 0);
});

t.test("the storage daemon killed by someone mid offline push: the job fails, the next offline backup runs", async (t) => {
  const { image, q, ok } = await stoppedVm(t, 0x41);
  await ok("backup-begin", "vm1", "--bandwidth", "256K");
  const target = await runningTarget(ok);
  const [sd] = storageDaemonPids();
  process.kill(sd!, "SIGKILL");
  const w = await q("--json", "wait", "vm1", "--timeout", "30");
  t.match(w.stdout, /failed/, `the job failed: ${w.stdout}${w.stderr}`);
  t.notOk(existsSync(target), "its target removed");
  const started = Date.now();
  const next = await q("backup-begin", "vm1");
  t.equal(next.code, 0, `the next offline backup is taken at once: ${next.stderr.trim()}`);
  t.ok(Date.now() - started < 5000, "without waiting out a quit to a dead storage daemon");
  if (next.code === 0) await ok("wait", "vm1", "--timeout", "60");
  await until("storage daemon ended", async () => storageDaemons() === 0 && (await imageFree(image)));
});

t.test("the VM started during an offline backup fails on the lock; afterwards it starts and the chain goes on", async (t) => {
  const { vm, image, d, q, ok, lastFile, file } = await stoppedVm(t, 0x51);
  await ok("backup-begin", "vm1", "", file("c1.xml", "<domaincheckpoint><name>c1</name></domaincheckpoint>"), "--bandwidth", "128K");
  t.equal((await q("domain-remove", "vm1")).code, 4, "domain-remove is refused while the offline job runs");
  // QEMU opening the image as a VM would (paused: it would stay up if it could)
  const early = await execFileP(
    "qemu-system-x86_64",
    [
      "-nodefaults",
      "-S",
      "-display",
      "none",
      "-machine",
      "pc",
      "-blockdev",
      JSON.stringify({ "node-name": "d0", driver: "qcow2", file: { driver: "file", filename: image } }),
    ],
    { timeout: 5000 },
  ).then(
    () => "started",
    (e: Error & { stderr?: string }) => `${e.message} ${e.stderr ?? ""}`,
  );
  t.match(early, /Failed to get "write" lock/, "the VM refuses to start on the held image");
  t.match(JSON.parse((await ok("--json", "wait", "vm1", "--timeout", "60")).stdout), { state: "ready" });
  const full = await lastFile();
  await until("image free", () => imageFree(image));
  const vm2 = await startVm(t, { dir: vm.dir, images: [image] });
  await connected(d, "vm1");
  await vm2.write(0, 0x52, 4 * MiB, 64 * KiB);
  await ok("backup-begin", "vm1", file("inc-c1.xml", "<domainbackup><incremental>c1</incremental></domainbackup>"));
  await ok("wait", "vm1", "--timeout", "60");
  const inc = await lastFile();
  t.same(await allocatedRanges(inc), [[4 * MiB, 64 * KiB]], "since c1 (made offline): the write after the start");
  await shutDown(vm2);
  await rebaseOnto(inc, full);
  const cmp = await imagesIdentical(inc, image);
  t.ok(cmp.identical, `full + inc = the disk: ${cmp.output}`);
});

t.test("a leftover socket someone else answers on, not quitting, and a stale pid file: no unrelated process is killed", async (t) => {
  const vm = await startVm(t, { disks: [{ size: "16M" }] });
  const dir = tempDir(t, "qbackupd-daemon-");
  const d = await startDaemon(t, { dir });
  await addDomain(d, "vm1", vm.qmpPath);
  await d.stop("SIGKILL");
  // a peer answering every question with nothing, and ignoring quit (QEMU cannot be made to do that)
  const peer = await startFakeQmp(t, (cmd, p) => {
    const lists = ["query-jobs", "query-block-jobs", "query-block", "query-named-block-nodes", "query-block-exports", "query-qmp-schema"];
    if (cmd.execute === "query-version") p.write(reply(cmd.id, { qemu: { major: 7, minor: 2, micro: 0 }, package: "fake" }));
    else if (cmd.execute === "query-status") p.write(reply(cmd.id, { status: "running", running: true, singlestep: false }));
    else if (cmd.execute !== "quit") p.write(reply(cmd.id, lists.includes(cmd.execute) ? [] : {}));
  });
  const h = createHash("sha256").update("vm1").digest("hex").slice(0, 16);
  mkdirSync(join(d.stateDir, "offline"), { recursive: true });
  symlinkSync(peer.path, join(d.stateDir, "offline", `${h}.qmp`));
  // the pid file names a process that is not a storage daemon (a pid reused since)
  const bystander = spawn("sleep", ["120"], { stdio: "ignore" });
  t.teardown(() => bystander.kill("SIGKILL"));
  writeFileSync(join(d.stateDir, "offline", `${h}.pid`), `${bystander.pid}\n`);
  rmSync(join(dir, "api.sock"), { force: true });
  // (the quit goes unanswered: its command timeout, then the wait for the end, pass before it listens)
  const d2 = await startDaemon(t, { dir, readyMs: 60_000 });
  await until("the daemon gave up on the peer", async () => !existsSync(join(d.stateDir, "offline", `${h}.qmp`)), 30_000);
  t.equal(bystander.exitCode ?? bystander.signalCode, null, "the process the stale pid file names still runs");
  t.match(d2.log(), /storage daemon did not end after quit/, "the quit went unanswered");
  t.comment(peer.received.map((c) => c.execute).join(" "));
});
