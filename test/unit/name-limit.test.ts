/**
 * The one name limit (src/conf/names.ts) is one every file the daemon derives
 * from a name can hold: a domain and a checkpoint named with MAX_NAME_BYTES
 * bytes get their checkpoint metadata, current pointer and job records
 * written (atomic writes, so their temp names too) without ENAMETOOLONG.
 */
import { mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pino } from "pino";
import t from "tap";
import { CheckpointStore } from "../../src/checkpoints/store.js";
import { checkpointDefFormat } from "../../src/conf/checkpoint.js";
import { parseDomainConfig } from "../../src/conf/config.js";
import { checkName, fileStem, MAX_NAME_BYTES } from "../../src/conf/names.js";
import type { BackupJobInfo } from "../../src/jobs/model.js";
import { tempBitmapName } from "../../src/jobs/plan.js";
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
  t.equal(fileStem("a".repeat(200)), "a".repeat(200), "200 bytes, the limit before 255: unchanged");
  t.not(fileStem("a".repeat(201)), "a".repeat(201));
  const a = fileStem("a".repeat(255));
  const b = fileStem(`${"a".repeat(254)}b`);
  t.not(a, b);
  t.ok(Buffer.byteLength(a) <= 191);
  t.notOk(checkName(a, "x").isOk(), "a hashed stem is not a name, so it is never another name's stem");
});

t.test("state written under the 200-byte limit (before 255) reads as before: the same files, nothing skipped", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "qbackupd-names-"));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const log = pino({ level: "silent" });
  for (const bytes of [3, 191, 192, 200]) {
    const domain = `${bytes}`.padEnd(bytes, "d");
    const cps: [string, string] = [`${bytes}`.padEnd(bytes, "a"), `${bytes}`.padEnd(bytes, "b")];
    // the files as versions with the 200-byte limit named them: the names themselves
    const cpDir = join(dir, "checkpoint", domain);
    mkdirSync(cpDir, { recursive: true });
    for (const [i, name] of cps.entries()) {
      const def = {
        name,
        creationTime: i + 1,
        ...(i > 0 ? { parent: cps[0] } : {}),
        disks: [{ name: "vda", checkpoint: "bitmap" as const, bitmap: name }],
      };
      writeFileSync(join(cpDir, `${name}.xml`), checkpointDefFormat(def));
    }
    writeFileSync(join(cpDir, ".current"), `${cps[1]}\n`);
    mkdirSync(join(dir, "jobs"), { recursive: true });
    const record = {
      version: 1,
      id: "0123abcd",
      domain,
      startedAt: 1,
      state: "ready",
      def: {},
      plans: [],
      planOpts: {},
      flags: {},
      disks: [],
    };
    writeFileSync(join(dir, "jobs", `${domain}.json`), JSON.stringify(record));
    writeFileSync(join(dir, "jobs", `${domain}.completed.json`), JSON.stringify({ domain, id: "fedc3210" }));

    const store = await CheckpointStore.open(dir, domain, log);
    if (store.isErr()) throw new Error(store.error.message);
    t.same(store.value.loadReport.skipped, [], `${bytes} bytes: no checkpoint file skipped`);
    t.same(
      store.value.list().map((c) => c.name),
      cps,
      `${bytes} bytes: the checkpoints read back`,
    );
    t.equal(store.value.current, cps[1], `${bytes} bytes: the current checkpoint too`);
    const jobs = new JobStore(join(dir, "jobs"));
    const rec = await jobs.load(domain);
    t.equal(
      rec.isOk() ? rec.value?.id : undefined,
      "0123abcd",
      `${bytes} bytes: the active job record is found (a restart adopts its job)`,
    );
    t.equal((await jobs.loadCompleted(domain))?.id, "fedc3210", `${bytes} bytes: the completed one too`);
    // a write goes to the same file, not to a second one beside it
    const saved = await store.value.save({ ...store.value.get(cps[1])!, creationTime: 9 });
    t.ok(saved.isOk());
    t.same(
      readdirSync(cpDir).filter((f) => f.endsWith(".xml")),
      cps.map((c) => `${c}.xml`),
      `${bytes} bytes: no new file names`,
    );
  }
});

t.test("the temporary (pull: exported) bitmap named after a disk is a name within the limit", async (t) => {
  t.equal(tempBitmapName("vda"), "backup-vda", "libvirt's name");
  const at = "d".repeat(MAX_NAME_BYTES - "backup-".length);
  t.equal(tempBitmapName(at), `backup-${at}`, "unchanged while it fits");
  const long = [`${at}x`, "d".repeat(MAX_NAME_BYTES), `${"d".repeat(MAX_NAME_BYTES - 1)}e`];
  const names = long.map(tempBitmapName);
  for (const n of names) {
    // backup-dumpxml shows it as exportbitmap; that XML fed back must be taken
    t.ok(checkName(n, "exportbitmap").isOk(), `${Buffer.byteLength(n)} bytes, a name`);
    t.ok(n.startsWith("backup-"));
  }
  t.equal(new Set(names).size, names.length, "distinct disks, distinct bitmaps");
});

t.test("one byte over the limit is refused at registration and in XML", async (t) => {
  const over = "d".repeat(MAX_NAME_BYTES + 1);
  const r = parseDomainConfig({ name: over, qmp: "/x" }, "domain");
  t.ok(r.isErr());
  t.match(r.isErr() ? r.error.message : "", `longer than ${MAX_NAME_BYTES} bytes`);
  t.ok(checkName(over, "checkpoint name").isErr());
});
