/**
 * The metrics exposition: valid for promtool, every per-domain series present
 * (zero) from registration, the per-domain series moved by job events, the
 * last success surviving a restart; and the example alert rules of
 * docs/prometheus, checked and unit-tested by promtool.
 */
import { execFile } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import t from "tap";
import { type DomainView, DURATION_BUCKETS, Metrics } from "../../src/daemon/metrics.js";
import type { BackupJobInfo, JobEvent } from "../../src/jobs/model.js";

const ROOT = join(import.meta.dirname, "..", "..");
const run = promisify(execFile);

const dom = (name: string, state = "connected", checkpoints = 0): DomainView => ({
  name,
  state,
  checkpoints: { store: { size: checkpoints } },
});
const reg = (...ds: DomainView[]) => ({ list: () => ds });

function ended(
  domain: string,
  mode: "push" | "pull",
  state: BackupJobInfo["state"],
  elapsedMs: number,
  bytesDone: number,
  endedAt: string,
  bytesTotal = bytesDone,
): JobEvent {
  const info = { domain, mode, state, elapsedMs, bytesDone, bytesTotal, endedAt } as Partial<BackupJobInfo> as BackupJobInfo;
  return { type: "ended", info };
}

/** `name{labels} value` lines → map (comments dropped). */
function samples(text: string): Map<string, number> {
  const m = new Map<string, number>();
  for (const line of text.split("\n")) {
    if (line === "" || line.startsWith("#")) continue;
    const i = line.lastIndexOf(" ");
    const v = line.slice(i + 1);
    m.set(line.slice(0, i), v === "+Inf" ? Number.POSITIVE_INFINITY : Number(v));
  }
  return m;
}

async function promtool(args: string[], input?: string): Promise<{ code: number; out: string }> {
  return new Promise((resolve) => {
    const p = execFile("promtool", args, { cwd: join(ROOT, "docs", "prometheus") }, (e, stdout, stderr) =>
      resolve({ code: e ? ((e as { code?: number }).code ?? 1) : 0, out: stdout + stderr }),
    );
    if (input !== undefined) p.stdin?.end(input);
  });
}

let havePromtool = true;
try {
  await run("promtool", ["--version"]);
} catch {
  havePromtool = false;
}
// scripts/ensure-env.mjs installs it (Debian's prometheus package); without it these checks cannot run
const needPromtool = havePromtool ? {} : { skip: "promtool missing: apt-get install --no-install-recommends prometheus" };

t.test("from the start: every per-domain series, zero-valued, and build info", async (t) => {
  const m = new Metrics({ version: "9.9.9" });
  const text = m.render(reg(dom("vm1"), dom('we"ird\\name', "disconnected", 2)), 0);
  const s = samples(text);
  t.equal(s.get(`qbackupd_build_info{version="9.9.9",nodejs="${process.version}"}`), 1);
  for (const d of ["vm1", 'we\\"ird\\\\name']) {
    for (const mode of ["push", "pull"]) {
      for (const outcome of ["completed", "failed", "cancelled"])
        t.equal(s.get(`qbackupd_backups_total{domain="${d}",mode="${mode}",outcome="${outcome}"}`), 0, `${d} ${mode} ${outcome}`);
      t.equal(s.get(`qbackupd_backup_bytes_total{domain="${d}",mode="${mode}"}`), 0);
      t.equal(s.get(`qbackupd_backup_duration_seconds_bucket{domain="${d}",mode="${mode}",le="+Inf"}`), 0);
      t.equal(s.get(`qbackupd_backup_duration_seconds_count{domain="${d}",mode="${mode}"}`), 0);
    }
    t.equal(s.get(`qbackupd_backup_last_success_timestamp_seconds{domain="${d}"}`), 0, "never: 0");
    for (const outcome of ["completed", "failed", "cancelled"])
      t.equal(s.get(`qbackupd_backup_last_outcome{domain="${d}",outcome="${outcome}"}`), 0);
  }
  t.equal(s.get('qbackupd_checkpoints{domain="we\\"ird\\\\name"}'), 2, "label values escaped");
  t.equal(s.get('qbackupd_qmp_connected{domain="we\\"ird\\\\name"}'), 0);
  for (const p of [
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_start_time_seconds",
    "process_open_fds",
    "process_max_fds",
  ])
    t.ok((s.get(p) ?? -1) > 0, p);
  t.ok(Math.abs(s.get("process_start_time_seconds")! - (Date.now() / 1000 - process.uptime())) < 2, "start time is this process's");
});

t.test("a pull counts what its exports offered (its total), not QEMU's copy-before-write progress", async (t) => {
  const m = new Metrics();
  const r = reg(dom("vm1"));
  m.onJobEvent(ended("vm1", "pull", "ready", 500, 7, "2026-01-02T00:00:00.000Z", 3 << 20));
  m.onJobEvent(ended("vm1", "pull", "cancelled", 500, 9, "2026-01-02T00:00:01.000Z", 5 << 20));
  t.equal(samples(m.render(r, 1)).get('qbackupd_backup_bytes_total{domain="vm1",mode="pull"}'), 3 << 20);
});

t.test("job events move the domain's series: counts, bytes, histogram, last outcome and success", async (t) => {
  const m = new Metrics();
  const r = reg(dom("vm1"), dom("vm2"));
  m.onJobEvent({ type: "ready", info: { domain: "vm1" } as BackupJobInfo });
  m.onJobEvent(ended("vm1", "push", "ready", 42_000, 1000, "2026-01-01T00:00:00.000Z"));
  m.onJobEvent(ended("vm1", "pull", "failed", 500, 7, "2026-01-02T00:00:00.000Z"));
  m.onJobEvent(ended("vm1", "push", "cancelled", 90_000_000, 0, "2026-01-03T00:00:00.000Z"));
  const s = samples(m.render(r, 1));
  t.equal(s.get('qbackupd_backups_total{domain="vm1",mode="push",outcome="completed"}'), 1);
  t.equal(s.get('qbackupd_backups_total{domain="vm1",mode="pull",outcome="failed"}'), 1);
  t.equal(s.get('qbackupd_backups_total{domain="vm1",mode="push",outcome="cancelled"}'), 1);
  t.equal(s.get('qbackupd_backups_total{domain="vm1",mode="push",outcome="failed"}'), 0);
  t.equal(s.get('qbackupd_backups_total{domain="vm2",mode="push",outcome="completed"}'), 0, "another domain unmoved");
  t.equal(s.get('qbackupd_backup_bytes_total{domain="vm1",mode="push"}'), 1000);
  t.equal(s.get('qbackupd_backup_bytes_total{domain="vm1",mode="pull"}'), 0, "a pull that failed offered nothing");
  // push: 42 s and 25 h; cumulative buckets
  const bucket = (le: string) => s.get(`qbackupd_backup_duration_seconds_bucket{domain="vm1",mode="push",le="${le}"}`);
  t.equal(bucket("30"), 0);
  t.equal(bucket("60"), 1);
  t.equal(bucket("86400"), 1, "25 h is above the last finite bucket");
  t.equal(bucket("+Inf"), 2);
  t.equal(s.get('qbackupd_backup_duration_seconds_sum{domain="vm1",mode="push"}'), 42 + 90_000);
  t.equal(s.get('qbackupd_backup_duration_seconds_count{domain="vm1",mode="push"}'), 2);
  let prev = -1;
  for (const le of DURATION_BUCKETS) {
    const v = s.get(`qbackupd_backup_duration_seconds_bucket{domain="vm1",mode="pull",le="${le}"}`)!;
    t.ok(v >= prev, `buckets never decrease (${le})`);
    prev = v;
  }
  t.equal(
    s.get('qbackupd_backup_last_success_timestamp_seconds{domain="vm1"}'),
    Date.parse("2026-01-01T00:00:00Z") / 1000,
    "a later failure keeps it",
  );
  t.equal(s.get('qbackupd_backup_last_end_timestamp_seconds{domain="vm1"}'), Date.parse("2026-01-03T00:00:00Z") / 1000);
  t.equal(s.get('qbackupd_backup_last_outcome{domain="vm1",outcome="cancelled"}'), 1);
  t.equal(s.get('qbackupd_backup_last_outcome{domain="vm1",outcome="failed"}'), 0);
  t.equal(s.get("qbackupd_backups_active"), 1);
});

t.test("the last outcome and success survive a restart (metrics.json in the state directory)", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "qbackupd-metrics-"));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const a = new Metrics({ stateDir: dir });
  a.onJobEvent(ended("vm1", "push", "ready", 1000, 1, "2026-01-01T00:00:00.000Z"));
  a.onJobEvent(ended("vm1", "push", "failed", 1000, 1, "2026-01-02T00:00:00.000Z"));
  await a.flushed();
  const s = samples(new Metrics({ stateDir: dir }).render(reg(dom("vm1")), 0));
  t.equal(s.get('qbackupd_backup_last_success_timestamp_seconds{domain="vm1"}'), Date.parse("2026-01-01T00:00:00Z") / 1000);
  t.equal(s.get('qbackupd_backup_last_outcome{domain="vm1",outcome="failed"}'), 1);
  t.equal(s.get('qbackupd_backups_total{domain="vm1",mode="push",outcome="failed"}'), 0, "counters start again (a counter reset)");
  // a temp file left by a write cut short is removed at start, nothing else
  writeFileSync(join(dir, ".tmp-metrics.json.0123abcd"), "{");
  writeFileSync(join(dir, ".tmp-other.json.0123abcd"), "{");
  new Metrics({ stateDir: dir });
  t.same(readdirSync(dir).sort(), [".tmp-other.json.0123abcd", "metrics.json"]);
  // an unreadable file costs the gauges, never the start
  writeFileSync(join(dir, "metrics.json"), "{nope");
  const c = samples(new Metrics({ stateDir: dir }).render(reg(dom("vm1")), 0));
  t.equal(c.get('qbackupd_backup_last_success_timestamp_seconds{domain="vm1"}'), 0);
  t.match(readFileSync(join(dir, "metrics.json"), "utf8"), "{nope", "and is left for the next backup to replace");
});

t.test("promtool accepts the exposition", needPromtool, async (t) => {
  const m = new Metrics({ version: "1.0.0" });
  m.onJobEvent(ended("vm1", "push", "ready", 1500, 10, "2026-01-01T00:00:00.000Z"));
  const text = m.render(reg(dom("vm1"), dom('we"ird\\na\nme')), 0);
  const r = await promtool(["check", "metrics"], text);
  t.equal(r.code, 0, r.out);
  t.equal(r.out.trim(), "", "no lint remarks");
  // the check can fail: the same text with the label value unescaped is refused
  const broken = text.replaceAll('we\\"ird\\\\na\\nme', 'we"ird\\na\nme');
  t.not(broken, text);
  const b = await promtool(["check", "metrics"], broken);
  t.not(b.code, 0, "promtool refuses unescaped label values");
  t.match(b.out, /pars/);
});

t.test("the example alert rules: valid, and their unit test passes", needPromtool, async (t) => {
  const c = await promtool(["check", "rules", "qbackupd-alerts.yml"]);
  t.equal(c.code, 0, c.out);
  const u = await promtool(["test", "rules", "qbackupd-alerts.test.yml"]);
  t.equal(u.code, 0, u.out);
  t.match(u.out, /SUCCESS/);
});
