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
import { checkName, MAX_NAME_BYTES } from "../../src/conf/names.js";
import type { BackupJobInfo } from "../../src/jobs/model.js";
import { JobStore } from "../../src/jobs/record.js";

t.test("names of MAX_NAME_BYTES bytes: every derived file fits", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "qbackupd-names-"));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const domain = "d".repeat(MAX_NAME_BYTES);
  const cp = "c".repeat(MAX_NAME_BYTES);
  t.ok(parseDomainConfig({ name: domain, qmp: "/x" }, "domain").isOk(), "registration takes it");
  t.ok(checkName(cp, "checkpoint name").isOk());
  const store = await CheckpointStore.open(dir, domain, pino({ level: "silent" }));
  if (store.isErr()) throw new Error(store.error.message);
  const saved = await store.value.save({ name: cp, creationTime: 1, disks: [{ name: "vda", checkpoint: "bitmap", bitmap: cp }] });
  t.ok(saved.isOk(), saved.isErr() ? saved.error.message : "checkpoint metadata written");
  const cur = await store.value.setCurrent(cp);
  t.ok(cur.isOk(), cur.isErr() ? cur.error.message : "current pointer written");
  const jobs = new JobStore(join(dir, "jobs"));
  const done = await jobs.saveCompleted({ domain } as unknown as BackupJobInfo);
  t.ok(done.isOk(), done.isErr() ? done.error.message : "completed job record written");
  t.ok(readdirSync(join(dir, "checkpoint", domain)).includes(`${cp}.xml`));
});

t.test("one byte over the limit is refused at registration and in XML", async (t) => {
  const over = "d".repeat(MAX_NAME_BYTES + 1);
  const r = parseDomainConfig({ name: over, qmp: "/x" }, "domain");
  t.ok(r.isErr());
  t.match(r.isErr() ? r.error.message : "", `longer than ${MAX_NAME_BYTES} bytes`);
  t.ok(checkName(over, "checkpoint name").isErr());
});
