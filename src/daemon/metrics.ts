/**
 * Prometheus metrics, rendered in the text exposition format (0.0.4):
 * per-domain backup counts, bytes, duration histograms and the last outcome
 * and last success (kept in `<stateDir>/metrics.json` so a restart does not
 * make every domain look unbacked), build info and the standard process_*
 * series. Every series a domain can have is present, zero-valued, from its
 * registration on, so `rate()` and `increase()` see the first failure.
 *
 * Hand-written rather than prom-client: a few dozen series, and the process
 * metrics are read from /proc the way prom-client's default collectors do.
 * This module only observes: it must never change a job or a domain, and a
 * failure to persist its file is logged, never raised.
 */
import { readdirSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import type { BackupJobInfo, JobEvent } from "../jobs/model.js";
import type { Logger } from "../log.js";
import { TEMP_PREFIX, writeFileAtomic } from "../util/atomic-file.js";

export const MODES = ["push", "pull"] as const;
export type Mode = (typeof MODES)[number];
/** A backup's outcome as the metrics name it: a ready job "completed". */
export const OUTCOMES = ["completed", "failed", "cancelled"] as const;
export type Outcome = (typeof OUTCOMES)[number];
/** Upper bounds (seconds) of the duration histogram's buckets: a second to a day. */
export const DURATION_BUCKETS = [1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400] as const;

/** What render needs of a domain (the registry's Domain has it). */
export interface DomainView {
  readonly name: string;
  readonly state: string;
  readonly checkpoints: { readonly store: { readonly size: number } };
}

interface Histogram {
  readonly buckets: number[];
  sum: number;
  count: number;
}

/** Per domain, what survives a restart. Timestamps in seconds since the epoch. */
interface Last {
  successAt: number | undefined;
  endAt: number | undefined;
  outcome: Outcome | undefined;
}

interface Persisted {
  readonly version: 1;
  readonly domains: Record<string, Last>;
}

const esc = (s: string) => s.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n");
/** Label set `{a="x",b="y"}` (values escaped). */
const labels = (o: Record<string, string>) =>
  `{${Object.entries(o)
    .map(([k, v]) => `${k}="${esc(v)}"`)
    .join(",")}}`;
/** Go's and prom-client's float format: +Inf, integers without a point. */
const num = (v: number) => (v === Number.POSITIVE_INFINITY ? "+Inf" : String(v));

function outcomeOf(state: string): Outcome {
  if (state === "ready") return "completed";
  if (state === "cancelled") return "cancelled";
  return "failed";
}

/**
 * What a finished backup adds to the bytes counter. Push: what QEMU wrote to
 * the targets. Pull: QEMU counts nothing an NBD client reads, and its job's
 * progress is only the copy-before-write traffic; the size of what the
 * exports offered (the job's total) is the pull's size, counted once it was
 * served to the end (ready).
 */
function backupBytes(info: Pick<BackupJobInfo, "mode" | "state" | "bytesDone" | "bytesTotal">): number {
  if (info.mode === "push") return info.bytesDone;
  return info.state === "ready" ? info.bytesTotal : 0;
}

export interface MetricsOptions {
  /** Where metrics.json lives; unset: nothing persisted (unit tests). */
  readonly stateDir?: string | undefined;
  readonly logger?: Logger | undefined;
  readonly version?: string | undefined;
}

export class Metrics {
  private readonly counts = new Map<string, number>();
  private readonly bytes = new Map<string, number>();
  private readonly durations = new Map<string, Histogram>();
  private readonly last = new Map<string, Last>();
  private requests = 0;
  private persisting: Promise<void> = Promise.resolve();
  private readonly file: string | undefined;

  constructor(private readonly opts: MetricsOptions = {}) {
    this.file = opts.stateDir === undefined ? undefined : join(opts.stateDir, "metrics.json");
    this.load();
  }

  private load(): void {
    if (this.file === undefined || this.opts.stateDir === undefined) return;
    // a write cut short by a crash leaves its temp file; ours alone (the daemon holds the directory's lock)
    try {
      const temp = `${TEMP_PREFIX}metrics.json.`;
      for (const f of readdirSync(this.opts.stateDir))
        if (f.startsWith(temp) && /^[0-9a-f]+$/.test(f.slice(temp.length))) rmSync(join(this.opts.stateDir, f), { force: true });
    } catch {
      // unreadable directory: the read below reports it
    }
    let text: string;
    try {
      text = readFileSync(this.file, "utf8");
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "ENOENT")
        this.opts.logger?.warn({ error: (e as Error).message }, "metrics: cannot read metrics.json");
      return;
    }
    try {
      const p = JSON.parse(text) as Persisted;
      for (const [name, l] of Object.entries(p.domains ?? {})) {
        const ts = (v: unknown) => (typeof v === "number" && Number.isFinite(v) && v >= 0 ? v : undefined);
        const outcome = OUTCOMES.find((o) => o === l.outcome);
        this.last.set(name, { successAt: ts(l.successAt), endAt: ts(l.endAt), outcome });
      }
    } catch (e) {
      // only the last-success gauges are lost; the next backup writes the file anew
      this.opts.logger?.warn({ error: (e as Error).message }, "metrics: metrics.json unreadable; starting from nothing");
    }
  }

  private persist(): void {
    const file = this.file;
    if (file === undefined) return;
    const data: Persisted = { version: 1, domains: Object.fromEntries(this.last) };
    const text = `${JSON.stringify(data)}\n`;
    // in order: an older snapshot must never overwrite a newer one
    this.persisting = this.persisting.then(async () => {
      const r = await writeFileAtomic(file, text);
      if (r.isErr()) this.opts.logger?.warn({ error: r.error.message }, "metrics: cannot write metrics.json");
    });
  }

  /** Resolves once every persisted snapshot asked for so far is written (tests, stop). */
  flushed(): Promise<void> {
    return this.persisting;
  }

  onJobEvent(e: JobEvent): void {
    if (e.type !== "ended") return;
    const { domain, mode } = e.info;
    const outcome = outcomeOf(e.info.state);
    const k = `${domain}\0${mode}`;
    const ck = `${k}\0${outcome}`;
    this.counts.set(ck, (this.counts.get(ck) ?? 0) + 1);
    this.bytes.set(k, (this.bytes.get(k) ?? 0) + backupBytes(e.info));
    const h = this.histogram(k);
    const secs = e.info.elapsedMs / 1000;
    for (const [i, le] of DURATION_BUCKETS.entries()) if (secs <= le) h.buckets[i]!++;
    h.sum += secs;
    h.count++;
    const endedMs = e.info.endedAt !== undefined ? Date.parse(e.info.endedAt) : Date.now();
    const at = (Number.isFinite(endedMs) ? endedMs : Date.now()) / 1000;
    const prev = this.last.get(domain);
    this.last.set(domain, {
      successAt: outcome === "completed" ? at : prev?.successAt,
      endAt: at,
      outcome,
    });
    this.persist();
  }

  onRequest(): void {
    this.requests++;
  }

  private histogram(k: string): Histogram {
    let h = this.durations.get(k);
    if (h === undefined) {
      h = { buckets: DURATION_BUCKETS.map(() => 0), sum: 0, count: 0 };
      this.durations.set(k, h);
    }
    return h;
  }

  render(domains: { list(): readonly DomainView[] }, activeJobs: number): string {
    const ds = domains.list();
    const l: string[] = [];
    const head = (name: string, type: string, help: string) => l.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);

    head("qbackupd_build_info", "gauge", "Always 1; the labels say which qbackupd and Node.js run.");
    l.push(`qbackupd_build_info${labels({ version: this.opts.version ?? "unknown", nodejs: process.version })} 1`);

    head("qbackupd_backups_total", "counter", "Backups finished, by domain, mode and outcome (completed, failed, cancelled).");
    for (const d of ds)
      for (const mode of MODES)
        for (const outcome of OUTCOMES)
          l.push(
            `qbackupd_backups_total${labels({ domain: d.name, mode, outcome })} ${this.counts.get(`${d.name}\0${mode}\0${outcome}`) ?? 0}`,
          );

    head(
      "qbackupd_backup_bytes_total",
      "counter",
      "Bytes of finished backups (push: written to the targets; pull, once served: offered by its exports, the changed bytes of an incremental or the disks' size of a full).",
    );
    for (const d of ds)
      for (const mode of MODES)
        l.push(`qbackupd_backup_bytes_total${labels({ domain: d.name, mode })} ${this.bytes.get(`${d.name}\0${mode}`) ?? 0}`);

    head("qbackupd_backup_duration_seconds", "histogram", "Duration of finished backups, begin to end (pull: until the client ends it).");
    for (const d of ds)
      for (const mode of MODES) {
        const h = this.durations.get(`${d.name}\0${mode}`) ?? { buckets: DURATION_BUCKETS.map(() => 0), sum: 0, count: 0 };
        for (const [i, le] of DURATION_BUCKETS.entries())
          l.push(`qbackupd_backup_duration_seconds_bucket${labels({ domain: d.name, mode, le: num(le) })} ${h.buckets[i]}`);
        l.push(`qbackupd_backup_duration_seconds_bucket${labels({ domain: d.name, mode, le: "+Inf" })} ${h.count}`);
        l.push(`qbackupd_backup_duration_seconds_sum${labels({ domain: d.name, mode })} ${num(h.sum)}`);
        l.push(`qbackupd_backup_duration_seconds_count${labels({ domain: d.name, mode })} ${h.count}`);
      }

    head(
      "qbackupd_backup_last_success_timestamp_seconds",
      "gauge",
      "When the domain's last completed backup ended (seconds since the epoch; 0: never). Survives restarts.",
    );
    for (const d of ds)
      l.push(`qbackupd_backup_last_success_timestamp_seconds${labels({ domain: d.name })} ${num(this.last.get(d.name)?.successAt ?? 0)}`);
    head("qbackupd_backup_last_end_timestamp_seconds", "gauge", "When the domain's last backup ended, whatever its outcome (0: never).");
    for (const d of ds)
      l.push(`qbackupd_backup_last_end_timestamp_seconds${labels({ domain: d.name })} ${num(this.last.get(d.name)?.endAt ?? 0)}`);
    head("qbackupd_backup_last_outcome", "gauge", "1 for the outcome of the domain's last backup, 0 for the others (all 0: none yet).");
    for (const d of ds) {
      const o = this.last.get(d.name)?.outcome;
      for (const outcome of OUTCOMES) l.push(`qbackupd_backup_last_outcome${labels({ domain: d.name, outcome })} ${o === outcome ? 1 : 0}`);
    }

    head("qbackupd_backups_active", "gauge", "Backup jobs running now.");
    l.push(`qbackupd_backups_active ${activeJobs}`);
    head("qbackupd_checkpoints", "gauge", "Checkpoints per domain.");
    for (const d of ds) l.push(`qbackupd_checkpoints${labels({ domain: d.name })} ${d.checkpoints.store.size}`);
    head("qbackupd_qmp_connected", "gauge", "Whether the domain's QMP connection is up and usable.");
    for (const d of ds) l.push(`qbackupd_qmp_connected${labels({ domain: d.name })} ${d.state === "connected" ? 1 : 0}`);
    head("qbackupd_api_requests_total", "counter", "API requests served.");
    l.push(`qbackupd_api_requests_total ${this.requests}`);

    l.push(...processMetrics());
    return `${l.join("\n")}\n`;
  }
}

/** The standard process_* series (names and meanings of the Prometheus client libraries' process collectors). */
export function processMetrics(): string[] {
  const l: string[] = [];
  const g = (name: string, type: string, help: string, v: number) =>
    l.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`, `${name} ${num(v)}`);
  const cpu = process.cpuUsage();
  g("process_cpu_user_seconds_total", "counter", "Total user CPU time spent in seconds.", cpu.user / 1e6);
  g("process_cpu_system_seconds_total", "counter", "Total system CPU time spent in seconds.", cpu.system / 1e6);
  g("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.", (cpu.user + cpu.system) / 1e6);
  const mem = process.memoryUsage();
  g("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", mem.rss);
  g("process_heap_bytes", "gauge", "Process heap size in bytes.", mem.heapTotal);
  g(
    "process_start_time_seconds",
    "gauge",
    "Start time of the process since unix epoch in seconds.",
    Math.round(Date.now() / 1000 - process.uptime()),
  );
  try {
    g("process_open_fds", "gauge", "Number of open file descriptors.", readdirSync("/proc/self/fd").length - 1);
  } catch {
    // not Linux, or /proc hidden: the series is left out rather than made up
  }
  try {
    const m = /^Max open files\s+(\d+)/m.exec(readFileSync("/proc/self/limits", "utf8"));
    if (m) g("process_max_fds", "gauge", "Maximum number of open file descriptors.", Number(m[1]));
  } catch {
    // as above
  }
  try {
    const m = /^VmSize:\s+(\d+) kB/m.exec(readFileSync("/proc/self/status", "utf8"));
    if (m) g("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", Number(m[1]) * 1024);
  } catch {
    // as above
  }
  return l;
}
