/**
 * The one name limit (src/conf/names.ts) is one every file the daemon derives
 * from a name can hold: a domain and a checkpoint named with MAX_NAME_BYTES
 * bytes get their checkpoint metadata, current pointer and job records
 * written (atomic writes, so their temp names too) without ENAMETOOLONG.
 */
import { mkdtempSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pino } from "pino";
import t from "tap";
import { CheckpointStore } from "../../src/checkpoints/store.js";
import { parseDomainConfig } from "../../src/conf/config.js";
import { checkName, fileStem, MAX_NAME_BYTES } from "../../src/conf/names.js";
import type { BackupJobInfo } from "../../src/jobs/model.js";
import { JobStore } from "../../src/jobs/record.js";

t.test("the limit is Linux's file name limit", async (t) => {
  t.equal(MAX_NAME_BYTES, 255, "the issue's contract: 255 bytes");
});

t.test("names of MAX_NAME_BYTES bytes: every derived file fits, and reads back", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "qbackupd-names-"));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  // two names that share their first 250 bytes must not share a file
  const domain = "d".repeat(MAX_NAME_BYTES);
  const cps: [string, string, string] = ["c".repeat(MAX_NAME_BYTES), `${"c".repeat(MAX_NAME_BYTES - 1)}x`, "short"];
  t.ok(parseDomainConfig({ name: domain, qmp: "/x" }, "domain").isOk(), "registration takes it");
  const store = await CheckpointStore.open(dir, domain, pino({ level: "silent" }));
  if (store.isErr()) throw new Error(store.error.message);
  for (const [i, cp] of cps.entries()) {
    t.ok(checkName(cp, "checkpoint name").isOk());
    const saved = await store.value.save({ name: cp, creationTime: i + 1, disks: [{ name: "vda", checkpoint: "bitmap", bitmap: cp }] });
    t.ok(saved.isOk(), saved.isErr() ? saved.error.message : "checkpoint metadata written");
  }
  const cur = await store.value.setCurrent(cps[0]);
  t.ok(cur.isOk(), cur.isErr() ? cur.error.message : "current pointer written");
  const again = await CheckpointStore.open(dir, domain, pino({ level: "silent" }));
  if (again.isErr()) throw new Error(again.error.message);
  t.same(again.value.loadReport.skipped, [], "no file skipped on reload");
  t.same(
    again.value.list().map((c) => c.name),
    cps,
    "each checkpoint reads back under its whole name",
  );
  t.equal(again.value.current, cps[0]);
  const removed = await again.value.remove(cps[1]);
  t.ok(removed.isOk());
  t.same(
    again.value.list().map((c) => c.name),
    [cps[0], cps[2]],
    "removing one removes only its own file",
  );
  const jobs = new JobStore(join(dir, "jobs"));
  const done = await jobs.saveCompleted({ domain } as unknown as BackupJobInfo);
  t.ok(done.isOk(), done.isErr() ? done.error.message : "completed job record written");
  t.equal((await jobs.loadCompleted(domain))?.domain, domain, "and read back");
  const walk = (d: string): string[] =>
    readdirSync(d, { withFileTypes: true }).flatMap((e) => [e.name, ...(e.isDirectory() ? walk(join(d, e.name)) : [])]);
  const longest = Math.max(...walk(dir).map((n) => Buffer.byteLength(n)));
  // the longest derived name plus the 33 bytes an atomic write's temp name adds
  t.ok(longest + 33 <= 255, `longest file name ${longest} bytes leaves room for a temp name`);
});

t.test("fileStem: short names unchanged (existing state dirs keep their files), long ones distinct and bounded", async (t) => {
  t.equal(fileStem("vm1"), "vm1");
  t.equal(fileStem("a".repeat(191)), "a".repeat(191));
  const a = fileStem("a".repeat(255));
  const b = fileStem(`${"a".repeat(254)}b`);
  t.not(a, b);
  t.ok(Buffer.byteLength(a) <= 191);
  t.notOk(checkName(a, "x").isOk(), "a hashed stem is not a name, so it is never another name's stem");
});

t.test("one byte over the limit is refused at registration and in XML", async (t) => {
  const over = "d".repeat(MAX_NAME_BYTES + 1);
  const r = parseDomainConfig({ name: over, qmp: "/x" }, "domain");
  t.ok(r.isErr());
  t.match(r.isErr() ? r.error.message : "", `longer than ${MAX_NAME_BYTES} bytes`);
  t.ok(checkName(over, "checkpoint name").isErr());
});
