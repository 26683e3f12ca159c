/**
 * The job lifecycle under attack (issue 11), on real QEMU through the job
 * manager: aborts racing begins at every delay (B1), QEMU stalled longer than
 * the QMP timeout during an abort (B7), an unreadable job record (B11), temp
 * files of interrupted record writes (B16). Every "cancelled" answer is
 * checked at the moment it is given: nothing of the job is left in QEMU or on
 * disk, and no checkpoint claims it.
 */
import { existsSync, mkdirSync, readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import t from "tap";
import { bitmapNames, jobManager, leftovers, type TestDomain, testDomain } from "../helpers/domain.js";
import { tempDir } from "../helpers/qemu.js";

type Tap = Pick<typeof t, "ok" | "notOk" | "same" | "equal">;
const MiB = 1024 * 1024;
const DISKS = [{ size: "16M" }, { size: "16M" }];
const cpXml = (name: string) => `<domaincheckpoint><name>${name}</name></domaincheckpoint>`;

function filesOf(dir: string): string[] {
  return existsSync(dir) ? readdirSync(dir).filter((f) => !f.endsWith(".sock")) : [];
}

/** What must hold whenever an end() answered: nothing of the job left, and no checkpoint without its backup. */
async function checkNothingLeft(
  t: Tap,
  d: TestDomain,
  cp: string,
  state: string,
  what: string,
  filesBefore: readonly string[],
  sock?: string,
): Promise<void> {
  t.same(await leftovers(d.client), [], `${what}: no node, job, export or temporary bitmap left`);
  if (state === "cancelled") {
    t.equal(d.checkpoints.store.get(cp), undefined, `${what}: no checkpoint claims the cancelled backup`);
    t.notOk((await bitmapNames(d.client)).includes(cp), `${what}: its bitmaps are gone`);
    t.same(filesOf(join(d.backupDir, "vm1")), filesBefore, `${what}: no target or scratch file left`);
  } else {
    t.ok(d.checkpoints.store.get(cp) !== undefined, `${what}: the checkpoint of the finished backup exists`);
  }
  if (sock !== undefined) {
    // the NBD server is gone: another can start on the same socket
    const started = await d.client.execute("nbd-server-start", { addr: { type: "unix", data: { path: sock } } });
    t.ok(started.isOk(), `${what}: no NBD server left`);
    if (started.isOk()) await d.client.execute("nbd-server-stop");
  }
}

for (const mode of ["push", "pull"] as const) {
  t.test(`${mode}: aborts racing begins at delays of 0-99 ms (B1)`, async (t) => {
    const d = await testDomain(t, "vm1", DISKS);
    await d.vm.write(0, 0x3c, 0, 4 * MiB);
    await d.vm.write(1, 0x3d, 4 * MiB, 4 * MiB);
    const jm = jobManager(d.backupDir);
    (await d.checkpoints.create(d.client, cpXml("base")))._unsafeUnwrap();
    const sock = join(d.backupDir, "nbd.sock");
    const rounds = 20;
    const seen = new Map<string, number>();
    for (let i = 0; i < rounds; i++) {
      const incremental = i % 2 === 1 ? "<incremental>base</incremental>" : "";
      const xml =
        mode === "pull"
          ? `<domainbackup mode='pull'>${incremental}<server transport='unix' socket='${sock}'/></domainbackup>`
          : `<domainbackup>${incremental}</domainbackup>`;
      const cp = `c${i}`;
      // changes since base on both disks, so incrementals have data to copy too
      await d.vm.write(i % 2, 0x40 + i, (i % 8) * MiB, 2 * MiB);
      const filesBefore = filesOf(join(d.backupDir, "vm1"));
      const begin = jm.begin(d.domain, xml, cpXml(cp), { bandwidth: MiB });
      await sleep((i * 37) % 100);
      const ab = await jm.end("vm1");
      // the abort came after the backup had ended (a push can finish within its first rate-limit slice)
      const state = ab.isOk() ? ab.value.state : ab.error.code === "no-job" ? "ready" : ab.error.code;
      seen.set(state, (seen.get(state) ?? 0) + 1);
      // a push abort cancels unless the push had completed; a pull that was serving ends as a finished pull
      t.ok(state === "cancelled" || state === "ready", `round ${i}: answered ${state}`);
      await checkNothingLeft(t, d, cp, state, `round ${i} (${state})`, filesBefore, mode === "pull" ? sock : undefined);
      const b = await begin;
      if (b.isErr()) t.equal(b.error.code, "aborted", `round ${i}: begin says it was aborted (${b.error.message})`);
      t.ok((await jm.info("vm1")).isErr(), `round ${i}: no job is left running`);
      if (state === "ready") (await d.checkpoints.delete(d.client, cp))._unsafeUnwrap();
    }
    t.comment(`answers: ${JSON.stringify(Object.fromEntries(seen))}`);
    // and the domain backs up normally afterwards (no duplicate node, no stale temporary bitmap)
    const ok = await jm.begin(d.domain, "<domainbackup><incremental>base</incremental></domainbackup>", cpXml("after"));
    t.ok(ok.isOk(), `a backup after the races begins (${ok.isErr() ? ok.error.message : ""})`);
    const done = (await jm.wait("vm1", 30_000))._unsafeUnwrap();
    t.equal(done.state, "ready");
    t.same(await leftovers(d.client), []);
  });
}

t.test("QEMU stalled longer than the QMP timeout during an abort: cancelled only once QEMU confirms (B7)", async (t) => {
  const d = await testDomain(t, "vm1", DISKS, undefined, { commandTimeoutMs: 1000 });
  await d.vm.write(0, 0x3c, 0, 8 * MiB);
  const jm = jobManager(d.backupDir);
  (await jm.begin(d.domain, undefined, cpXml("c1"), { bandwidth: 512 * 1024 }))._unsafeUnwrap();
  d.vm.proc.kill("SIGSTOP");
  let answered = false;
  const aborting = jm.end("vm1").map((info) => {
    answered = true;
    return info;
  });
  await sleep(4000);
  t.notOk(answered, "no answer while QEMU cannot confirm the abort");
  d.vm.proc.kill("SIGCONT");
  const info = (await aborting)._unsafeUnwrap();
  t.equal(info.state, "cancelled");
  await checkNothingLeft(t, d, "c1", "cancelled", "after the stall", []);
  await sleep(2000);
  t.same(await leftovers(d.client), [], "and nothing reappears: the QEMU job did not run on");
});

t.test("an unreadable job record keeps the domain busy and is set aside, never deleted (B11)", async (t) => {
  const d = await testDomain(t, "vm1", DISKS);
  await d.vm.write(0, 0x3c, 0, 4 * MiB);
  await d.vm.write(1, 0x3c, 0, 4 * MiB);
  const stateDir = tempDir(t);
  const jm1 = jobManager(d.backupDir, { stateDir });
  (await jm1.begin(d.domain, undefined, undefined, { bandwidth: 256 * 1024 }))._unsafeUnwrap();
  jm1.detachAll(); // the daemon stops; QEMU keeps the job
  await sleep(300); // a record write already under way lands first (a killed daemon's would not start)
  const rec = join(stateDir, "jobs", "vm1.json");
  writeFileSync(rec, "{ this is not json");
  const before = await leftovers(d.client);
  const jm2 = jobManager(d.backupDir, { stateDir });
  await jm2.recover(d.domain);
  const again = await jm2.begin(d.domain, undefined, undefined);
  t.ok(again.isErr() && again.error.code === "busy", "a new begin is refused as busy");
  t.match(again.isErr() ? again.error.message : "", /could not be read and was set aside/);
  const info = await jm2.info("vm1");
  t.ok(info.isErr() && info.error.code === "busy", "domjobinfo says busy, not 'no job'");
  t.same(await leftovers(d.client), before, "QEMU is left as it is");
  t.notOk(existsSync(rec), "the record is moved away");
  const aside = readdirSync(join(stateDir, "jobs", "unreadable"));
  t.equal(aside.length, 1, "and kept under jobs/unreadable/");
  // after a restart too
  const jm3 = jobManager(d.backupDir, { stateDir });
  await jm3.recover(d.domain);
  t.ok((await jm3.begin(d.domain, undefined, undefined)).isErr(), "still busy after another restart");
  // a person looks, cleans QEMU and removes the file: backups are allowed again
  for (const j of (await d.client.execute("query-jobs"))._unsafeUnwrap()) {
    await d.client.execute("job-cancel", { id: j.id });
  }
  await sleep(500);
  for (const j of (await d.client.execute("query-jobs"))._unsafeUnwrap()) await d.client.execute("job-dismiss", { id: j.id });
  for (const l of await leftovers(d.client)) if (l.startsWith("node ")) await d.client.execute("blockdev-del", { "node-name": l.slice(5) });
  const { rmSync } = await import("node:fs");
  rmSync(join(stateDir, "jobs", "unreadable", aside[0]!));
  const ok = await jm3.begin(d.domain, undefined, undefined);
  t.ok(ok.isOk(), `allowed again once the set-aside record is removed (${ok.isErr() ? ok.error.message : ""})`);
  t.equal((await jm3.wait("vm1", 30_000))._unsafeUnwrap().state, "ready");
});

t.test("temp files of interrupted record writes are removed at recovery, only the domain's own (B16)", async (t) => {
  const d = await testDomain(t, "vm1", DISKS);
  const stateDir = tempDir(t);
  const jobs = join(stateDir, "jobs");
  mkdirSync(jobs, { recursive: true });
  const mine = [".tmp-vm1.json.0123456789ab", ".tmp-vm1.completed.json.ba9876543210"];
  const others = [".tmp-vm10.json.0123456789ab", ".tmp-other.json.0123456789ab"];
  for (const f of [...mine, ...others]) writeFileSync(join(jobs, f), "{}");
  const jm = jobManager(d.backupDir, { stateDir });
  await jm.recover(d.domain);
  const left = readdirSync(jobs).filter((f) => f.startsWith(".tmp-"));
  t.same(left.sort(), others.sort(), "vm1's temp files are gone, other domains' stay");
});
