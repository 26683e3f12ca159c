/**
 * Hand-driven QMP backups for tests that must check checkpoints before the
 * job manager exists to do it (and as an independent oracle afterwards):
 * each follows ../shared/notes/qemu-recipes.md step by step.
 */
import { join } from "node:path";
import type { QmpClient, TransactionAction } from "../../src/qmp/index.js";
import { createImage, execFileP, type QemuProcess } from "./qemu.js";

let seq = 0;

export interface HandBackup {
  /** Source node. */
  readonly node: string;
  readonly target: string;
  readonly sync: "full" | "incremental";
  /** For incremental: the checkpoint bitmap(s) to merge into a temp bitmap. */
  readonly since?: readonly string[];
}

/** Run several backups as one transaction (one point in time) and wait for all to finish. */
export async function handBackups(client: QmpClient, size: string, backups: readonly HandBackup[]): Promise<void> {
  const actions: TransactionAction[] = [];
  const cleanup: (() => Promise<unknown>)[] = [];
  const jobs: string[] = [];
  for (const b of backups) {
    const id = `hb${++seq}`;
    await createImage(b.target, size);
    (
      await client.execute("blockdev-add", { "node-name": id, driver: "qcow2", file: { driver: "file", filename: b.target } })
    )._unsafeUnwrap();
    cleanup.push(async () => await client.execute("blockdev-del", { "node-name": id }));
    let bitmap: string | undefined;
    if (b.sync === "incremental") {
      bitmap = `tmp-${id}`;
      (await client.execute("block-dirty-bitmap-add", { node: b.node, name: bitmap, disabled: true }))._unsafeUnwrap();
      cleanup.push(async () => await client.execute("block-dirty-bitmap-remove", { node: b.node, name: bitmap! }));
      actions.push({ type: "block-dirty-bitmap-merge", data: { node: b.node, target: bitmap, bitmaps: [...(b.since ?? [])] } });
    }
    actions.push({
      type: "blockdev-backup",
      data: { "job-id": id, device: b.node, target: id, sync: b.sync, ...(bitmap ? { bitmap } : {}), "auto-dismiss": false },
    });
    jobs.push(id);
  }
  const done = client.listen(["JOB_STATUS_CHANGE"], (e) => jobs.includes(e.data.id) && e.data.status === "concluded");
  (await client.execute("transaction", { actions }))._unsafeUnwrap();
  const seen = new Set<string>();
  while (seen.size < jobs.length) {
    const e = await done.next(30_000);
    if (e === undefined) throw new Error("hand backup did not conclude");
    seen.add(e.data.id);
  }
  done.close();
  for (const j of (await client.execute("query-jobs"))._unsafeUnwrap()) {
    if (jobs.includes(j.id)) {
      if (j.error) throw new Error(`hand backup ${j.id} failed: ${j.error}`);
      (await client.execute("job-dismiss", { id: j.id }))._unsafeUnwrap();
    }
  }
  for (const c of cleanup.reverse()) await c();
}

/** Every disk of `vm` at this moment, as standalone images <vm dir>/<name>-<disk>.qcow2 (one transaction): their paths. */
export async function snapshotDisks(vm: QemuProcess, name: string, size: string): Promise<string[]> {
  const files = vm.disks.map((x) => join(vm.dir, `${name}-${x.id}.qcow2`));
  await handBackups(
    vm.monitor,
    size,
    vm.disks.map((x, i) => ({ node: x.node, target: files[i]!, sync: "full" as const })),
  );
  return files;
}

/** Allocated (data) ranges of an image's top layer, as [offset, length] pairs. */
export async function allocatedRanges(image: string): Promise<[number, number][]> {
  const r = await execFileP("qemu-img", ["map", "-U", "--output=json", image]);
  const map = JSON.parse(r.stdout) as { start: number; length: number; data: boolean; depth: number }[];
  const out: [number, number][] = [];
  for (const m of map) {
    if (!m.data || m.depth !== 0) continue;
    const last = out.at(-1);
    if (last && last[0] + last[1] === m.start) last[1] += m.length;
    else out.push([m.start, m.length]);
  }
  return out;
}

/** Put an incremental on top of its full: qemu-img rebase -u. */
export async function rebaseOnto(inc: string, base: string): Promise<void> {
  await execFileP("qemu-img", ["rebase", "-u", "-f", "qcow2", "-b", base, "-F", "qcow2", inc]);
}
