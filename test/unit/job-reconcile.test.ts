/**
 * Adoption's decision (src/jobs/reconcile.ts) from job records and QEMU
 * snapshots: flags re-derived from QEMU and the checkpoint store, never
 * trusted from a record a kill may have left stale (issue 11: B5, B6).
 */
import t from "tap";
import type { DiskPlan } from "../../src/jobs/plan.js";
import { type QemuSnapshot, reconcileRecord } from "../../src/jobs/reconcile.js";
import type { JobRecord } from "../../src/jobs/record.js";

const plan = (i: number, extra: Partial<DiskPlan> = {}): DiskPlan => ({
  disk: `vd${"ab"[i]}`,
  node: `fmt${i}`,
  jobId: `qbk-aaaaaa-1234abcd-j${i}`,
  createJobId: `qbk-aaaaaa-1234abcd-c${i}`,
  targetNode: `qbk-aaaaaa-1234abcd-t${i}`,
  file: `/b/vd${i}.qcow2`,
  format: "qcow2",
  createFile: true,
  sync: "full",
  virtualSize: 16 << 20,
  clusterSize: undefined,
  incremental: undefined,
  tempBitmap: undefined,
  export: undefined,
  ...extra,
});

function record(over: Partial<JobRecord> = {}): JobRecord {
  const plans = over.plans ?? [plan(0), plan(1)];
  return {
    version: 1,
    id: "1234abcd",
    domain: "vm",
    startedAt: 0,
    state: "inprogress",
    error: undefined,
    def: { mode: "push" },
    plans,
    planOpts: { mode: "push", reuse: false, backupPerf: false },
    checkpoint: undefined,
    nbd: undefined,
    flags: { txDone: true, tempBitmapsAdded: false, checkpointCommitted: false, nbdStarted: false, tlsAdded: false },
    disks: plans.map(() => ({
      state: "running",
      fileCreated: true,
      nodeAdded: true,
      jobStarted: true,
      jobDismissed: false,
      exportAdded: false,
      bytesDone: 0,
      bytesTotal: 0,
      error: undefined,
    })),
    ...over,
  };
}

const snap = (over: Partial<QemuSnapshot> = {}): QemuSnapshot => ({
  jobs: [],
  nodes: new Set(),
  exports: new Set(),
  bitmaps: new Set(),
  ...over,
});
const facts = { checkpointInStore: false, fileExists: [true, true], isOwn: (n: string) => n.startsWith("qbk-aaaaaa-") };

t.test("a running push whose QEMU jobs are all there is followed", async (t) => {
  const r = reconcileRecord(
    record(),
    snap({
      jobs: [
        { id: "qbk-aaaaaa-1234abcd-j0", status: "running" },
        { id: "qbk-aaaaaa-1234abcd-j1", status: "concluded" },
      ],
    }),
    facts,
  );
  t.same(r.decision, { kind: "follow" });
  t.same(
    r.disks.map((d) => [d.jobStarted, d.nodeAdded]),
    [
      [true, false],
      [true, false],
    ],
    "nodes from QEMU, not from the record",
  );
});

t.test("a running push whose QEMU job vanished fails with the reason", async (t) => {
  const r = reconcileRecord(record(), snap({ jobs: [{ id: "qbk-aaaaaa-1234abcd-j0", status: "running" }] }), facts);
  t.match(r.decision, { kind: "finish", outcome: "failed", reason: /vdb.*QEMU job is gone/ });
});

t.test("a record caught mid-begin fails; files there now count as ours (O_EXCL)", async (t) => {
  const r = reconcileRecord(record({ state: "begin", step: "nodes" }), snap(), { ...facts, fileExists: [true, false] });
  t.match(r.decision, { kind: "finish", outcome: "failed", reason: /stopped while the backup was starting/ });
  t.same(
    r.disks.map((d) => d.fileCreated),
    [true, false],
  );
});

t.test("an undo under way is finished with the outcome it had, never re-decided", async (t) => {
  const r = reconcileRecord(record({ outcome: "cancelled", error: "aborted by request" }), snap(), facts);
  t.same(r.decision, { kind: "finish", outcome: "cancelled", reason: "aborted by request" });
});

t.test("B6: a checkpoint in the store counts as committed although the record says not", async (t) => {
  const cp = { def: { name: "c1" }, actions: [] } as unknown as JobRecord["checkpoint"];
  const r = reconcileRecord(record({ state: "begin", step: "checkpoint", checkpoint: cp }), snap(), {
    ...facts,
    checkpointInStore: true,
  });
  t.equal(r.flags.checkpointCommitted, true);
  const r2 = reconcileRecord(record({ state: "begin", step: "checkpoint", checkpoint: cp }), snap(), facts);
  t.equal(r2.flags.checkpointCommitted, false, "and not when the store does not have it");
  // our transaction never ran (no job in QEMU, none recorded): a checkpoint of that name is someone else's
  const before = record({ state: "begin", step: "transaction", checkpoint: cp });
  const r3 = reconcileRecord({ ...before, flags: { ...before.flags, txDone: false } }, snap(), { ...facts, checkpointInStore: true });
  t.equal(r3.flags.checkpointCommitted, false, "nor when our transaction never ran (attack-checkpoint-race)");
});

t.test("B5: a pull caught at or after its exports step owns the NBD server unless another owner exports", async (t) => {
  const ex = { id: "qbk-aaaaaa-1234abcd-e0", name: "vda", bitmap: undefined };
  const pull = (step: JobRecord["step"]) =>
    record({
      state: "begin",
      step,
      def: { mode: "pull" },
      plans: [plan(0, { export: ex })],
      disks: [record().disks[0]!],
      nbd: { addr: { type: "unix", data: { path: "/b/nbd.sock" } }, uri: "nbd+unix:///?socket=/b/nbd.sock" },
    });
  t.equal(reconcileRecord(pull("exports"), snap(), facts).flags.nbdStarted, true, "exports step: the server may be ours");
  t.equal(reconcileRecord(pull("checkpoint"), snap(), facts).flags.nbdStarted, false, "before it: not ours");
  t.equal(
    reconcileRecord(pull("exports"), snap({ exports: new Set(["someone-else"]) }), facts).flags.nbdStarted,
    false,
    "another owner's export: the server is theirs",
  );
  t.equal(reconcileRecord(pull("exports"), snap({ exports: new Set([ex.id]) }), facts).disks[0]!.exportAdded, true);
});

t.test("temporary bitmaps are ours only when our transaction ran", async (t) => {
  const inc = [plan(0, { incremental: { checkpoint: "c0", bitmap: "c0" }, tempBitmap: "backup-vda", sync: "bitmap" })];
  const base = { plans: inc, disks: [record().disks[0]!] };
  const present = snap({ bitmaps: new Set(["fmt0/backup-vda"]) });
  const before = record({ ...base, state: "begin", step: "transaction", flags: { ...record().flags, txDone: false } });
  t.equal(reconcileRecord(before, present, facts).flags.tempBitmapsAdded, false, "a failed transaction may have met another's bitmap");
  const after = record({ ...base, flags: { ...record().flags, txDone: true } });
  t.equal(reconcileRecord(after, present, facts).flags.tempBitmapsAdded, true);
});
