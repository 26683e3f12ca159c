/**
 * How the CLI shows a backup job: `domjobinfo` in virsh's layout
 * (tools/virsh-domain.c cmdDomjobinfo: "%-17s %-12s", sizes "%.3lf %s"),
 * then qbackupd's own rows. Pure formatting; never talks to the daemon.
 */
import { sizeFormat } from "./units.js";

export interface JobInfoLike {
  id: string;
  domain: string;
  mode: string;
  state: string;
  active: boolean;
  incremental?: string;
  checkpoint?: string;
  startedAt: string;
  endedAt?: string;
  elapsedMs: number;
  bytesDone: number;
  bytesTotal: number;
  rate: number;
  error?: string;
  nbd?: string;
  durable?: boolean;
  disks: { name: string; state: string; bytesDone: number; bytesTotal: number; file: string; exportName?: string }[];
}

/** virsh's job types: a running backup is Unbounded; a finished one Completed, Failed or Cancelled. */
export function jobType(j: JobInfoLike | undefined): string {
  if (j === undefined) return "None";
  if (j.active) return "Unbounded";
  return j.state === "ready" ? "Completed" : j.state === "cancelled" ? "Cancelled" : "Failed";
}

const row = (k: string, v: string) => `${`${k}:`.padEnd(17)} ${v}`;

/** Text of `domjobinfo`; `undefined`: no job, which virsh answers with "Job type: None" alone. */
export function jobText(j: JobInfoLike | undefined): string {
  if (j === undefined) return `${row("Job type", "None".padEnd(12))}\n`;
  const rows = [
    row("Job type", jobType(j).padEnd(12)),
    row("Operation", "Backup".padEnd(12)),
    row("Time elapsed", `${String(j.elapsedMs).padEnd(12)} ms`),
    row("Data processed", sizeFormat(j.bytesDone)),
    // as virsh, rows without a value are left out: a total not known yet (QEMU still sizing the copy)
    ...(sizing(j)
      ? []
      : [row("Data remaining", sizeFormat(Math.max(0, j.bytesTotal - j.bytesDone))), row("Data total", sizeFormat(j.bytesTotal))]),
    // qbackupd's own rows below
    row("Job id", j.id),
    row("Mode", j.mode),
    row("State", j.state),
    row("Rate", `${sizeFormat(j.rate)}/s`),
  ];
  if (j.incremental) rows.push(row("Incremental since", j.incremental));
  if (j.checkpoint) rows.push(row("Checkpoint", j.checkpoint));
  if (j.nbd) rows.push(row("NBD server", j.nbd));
  if (j.durable === false) rows.push(row("Durable", "no (ready once copied, not waiting for the disk)"));
  if (j.error) rows.push(row("Error", j.error));
  for (const d of j.disks)
    rows.push(row(`Disk ${d.name}`, `${d.state} ${sizeFormat(d.bytesDone)}/${sizeFormat(d.bytesTotal)} ${diskTarget(j, d)}`));
  return `${rows.join("\n")}\n`;
}

/** Where a disk's backup goes: the target file (push) or the NBD URI of its export (pull). */
export function diskTarget(j: Pick<JobInfoLike, "nbd">, d: { file: string; exportName?: string }): string {
  if (d.exportName === undefined) return d.file;
  if (j.nbd === undefined) return `export ${d.exportName}`;
  return nbdExportUri(j.nbd, d.exportName);
}

/** The daemon reports the server (nbd+unix:///?socket=… or nbd://host:port); an export's URI puts its name in the path. */
export function nbdExportUri(server: string, exportName: string): string {
  const m = /^(nbds?(?:\+unix)?:\/\/[^/?]*)\/?([^?]*)(\?.*)?$/.exec(server);
  if (m === null) return `${server} export ${exportName}`;
  return `${m[1]}/${encodeURIComponent(exportName)}${m[3] ?? ""}`;
}

/** "1h02m", "3m05s", "42s". */
function duration(seconds: number): string {
  const s = Math.max(0, Math.round(seconds));
  if (s >= 3600) return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
  if (s >= 60) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  return `${s}s`;
}

/** The total is not known yet: the daemon reports 0 while QEMU still works out how much a running job copies. */
function sizing(j: JobInfoLike): boolean {
  return j.active && j.bytesTotal === 0 && j.state !== "ready";
}

/** One frame of `wait`'s progress bar on a terminal (starts with \r, ends with a clear-to-end-of-line). */
export function progressBar(j: JobInfoLike): string {
  if (sizing(j)) return `\r[${"-".repeat(30)}] sizing: ${sizeFormat(j.bytesDone)} copied  ${sizeFormat(j.rate)}/s\x1b[K`;
  const frac = j.bytesTotal > 0 ? Math.min(1, j.bytesDone / j.bytesTotal) : j.active ? 0 : 1;
  const width = 30;
  const filled = Math.round(frac * width);
  const left = j.bytesTotal - j.bytesDone;
  const eta = j.active && j.rate > 0 && left > 0 ? `  ETA ${duration(left / j.rate)}` : "";
  return `\r[${"#".repeat(filled)}${"-".repeat(width - filled)}] ${(frac * 100).toFixed(0).padStart(3)}% ${sizeFormat(j.bytesDone)} / ${sizeFormat(j.bytesTotal)}  ${sizeFormat(j.rate)}/s${eta}\x1b[K`;
}
