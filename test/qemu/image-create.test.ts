/**
 * imageCreate when the blockdev-create job does not end as expected. The
 * file it created may be removed only once QEMU no longer writes it: the job
 * concluded (after a job-cancel if it had to give up) and dismissed. When
 * QEMU cannot confirm that, the file is left and the error says so.
 *
 * Real QEMU where it can produce the fault (a SIGSTOP past the QMP timeout);
 * a fake peer only for what QEMU cannot be made to do on cue: lose the
 * concluded event, refuse blockdev-create yet create the job, keep a create
 * job running past the wait.
 */
import { existsSync } from "node:fs";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import t from "tap";
import { imageCreate, imageRemove } from "../../src/jobs/images.js";
import { QmpClient } from "../../src/qmp/index.js";
import { leftovers, testDomain } from "../helpers/domain.js";
import { type FakeCommand, type FakePeer, reply, startFakeQmp } from "../helpers/fake-qmp.js";
import { type QemuProcess, silentLogger, type Teardown, tempDir } from "../helpers/qemu.js";

const MiB = 1024 * 1024;
const JOB = "qbk-c7";
/** Short waits, so a test never waits the production minute. */
const FAST = { formatMs: 1500, pollMs: 100, cancelMs: 1500 };

/** The client, but a stopped QEMU is let go on as `command` is first sent: the stall ends at a known step. */
function resumeOn(client: QmpClient, command: string, vm: QemuProcess): QmpClient {
  return new Proxy(client, {
    get(target, prop, receiver) {
      if (prop !== "execute") return Reflect.get(target, prop, receiver);
      return (name: string, ...rest: unknown[]) => {
        if (name === command) vm.proc.kill("SIGCONT");
        return (target.execute as (...a: unknown[]) => unknown).call(target, name, ...rest);
      };
    },
  });
}

/** Until QEMU has no job `id` that is still running (it may have run a command we gave up on). */
async function jobSettled(client: QmpClient, id: string): Promise<void> {
  for (let i = 0; i < 100; i++) {
    const jobs = await client.execute("query-jobs");
    if (jobs.isOk() && !jobs.value.some((j) => j.id === id && j.status !== "concluded")) return;
    await sleep(100);
  }
}

t.test(
  "QEMU stalled past the QMP timeout during blockdev-create, back for the cleanup: job ended and dismissed before the file goes",
  async (t) => {
    const d = await testDomain(t, "vm1", [{ size: "16M" }], undefined, { commandTimeoutMs: 1000 });
    // raw: the file driver's create opens with O_CREAT, so a removal before QEMU ran it would see the file come back
    const path = join(d.backupDir, "stalled.raw");
    d.vm.proc.kill("SIGSTOP");
    const r = await imageCreate(resumeOn(d.client, "query-jobs", d.vm), { path, format: "raw", size: 16 * MiB, jobId: JOB }, FAST);
    d.vm.proc.kill("SIGCONT"); // in case nothing asked QEMU again
    t.match(r._unsafeUnwrapErr(), { code: "image", message: /blockdev-create got no reply within 1000 ms/ });
    await jobSettled(d.client, JOB);
    t.notOk(existsSync(path), "no file: removed only after QEMU had formatted it (not re-created by QEMU after a removal)");
    t.same(await leftovers(d.client), [], "the create job dismissed");
  },
);

t.test("QEMU stalled through the whole create: the file is left, and the error says so and why", async (t) => {
  const d = await testDomain(t, "vm1", [{ size: "16M" }], undefined, { commandTimeoutMs: 1000 });
  const path = join(d.backupDir, "left.qcow2");
  d.vm.proc.kill("SIGSTOP");
  const r = await imageCreate(d.client, { path, format: "qcow2", size: 16 * MiB, jobId: JOB }, FAST);
  const stillThere = existsSync(path);
  d.vm.proc.kill("SIGCONT");
  t.match(r._unsafeUnwrapErr(), {
    code: "image",
    message: /blockdev-create got no reply within 1000 ms; the file was left, as QEMU may still write it: .*query-jobs got no reply/,
  });
  t.ok(stillThere, "the file QEMU was about to format is left");
  await jobSettled(d.client, JOB);
  (await d.client.execute("job-dismiss", { id: JOB }))._unsafeUnwrap();
  await imageRemove(path);
  t.notOk(existsSync(path), "imageRemove still removes it later (it is still known as ours)");
});

t.test("an ordinary create with the short waits: formatted, the job dismissed", async (t) => {
  const d = await testDomain(t, "vm1", [{ size: "16M" }]);
  const path = join(d.backupDir, "ok.qcow2");
  (await imageCreate(d.client, { path, format: "qcow2", size: 16 * MiB, jobId: JOB }, FAST))._unsafeUnwrap();
  t.ok(existsSync(path));
  t.same(await leftovers(d.client), []);
});

interface FakeJob {
  status: string;
  error?: string;
}

/** A fake QEMU keeping one create job as `job` says; `on` may answer a command itself (true) or leave it to the defaults. */
async function fakeQemu(
  t: Teardown,
  on: (cmd: FakeCommand, peer: FakePeer, job: { current: FakeJob | undefined }) => boolean,
): Promise<{ client: QmpClient; peer: FakePeer; job: { current: FakeJob | undefined } }> {
  const job: { current: FakeJob | undefined } = { current: undefined };
  const peer = await startFakeQmp(t, (cmd, p) => {
    if (on(cmd, p, job)) return;
    switch (cmd.execute) {
      case "query-jobs": {
        const j = job.current;
        const list = j === undefined ? [] : [{ id: JOB, type: "create", "current-progress": 1, "total-progress": 1, ...j }];
        p.write(reply(cmd.id, list));
        return;
      }
      case "job-dismiss":
        job.current = undefined;
        p.write(reply(cmd.id, {}));
        return;
      default:
        p.write(reply(cmd.id, {}));
    }
  });
  const client = (await QmpClient.connect({ path: peer.path }, { logger: silentLogger }))._unsafeUnwrap();
  t.teardown(() => client.close());
  return { client, peer, job };
}

/** Answers blockdev-create with a job that runs until told otherwise, then does `then`; other commands are left to the defaults. */
const startsRunning =
  (then?: (p: FakePeer) => void) =>
  (cmd: FakeCommand, p: FakePeer, job: { current: FakeJob | undefined }): boolean => {
    if (cmd.execute !== "blockdev-create") return false;
    job.current = { status: "running" };
    p.write(reply(cmd.id, {}));
    then?.(p);
    return true;
  };

const concludedEvent = `${JSON.stringify({ event: "JOB_STATUS_CHANGE", data: { id: JOB, status: "concluded" }, timestamp: { seconds: 1, microseconds: 0 } })}\r\n`;
const commands = (peer: FakePeer) => peer.received.map((c) => c.execute);

t.test("the concluded event never arrives: the job, concluded, is read from query-jobs", { timeout: 20_000 }, async (t) => {
  const { client, peer } = await fakeQemu(t, (cmd, p, job) => {
    if (cmd.execute !== "blockdev-create") return false;
    job.current = { status: "concluded" }; // and no event
    p.write(reply(cmd.id, {}));
    return true;
  });
  const path = join(tempDir(t), "lost-event.qcow2");
  (await imageCreate(client, { path, format: "qcow2", size: 16 * MiB, jobId: JOB }, FAST))._unsafeUnwrap();
  t.ok(existsSync(path), "the file kept");
  t.ok(commands(peer).includes("job-dismiss"), "the job dismissed");
});

t.test("blockdev-create refused, yet a job of that id exists: it is dismissed, then the file removed", { timeout: 20_000 }, async (t) => {
  const { client, peer } = await fakeQemu(t, (cmd, p, job) => {
    if (cmd.execute !== "blockdev-create") return false;
    job.current = { status: "concluded", error: "it went wrong" };
    p.write(`${JSON.stringify({ error: { class: "GenericError", desc: "refused after all" }, id: cmd.id })}\r\n`);
    return true;
  });
  const path = join(tempDir(t), "refused.qcow2");
  const r = await imageCreate(client, { path, format: "qcow2", size: 16 * MiB, jobId: JOB }, FAST);
  t.match(r._unsafeUnwrapErr(), { code: "image", message: /refused after all/ });
  t.ok(commands(peer).includes("job-dismiss"), "the job of that id dismissed");
  t.notOk(existsSync(path), "the file removed");
});

t.test(
  "the job still runs when the wait ends: cancelled, concluded and dismissed before the file is removed",
  { timeout: 20_000 },
  async (t) => {
    const seen: string[] = [];
    let path = "";
    const { client, peer } = await fakeQemu(t, (cmd, p, job) => {
      if (startsRunning()(cmd, p, job)) return true;
      if (cmd.execute === "job-cancel" || cmd.execute === "job-dismiss")
        seen.push(`${cmd.execute} (file ${existsSync(path) ? "there" : "gone"})`);
      if (cmd.execute !== "job-cancel") return false;
      p.write(reply(cmd.id, {}));
      // it takes a while to stop, as a real create does
      setTimeout(() => {
        job.current = { status: "concluded", error: "Operation cancelled" };
        p.write(concludedEvent);
      }, 300);
      return true;
    });
    path = join(tempDir(t), "slow.qcow2");
    const r = await imageCreate(client, { path, format: "qcow2", size: 16 * MiB, jobId: JOB }, FAST);
    t.match(r._unsafeUnwrapErr(), { code: "image", message: /QEMU did not finish formatting it within 1500 ms/ });
    t.same(seen, ["job-cancel (file there)", "job-dismiss (file there)"]);
    t.notOk(existsSync(path), "then the file removed");
    t.notOk(commands(peer).includes("blockdev-del"));
  },
);

t.test("a cancelled job that does not end: the file is left, and the error says so", { timeout: 20_000 }, async (t) => {
  const { client, peer } = await fakeQemu(t, startsRunning());
  const path = join(tempDir(t), "stuck.qcow2");
  const r = await imageCreate(client, { path, format: "qcow2", size: 16 * MiB, jobId: JOB }, FAST);
  t.match(r._unsafeUnwrapErr(), {
    code: "image",
    message:
      /did not finish formatting it within 1500 ms; the file was left, as QEMU may still write it: job qbk-c7 still ran 1500 ms after job-cancel/,
  });
  t.ok(existsSync(path), "the file left");
  t.notOk(commands(peer).includes("job-dismiss"), "a running job is not dismissed");
});

t.test(
  "the connection drops while QEMU formats: the file is left, and the error says the job could not be read",
  { timeout: 20_000 },
  async (t) => {
    // real QEMU does not hang up on cue; a dropped socket (or a daemon-side close) looks the same to us
    const { client } = await fakeQemu(
      t,
      startsRunning((p) => setTimeout(() => p.hangup(), 50)),
    );
    const path = join(tempDir(t), "dropped.qcow2");
    const r = await imageCreate(client, { path, format: "qcow2", size: 16 * MiB, jobId: JOB }, FAST);
    t.match(r._unsafeUnwrapErr(), {
      code: "image",
      message:
        /QEMU did not answer while formatting it: .*; the file was left, as QEMU may still write it: cannot read its job qbk-c7 from QEMU/,
    });
    t.ok(existsSync(path), "the file left to the QEMU that may still write it");
  },
);
