/** A domain wired for backups in tests: real VM, QMP client, checkpoint store, job manager. */
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { CheckpointManager } from "../../src/checkpoints/manager.js";
import { CheckpointStore } from "../../src/checkpoints/store.js";
import type { BackupDomain, BeginOptions } from "../../src/jobs/manager.js";
import { JobManager } from "../../src/jobs/manager.js";
import type { BackupJobInfo as JobInfo } from "../../src/jobs/model.js";
import type { WritebackPump } from "../../src/jobs/writeback.js";
import { probeCapabilities, QmpClient } from "../../src/qmp/index.js";
import {
  type DiskSpec,
  type QemuProcess,
  silentLogger,
  startStorageDaemon,
  startVm,
  type Teardown,
  tempDir,
  type VmOptions,
} from "./qemu.js";

export interface TestDomain {
  readonly vm: QemuProcess;
  readonly client: QmpClient;
  readonly domain: BackupDomain;
  readonly checkpoints: CheckpointManager;
  readonly backupDir: string;
}

/** `backupRoot`: where the backups directory goes (the state directory always goes to a temp dir). */
export async function testDomain(
  t: Teardown,
  name: string,
  disks: readonly DiskSpec[],
  backupRoot?: string,
  /** More for the VM: existing `images` to attach instead of creating `disks`, extra arguments; or a qemu-storage-daemon instead. */
  vmOpts: Omit<VmOptions, "disks"> & { storageDaemon?: boolean; commandTimeoutMs?: number } = {},
): Promise<TestDomain> {
  const { storageDaemon, commandTimeoutMs, ...rest } = vmOpts;
  const vm = await (storageDaemon ? startStorageDaemon : startVm)(t, rest.images ? rest : { ...rest, disks });
  const client = (
    await QmpClient.connect({ path: vm.qmpPath }, { logger: silentLogger, ...(commandTimeoutMs ? { commandTimeoutMs } : {}) })
  )._unsafeUnwrap();
  t.teardown(() => client.close());
  const caps = (await probeCapabilities(client))._unsafeUnwrap();
  const base = tempDir(t);
  const store = (await CheckpointStore.open(join(base, "state"), name, silentLogger))._unsafeUnwrap();
  const checkpoints = new CheckpointManager(store, { logger: silentLogger });
  const backupDir = join(backupRoot ?? base, "backups");
  mkdirSync(backupDir, { recursive: true });
  return { vm, client, checkpoints, backupDir, domain: { name, client: () => client, checkpoints, backupPerf: caps.backupPerf } };
}

export function jobManager(
  backupDir: string,
  extra: { allowedDirs?: string[]; tlsDir?: string; writeback?: WritebackPump; stateDir?: string } = {},
): JobManager {
  return new JobManager({
    logger: silentLogger,
    backupDir,
    allowedDirs: extra.allowedDirs ?? [backupDir],
    tlsDir: extra.tlsDir,
    writeback: extra.writeback,
    stateDir: extra.stateDir,
  });
}

/** Begin a backup on `d` and wait until it settles (ready, failed or cancelled): its info. */
export async function settledBackup(
  jm: JobManager,
  d: TestDomain,
  backupXml: string | undefined,
  checkpointXml: string | undefined,
  opts?: BeginOptions,
): Promise<JobInfo> {
  (await jm.begin(d.domain, backupXml, checkpointXml, opts))._unsafeUnwrap();
  return (await jm.wait(d.domain.name, 30_000))._unsafeUnwrap();
}

/** Everything qbackupd might leave in QEMU: our nodes, jobs, exports, temporary bitmaps. */
export async function leftovers(client: QmpClient): Promise<string[]> {
  const out: string[] = [];
  const nodes = (await client.execute("query-named-block-nodes", { flat: true }))._unsafeUnwrap();
  for (const n of nodes) if (n["node-name"]?.startsWith("qbk-")) out.push(`node ${n["node-name"]}`);
  for (const j of (await client.execute("query-jobs"))._unsafeUnwrap()) out.push(`job ${j.id} (${j.status})`);
  for (const e of (await client.execute("query-block-exports"))._unsafeUnwrap()) out.push(`export ${e.id}`);
  for (const n of nodes)
    for (const b of n["dirty-bitmaps"] ?? []) if (b.name?.startsWith("backup-")) out.push(`bitmap ${n["node-name"]}/${b.name}`);
  return [...new Set(out)];
}

/** Names of every dirty bitmap on the VM's disks, sorted. */
export async function bitmapNames(client: QmpClient): Promise<(string | undefined)[]> {
  return (await client.execute("query-block"))
    ._unsafeUnwrap()
    .flatMap((b) => (b.inserted?.["dirty-bitmaps"] ?? []).map((x) => x.name))
    .sort();
}

/** Poll query-jobs until job `id` has `status` ("gone": no longer listed). */
export async function waitJob(mon: QmpClient, id: string, status: string): Promise<void> {
  for (let i = 0; i < 400; i++) {
    const j = (await mon.execute("query-jobs"))._unsafeUnwrap().find((x) => x.id === id);
    if (status === "gone" ? j === undefined : j?.status === status) return;
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`job ${id} never reached ${status}`);
}
