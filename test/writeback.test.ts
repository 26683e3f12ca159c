/** The writeback pump and the final sync, on their own (injected datasync; real files). */
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t from "tap";
import { type DataSync, WritebackPump } from "../src/jobs/writeback.js";
import type { Teardown } from "./helpers/qemu.js";

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function files(t: Teardown, n: number): string[] {
  const dir = mkdtempSync(join(tmpdir(), "qbk-wb-"));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return Array.from({ length: n }, (_, i) => {
    const p = join(dir, `f${i}`);
    writeFileSync(p, "x".repeat(4096));
    return p;
  });
}

/** A datasync that records calls and how many ran at once, taking `ms` each. */
function recorder(ms: number, fail?: (path: string, n: number) => NodeJS.ErrnoException | undefined) {
  const calls: { path: string; phase: string; at: number }[] = [];
  let inFlight = 0;
  let maxInFlight = 0;
  const datasync: DataSync = async (_fh, path, phase) => {
    inFlight++;
    maxInFlight = Math.max(maxInFlight, inFlight);
    calls.push({ path, phase, at: Date.now() });
    try {
      await sleep(ms);
      const e = fail?.(path, calls.filter((c) => c.path === path).length);
      if (e !== undefined) throw e;
    } finally {
      inFlight--;
    }
  };
  return { datasync, calls, maxInFlight: () => maxInFlight };
}

const eio = (): NodeJS.ErrnoException => Object.assign(new Error("EIO: i/o error, fdatasync"), { code: "EIO" });

t.test("every added file is synced again and again, at most `concurrency` at once, never faster than the interval", async (t) => {
  const paths = files(t, 5);
  const r = recorder(5);
  const pump = new WritebackPump({ datasync: r.datasync, concurrency: 2, minIntervalMs: 40, quickMs: 0 });
  const stops = paths.map((p) => pump.add(p));
  await sleep(400);
  const errors = await Promise.all(stops.map((s) => s()));
  t.same(errors, [undefined, undefined, undefined, undefined, undefined]);
  t.ok(r.maxInFlight() <= 2, `at most 2 in flight (saw ${r.maxInFlight()})`);
  for (const p of paths) {
    const at = r.calls.filter((c) => c.path === p).map((c) => c.at);
    t.ok(at.length >= 3, `${p} synced ${at.length} times`);
    const gaps = at.slice(1).map((x, i) => x - at[i]!);
    t.ok(
      gaps.every((g) => g >= 39),
      `no two syncs of one file closer than the interval: ${gaps.join(",")}`,
    );
  }
  t.ok(
    r.calls.every((c) => c.phase === "background"),
    "background phase",
  );
  const n = r.calls.length;
  await sleep(150);
  t.equal(r.calls.length, n, "nothing is synced once every file is stopped");
});

t.test("a file with little to write is synced less and less often; one with much, at the shortest interval", async (t) => {
  const [idle, busy] = files(t, 2);
  // a sync that finds little dirty data returns at once; one with much takes a while
  const r = recorder(0);
  const slow: DataSync = async (fh, path, phase) => {
    await r.datasync(fh, path, phase);
    if (path === busy) await sleep(30);
  };
  const pump = new WritebackPump({ datasync: slow, minIntervalMs: 20, maxIntervalMs: 320, quickMs: 15 });
  const stops = [pump.add(idle!), pump.add(busy!)];
  await sleep(1000);
  await Promise.all(stops.map((s) => s()));
  const gaps = (p: string) => {
    const at = r.calls.filter((c) => c.path === p).map((c) => c.at);
    return at.slice(1).map((x, i) => x - at[i]!);
  };
  const gi = gaps(idle!);
  t.ok(gi.length >= 3 && gi.length <= 6, `idle file: ${gi.length + 1} syncs, gaps ${gi.join(",")}`);
  t.ok(
    gi.every((g, i) => i === 0 || g >= gi[i - 1]! - 5),
    "the gaps grow",
  );
  t.ok(
    gi.every((g) => g <= 320 + 60),
    "up to the longest interval",
  );
  const gb = gaps(busy!);
  t.ok(gb.length >= 8, `busy file: ${gb.length + 1} syncs`);
  t.ok(
    gb.every((g) => g < 160),
    `busy file: gaps stay short: ${gb.join(",")}`,
  );
});

t.test("stop waits for a sync in flight and reports the first error, which stops that file", async (t) => {
  const [a, b] = files(t, 2);
  const r = recorder(60, (path, n) => (path === a && n === 2 ? eio() : undefined));
  const pump = new WritebackPump({ datasync: r.datasync, minIntervalMs: 10 });
  const stopA = pump.add(a!);
  const stopB = pump.add(b!);
  await sleep(400);
  t.equal(r.calls.filter((c) => c.path === a).length, 2, "a file whose sync failed is not synced again");
  t.match(await stopA(), /EIO/);
  const before = r.calls.length;
  t.equal(await stopB(), undefined);
  t.equal(r.calls.length, before, "stopping does not start another sync");
});

t.test("stop waits for the sync in flight (the file is not closed under it)", async (t) => {
  const [a] = files(t, 1);
  const r = recorder(150);
  const pump = new WritebackPump({ datasync: r.datasync });
  const stop = pump.add(a!);
  await sleep(30);
  t.equal(r.calls.length, 1, "a sync is in flight");
  const t0 = Date.now();
  t.equal(await stop(), undefined);
  t.ok(Date.now() - t0 >= 100, `stop waited ${Date.now() - t0} ms for it`);
});

t.test("a file removed under the pump is no error (a failed job removed it)", async (t) => {
  const [a] = files(t, 1);
  const pump = new WritebackPump({ minIntervalMs: 10 });
  rmSync(a!);
  const stop = pump.add(a!);
  await sleep(50);
  t.equal(await stop(), undefined);
});

t.test("syncFiles: real files and their directory; a missing file or a failing sync names the file", async (t) => {
  const [a, b] = files(t, 2);
  const r = recorder(1, (path) => (path === b ? eio() : undefined));
  t.equal(await new WritebackPump().syncFiles([a!, b!]), undefined, "real fdatasync and directory fsync succeed");
  t.match(await new WritebackPump().syncFiles([a!, `${b}-gone`]), new RegExp(`cannot write ${b}-gone out to disk: ENOENT`));
  t.match(await new WritebackPump({ datasync: r.datasync }).syncFiles([a!, b!]), new RegExp(`cannot write ${b} out to disk: EIO`));
  t.same(
    r.calls.map((c) => c.phase),
    ["final", "final"],
  );
});
