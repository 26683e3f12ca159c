/**
 * Golden QMP for the begin plans (libvirt's qemublocktest habit): for push
 * and pull, full and incremental, the per-disk plans and the QMP they
 * produce (targetBlockdev, the one transaction, exportArgs) compared to
 * checked-in JSON under test/fixtures/golden/. A change in what qbackupd
 * sends to QEMU shows as a diff of these files, to be reviewed.
 * Regenerate after an intended change: QBACKUPD_GOLDEN_UPDATE=1 npx tap test/unit/plan-golden.test.ts
 */
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import type { BackupDiskDef } from "../../src/conf/backup.js";
import type { CheckpointDefFull } from "../../src/conf/checkpoint.js";
import { backupTransaction, type DiskPlan, exportArgs, ownNames, type PlanOptions, planDisk, targetBlockdev } from "../../src/jobs/plan.js";
import type { DiskInfo } from "../../src/qmp/disks.js";
import type { TransactionAction } from "../../src/qmp/qapi.js";

const GOLDEN = join(import.meta.dirname, "..", "fixtures", "golden");
const UPDATE = process.env.QBACKUPD_GOLDEN_UPDATE === "1";
const MiB = 1024 * 1024;

function source(name: string, over: Partial<DiskInfo> = {}): DiskInfo {
  return {
    name,
    nodeName: `drive-${name}`,
    qdev: `/machine/peripheral/${name}/virtio-backend`,
    file: `/var/lib/vm/${name}.qcow2`,
    format: "qcow2",
    virtualSize: 64 * MiB,
    clusterSize: 65536,
    readOnly: false,
    hasBacking: false,
    bitmaps: [],
    below: [],
    ...over,
  };
}

const SOURCES = new Map([
  ["vda", source("vda")],
  ["vdb", source("vdb", { hasBacking: true, format: "raw", clusterSize: undefined, virtualSize: 8 * MiB })],
]);

const CHECKPOINTS: ReadonlyMap<string, CheckpointDefFull> = new Map([
  [
    "cp1",
    {
      name: "cp1",
      creationTime: 1700000000,
      disks: [
        { name: "vda", checkpoint: "bitmap", bitmap: "cp1" },
        { name: "vdb", checkpoint: "no" },
      ],
    },
  ],
]);

/** What the checkpoint manager puts in the transaction when the backup creates checkpoint `name` on vda. */
function createCheckpoint(name: string): TransactionAction[] {
  return [{ type: "block-dirty-bitmap-add", data: { node: "drive-vda", name, persistent: true } }];
}

interface Case {
  readonly name: string;
  readonly disks: readonly BackupDiskDef[];
  readonly opts: PlanOptions;
  /** The target files that already exist. */
  readonly existing?: readonly string[];
  readonly checkpointActions: readonly TransactionAction[];
}

const store = (file: string) => ({ file, extra: [] });

const CASES: readonly Case[] = [
  {
    name: "push-full",
    disks: [
      { name: "vda", backup: true, backupmode: "full", driver: "qcow2", store: store("/backup/vda.qcow2") },
      { name: "vdb", backup: true, backupmode: "full", driver: "raw", store: store("/backup/vdb.raw") },
    ],
    opts: { mode: "push", reuse: false, backupPerf: true },
    checkpointActions: createCheckpoint("cp1"),
  },
  {
    name: "push-incremental",
    disks: [
      { name: "vda", backup: true, backupmode: "incremental", incremental: "cp1", driver: "qcow2", store: store("/backup/vda.inc.qcow2") },
    ],
    opts: { mode: "push", reuse: true, bandwidth: 4 * MiB, backupPerf: true },
    existing: ["/backup/vda.inc.qcow2"],
    checkpointActions: createCheckpoint("cp2"),
  },
  {
    name: "pull-full",
    disks: [
      { name: "vda", backup: true, backupmode: "full", store: store("/scratch/vda.qcow2") },
      { name: "vdb", backup: true, backupmode: "full", exportname: "data", store: store("/scratch/vdb.qcow2") },
    ],
    opts: { mode: "pull", reuse: false, backupPerf: true },
    checkpointActions: [],
  },
  {
    name: "pull-incremental",
    disks: [
      {
        name: "vda",
        backup: true,
        backupmode: "incremental",
        incremental: "cp1",
        exportname: "vda-inc",
        exportbitmap: "changed",
        store: store("/scratch/vda.qcow2"),
      },
    ],
    opts: { mode: "pull", reuse: false, bandwidth: MiB, backupPerf: false },
    checkpointActions: createCheckpoint("cp2"),
  },
];

function generate(c: Case): unknown {
  const plans: DiskPlan[] = c.disks.map((d, i) => {
    const p = planDisk(
      ownNames(i, "vm", "00000001"),
      d,
      SOURCES.get(d.name)!,
      CHECKPOINTS,
      c.opts,
      (c.existing ?? []).includes(d.store!.file!),
    );
    if (typeof p === "string") throw new Error(p);
    return p;
  });
  return {
    plans,
    targetBlockdev: plans.map((p) => targetBlockdev(p, c.opts.mode)),
    transaction: backupTransaction(plans, c.checkpointActions, c.opts),
    exportArgs: c.opts.mode === "pull" ? plans.map((p) => exportArgs(p)) : [],
  };
}

for (const c of CASES) {
  t.test(`golden: ${c.name}`, async (t) => {
    const file = join(GOLDEN, `plan-${c.name}.json`);
    // through JSON: what is compared is what would go on the wire (undefined members dropped)
    const got = JSON.parse(JSON.stringify(generate(c))) as unknown;
    if (UPDATE) writeFileSync(file, `${JSON.stringify(got, null, 2)}\n`);
    t.same(got, JSON.parse(readFileSync(file, "utf8")), `matches ${file} (QBACKUPD_GOLDEN_UPDATE=1 to regenerate)`);
  });
}

t.test("golden files name what each case is about", async (t) => {
  // hand-checked facts the goldens must keep, so a regenerated golden cannot silently drop them
  const load = (n: string) => JSON.parse(readFileSync(join(GOLDEN, `plan-${n}.json`), "utf8"));
  const pushFull = load("push-full");
  t.same(
    pushFull.transaction.filter((a: TransactionAction) => a.type === "blockdev-backup").map((a: { data: { sync: string } }) => a.data.sync),
    ["top", "full"],
    "push full: 'top' for a disk without backing into a new file, 'full' for one with backing",
  );
  t.equal(pushFull.transaction[0].type, "block-dirty-bitmap-add", "the checkpoint's bitmap is created in the same transaction, first");
  t.match(pushFull.transaction[1].data, { "x-perf": { "use-copy-range": true }, "auto-dismiss": false });
  const pushInc = load("push-incremental");
  t.same(
    pushInc.transaction.map((a: TransactionAction) => a.type),
    ["block-dirty-bitmap-add", "block-dirty-bitmap-add", "block-dirty-bitmap-merge", "blockdev-backup"],
  );
  t.match(pushInc.transaction[3].data, { sync: "incremental", bitmap: "backup-vda", speed: 4 * MiB });
  t.equal(pushInc.plans[0].createFile, false, "reused file");
  const pullFull = load("pull-full");
  t.same(
    pullFull.exportArgs.map((e: { name: string }) => e.name),
    ["vda", "data"],
  );
  t.notOk(
    pullFull.transaction.some((a: { data: Record<string, unknown> }) => "x-perf" in a.data),
    "no copy-range for a pull (the scratch is not the backup)",
  );
  t.match(pullFull.targetBlockdev[0], { driver: "qcow2", backing: "drive-vda", discard: "unmap" });
  const pullInc = load("pull-incremental");
  t.same(pullInc.exportArgs[0].bitmaps, ["changed"], "the export carries the exportbitmap");
  t.match(pullInc.transaction[3].data, { sync: "none", speed: MiB });
});

t.test("plans that cannot be made say why", async (t) => {
  const names = ownNames(0, "vm", "00000001");
  const vda = SOURCES.get("vda")!;
  const opts: PlanOptions = { mode: "push", reuse: false, backupPerf: false };
  t.equal(planDisk(names, { name: "vda", backup: true }, vda, CHECKPOINTS, opts, false), "disk 'vda': no target file");
  t.equal(
    planDisk(
      names,
      { name: "vda", backup: true, backupmode: "incremental", incremental: "nope", store: store("/b") },
      vda,
      CHECKPOINTS,
      opts,
      false,
    ),
    "checkpoint 'nope' does not exist",
  );
  t.equal(
    planDisk(
      names,
      { name: "vdb", backup: true, backupmode: "incremental", incremental: "cp1", store: store("/b") },
      SOURCES.get("vdb")!,
      CHECKPOINTS,
      opts,
      false,
    ),
    "checkpoint 'cp1' does not cover disk 'vdb': an incremental backup of it is impossible",
  );
});
