/**
 * The total a running backup reports (domjobinfo's Data total, the CLI's
 * progress bar) is never a figure QEMU later takes back. A full push of an
 * image without a backing file is a `top` copy: QEMU first scans for
 * allocated clusters, shrinking its total-progress from the virtual size to
 * the allocated size; the bar used to start at the virtual size (1 GiB here)
 * and then drop to what is really copied (4 MiB).
 */
import t from "tap";
import { ApiClient } from "../../src/cli/client.js";
import { addDomain, startDaemon } from "../helpers/daemon.js";
import { rangeHolds, startVm } from "../helpers/qemu.js";

interface Info {
  id: string;
  state: string;
  active: boolean;
  bytesDone: number;
  bytesTotal: number;
  disks: { file: string }[];
}

t.test("a full push of a sparse image: the reported total is 0 (not known) or the final one, never the virtual size", async (t) => {
  const vm = await startVm(t, { disks: [{ size: "1G" }] });
  const mib = 1024 * 1024;
  await vm.write(0, 0x5a, 0, 4 * mib);
  const d = await startDaemon(t);
  await addDomain(d, "vm1", vm.qmpPath);
  const api = new ApiClient(d.socket);
  const get = async (path: string, method = "GET", body?: unknown): Promise<{ status: number; body: Info }> => {
    const r = await api.request(method, path, body);
    if (!("status" in r)) throw new Error(r.message);
    return r as { status: number; body: Info };
  };
  // 1 MiB/s: copying 4 MiB takes seconds, so the polls see the job run
  const begun = await get("/v1/domains/vm1/backup", "POST", { bandwidth: mib });
  t.equal(begun.status, 201);
  const totals = [begun.body.bytesTotal];
  for (;;) {
    const r = await get("/v1/domains/vm1/backup");
    if (r.status !== 200 || !r.body.active) break;
    totals.push(r.body.bytesTotal);
    if (r.body.state === "ready") break;
    await new Promise((res) => setTimeout(res, 100));
  }
  const done = await get("/v1/domains/vm1/backup/wait?timeout=60");
  t.equal(done.body.state, "ready");
  const final = done.body.bytesTotal;
  t.ok(final >= 4 * mib && final < 64 * mib, `the final total is the allocated data (${final} bytes)`);
  t.ok(totals.length >= 3, `the job was seen running (${totals.length} polls)`);
  t.same(
    totals.filter((x) => x !== 0 && x !== final),
    [],
    `every total reported while running was 0 or the final ${final} (seen: ${[...new Set(totals)].join(", ")})`,
  );
  const known = totals.findIndex((x) => x !== 0);
  t.ok(known === -1 || totals.slice(known).every((x) => x === final), "once known, the total stays");
  // the guest's data, and nothing else (the source's qcow2 metadata may still sit in QEMU's caches: read the target)
  const target = done.body.disks[0]!.file;
  t.ok(await rangeHolds(target, "qcow2", 0x5a, 0, 4 * mib), "the backup holds the written 4 MiB");
  t.ok(await rangeHolds(target, "qcow2", 0, 4 * mib, 1020 * mib), "and zeros after them");
});
