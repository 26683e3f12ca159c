/** The writeback pump and the final sync, on their own (injected datasync; real files). */
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t from "tap";
import { type Clock, type DataSync, WritebackPump } from "../../src/jobs/writeback.js";
import type { Teardown } from "../helpers/qemu.js";
import { VirtualClock } from "../helpers/virtual-clock.js";

function files(t: Teardown, n: number): string[] {
  const dir = mkdtempSync(join(tmpdir(), "qbk-wb-"));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return Array.from({ length: n }, (_, i) => {
    const p = join(dir, `f${i}`);
    writeFileSync(p, "x".repeat(4096));
    return p;
  });
}

/** A datasync that records calls and how many ran at once, taking `ms` of the clock's time each. */
function recorder(clock: Clock, ms: number, fail?: (path: string, n: number) => NodeJS.ErrnoException | undefined) {
  const calls: { path: string; phase: string; at: number }[] = [];
  let inFlight = 0;
  let maxInFlight = 0;
  const datasync: DataSync = async (_fh, path, phase) => {
    inFlight++;
    maxInFlight = Math.max(maxInFlight, inFlight);
    calls.push({ path, phase, at: clock.now() });
    try {
      await clock.sleep(ms);
      const e = fail?.(path, calls.filter((c) => c.path === path).length);
      if (e !== undefined) throw e;
    } finally {
      inFlight--;
    }
  };
  const gaps = (path: string) => {
    const at = calls.filter((c) => c.path === path).map((c) => c.at);
    return at.slice(1).map((x, i) => x - at[i]!);
  };
  return { datasync, calls, gaps, maxInFlight: () => maxInFlight };
}

const eio = (): NodeJS.ErrnoException => Object.assign(new Error("EIO: i/o error, fdatasync"), { code: "EIO" });

t.test("every added file is synced again and again, at most `concurrency` at once, never faster than the interval", async (t) => {
  const paths = files(t, 5);
  const clock = new VirtualClock();
  // syncs (30 ms) of 5 files every 40 ms would keep 3 busy: only 2 may run
  const r = recorder(clock, 30);
  const pump = new WritebackPump({ datasync: r.datasync, clock, concurrency: 2, minIntervalMs: 40, quickMs: 0 });
  const stops = paths.map((p) => pump.add(p));
  await clock.advance(400);
  t.same(await clock.until(Promise.all(stops.map((s) => s()))), [undefined, undefined, undefined, undefined, undefined]);
  t.equal(r.maxInFlight(), 2, "2 in flight at most, and at times");
  const busy = r.calls.length * 30;
  t.ok(busy >= 2 * 400 * 0.9, `the 2 workers were kept busy: ${busy} ms of syncs in 400 ms`);
  for (const p of paths) {
    const gaps = r.gaps(p);
    t.ok(gaps.length >= 3, `${p} synced ${gaps.length + 1} times`);
    // the interval runs from the end of a sync (30 ms) to the start of the next
    t.ok(
      gaps.every((g) => g >= 70),
      `no two syncs of one file closer than the interval: ${gaps.join(",")}`,
    );
  }
  t.ok(
    r.calls.every((c) => c.phase === "background"),
    "background phase",
  );
  const n = r.calls.length;
  await clock.advance(150);
  t.equal(r.calls.length, n, "nothing is synced once every file is stopped");
});

t.test("a file with little to write is synced less and less often; one with much, at the shortest interval", async (t) => {
  const [idle, busy] = files(t, 2);
  const clock = new VirtualClock();
  // a sync that finds little dirty data returns at once; one with much takes a while
  const r = recorder(clock, 0);
  const datasync: DataSync = async (fh, path, phase) => {
    await r.datasync(fh, path, phase);
    if (path === busy) await clock.sleep(30);
  };
  const pump = new WritebackPump({ datasync, clock, minIntervalMs: 20, maxIntervalMs: 320, quickMs: 15 });
  const stops = [pump.add(idle!), pump.add(busy!)];
  await clock.advance(1000);
  await clock.until(Promise.all(stops.map((s) => s())));
  t.same(r.gaps(idle!), [40, 80, 160, 320, 320], "idle file: the wait doubles up to the longest interval");
  const gb = r.gaps(busy!);
  t.ok(gb.length >= 15 && gb.every((g) => g === 50), `busy file: a sync (30 ms) and the shortest interval (20 ms) apart: ${gb.join(",")}`);
});

t.test("once syncs turn quick (the copy has finished), the back-off starts from the shortest interval", async (t) => {
  const [a] = files(t, 1);
  const clock = new VirtualClock();
  // slow while the copy runs (the first 4 syncs), quick once it has finished
  const r = recorder(clock, 0);
  const datasync: DataSync = async (fh, path, phase) => {
    await r.datasync(fh, path, phase);
    if (r.calls.length <= 4) await clock.sleep(30);
  };
  const pump = new WritebackPump({ datasync, clock, minIntervalMs: 20, maxIntervalMs: 320, quickMs: 15 });
  const stop = pump.add(a!);
  await clock.advance(500);
  await clock.until(stop());
  // 4 slow syncs 30 + 20 apart, the 5th 20 after the 4th ended; it is quick: 40, then 80, 160
  t.same(r.gaps(a!), [50, 50, 50, 50, 40, 80, 160]);
});

t.test("stop waits for a sync in flight and reports the first error, which stops that file", async (t) => {
  const [a, b] = files(t, 2);
  const clock = new VirtualClock();
  const r = recorder(clock, 60, (path, n) => (path === a && n === 2 ? eio() : undefined));
  const pump = new WritebackPump({ datasync: r.datasync, clock, minIntervalMs: 10 });
  const stopA = pump.add(a!);
  const stopB = pump.add(b!);
  await clock.advance(400);
  t.equal(r.calls.filter((c) => c.path === a).length, 2, "a file whose sync failed is not synced again");
  t.ok(r.calls.filter((c) => c.path === b).length >= 5, "the other file still is");
  t.match(await clock.until(stopA()), /EIO/);
  const before = r.calls.length;
  t.equal(await clock.until(stopB()), undefined);
  await clock.advance(100);
  t.equal(r.calls.length, before, "stopping does not start another sync");
});

t.test("stop waits for the sync in flight (the file is not closed under it)", async (t) => {
  const [a] = files(t, 1);
  const clock = new VirtualClock();
  const r = recorder(clock, 150);
  const pump = new WritebackPump({ datasync: r.datasync, clock });
  const stop = pump.add(a!);
  await clock.advance(30);
  t.equal(r.calls.length, 1, "a sync is in flight");
  let stopped = false;
  const stopping = stop().then((e) => {
    stopped = true;
    return e;
  });
  await clock.advance(110);
  t.notOk(stopped, "stop still waits 140 ms in");
  await clock.advance(10);
  t.ok(stopped, "and returns once the sync has (150 ms)");
  t.equal(await stopping, undefined);
});

t.test("a file removed under the pump is no error (a failed job removed it)", async (t) => {
  const [a] = files(t, 1);
  const clock = new VirtualClock();
  const r = recorder(clock, 1);
  const pump = new WritebackPump({ datasync: r.datasync, clock, minIntervalMs: 10 });
  rmSync(a!);
  const stop = pump.add(a!);
  await clock.advance(50);
  t.equal(await clock.until(stop()), undefined);
  t.equal(r.calls.length, 0, "never synced");
});

t.test("syncFiles: real files and their directory; a missing file or a failing sync names the file", async (t) => {
  const [a, b] = files(t, 2);
  const clock = new VirtualClock();
  const r = recorder(clock, 0, (path) => (path === b ? eio() : undefined));
  t.equal(await new WritebackPump().syncFiles([a!, b!]), undefined, "real fdatasync and directory fsync succeed");
  t.match(await new WritebackPump().syncFiles([a!, `${b}-gone`]), new RegExp(`cannot write ${b}-gone out to disk: ENOENT`));
  t.match(
    await clock.until(new WritebackPump({ datasync: r.datasync }).syncFiles([a!, b!])),
    new RegExp(`cannot write ${b} out to disk: EIO`),
  );
  t.same(
    r.calls.map((c) => c.phase),
    ["final", "final"],
  );
});
