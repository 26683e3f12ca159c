/**
 * Prometheus metrics, rendered in the text exposition format. Few enough
 * series that a library would add more than it saves.
 */
import type { JobEvent } from "../jobs/model.js";
import type { DomainRegistry } from "./domains.js";

export class Metrics {
  private readonly backups = new Map<string, number>();
  private bytes = 0;
  private durationSum = 0;
  private durationCount = 0;
  private requests = 0;

  onJobEvent(e: JobEvent): void {
    if (e.type !== "ended") return;
    const outcome = e.info.state === "ready" ? "completed" : e.info.state;
    const key = `${e.info.mode}|${outcome}`;
    this.backups.set(key, (this.backups.get(key) ?? 0) + 1);
    this.bytes += e.info.bytesDone;
    this.durationSum += e.info.elapsedMs / 1000;
    this.durationCount++;
  }

  onRequest(): void {
    this.requests++;
  }

  render(domains: DomainRegistry, activeJobs: number): string {
    const l: string[] = [];
    const esc = (s: string) => s.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n");
    l.push("# HELP qbackupd_backups_total Backups finished, by mode and outcome.", "# TYPE qbackupd_backups_total counter");
    for (const [k, v] of this.backups) {
      const [mode, outcome] = k.split("|");
      l.push(`qbackupd_backups_total{mode="${mode}",outcome="${outcome}"} ${v}`);
    }
    l.push("# HELP qbackupd_backup_bytes_total Bytes copied or served by finished backups.", "# TYPE qbackupd_backup_bytes_total counter");
    l.push(`qbackupd_backup_bytes_total ${this.bytes}`);
    l.push("# HELP qbackupd_backup_duration_seconds Duration of finished backups.", "# TYPE qbackupd_backup_duration_seconds summary");
    l.push(`qbackupd_backup_duration_seconds_sum ${this.durationSum}`, `qbackupd_backup_duration_seconds_count ${this.durationCount}`);
    l.push(
      "# HELP qbackupd_backups_active Backup jobs running now.",
      "# TYPE qbackupd_backups_active gauge",
      `qbackupd_backups_active ${activeJobs}`,
    );
    l.push("# HELP qbackupd_checkpoints Checkpoints per domain.", "# TYPE qbackupd_checkpoints gauge");
    for (const d of domains.list()) l.push(`qbackupd_checkpoints{domain="${esc(d.name)}"} ${d.checkpoints.store.size}`);
    l.push("# HELP qbackupd_qmp_connected Whether the domain's QMP connection is up and usable.", "# TYPE qbackupd_qmp_connected gauge");
    for (const d of domains.list()) l.push(`qbackupd_qmp_connected{domain="${esc(d.name)}"} ${d.state === "connected" ? 1 : 0}`);
    l.push(
      "# HELP qbackupd_api_requests_total API requests served.",
      "# TYPE qbackupd_api_requests_total counter",
      `qbackupd_api_requests_total ${this.requests}`,
    );
    return `${l.join("\n")}\n`;
  }
}
