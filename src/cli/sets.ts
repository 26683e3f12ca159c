/**
 * The backup-set verbs of `qbackup`: backup, backup-list, restore, verify,
 * prune, export. Each is one call of the daemon's /v1/sets API (backup then
 * follows its job until the restore point is recorded; export holds the
 * export until interrupted). Output and exit codes as every other verb:
 * human text by default, --json for scripts, exit codes from exit-codes.ts.
 */
import type { Command } from "commander";
import type { ApiReply } from "./client.js";
import { EXIT } from "./exit-codes.js";
import { type JobInfoLike, progressBar } from "./jobinfo.js";
import { sizeFormat } from "./units.js";

export interface SetVerbHelpers<C> {
  readonly ctx: () => C & { json: boolean };
  readonly call: (c: C, method: string, path: string, body?: unknown) => Promise<ApiReply>;
  readonly ask: (c: C, method: string, path: string, body?: unknown) => Promise<ApiReply>;
  readonly out: (c: C, value: unknown, human: () => string) => void;
  readonly table: (header: string[], rows: string[][]) => string;
  readonly fail: (message: string, exit: number, code?: string) => Error;
  readonly sizeArg: (v: string) => number;
  readonly setExit: (code: number) => void;
}

interface PointJson {
  checkpoint: string;
  time: string;
  kind: string;
  reason: string | null;
  merged: boolean;
  disks: { name: string; file: string; dataSize: number; virtualSize: number }[];
}
interface Listing {
  set: string;
  domain: string;
  points: PointJson[];
  pending: { checkpoint: string; state: string } | null;
  lastSettled: { checkpoint: string; outcome: string; message: string | null } | null;
}
interface Started {
  set: string;
  checkpoint: string;
  kind: string;
  reason: string | null;
  job: JobInfoLike & { id: string };
}

const enc = encodeURIComponent;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export function registerSetVerbs<C>(program: Command, h: SetVerbHelpers<C>): void {
  program
    .command("backup <domain> <dir>")
    .description(
      "back up every disk into the backup set DIR: incremental since its newest restore point when valid, else full (saying why)",
    )
    .option("--full", "a full backup even when an incremental is possible")
    .option("--quiesce", "freeze guest filesystems through the guest agent")
    .option("--bandwidth <size>", "per-disk limit per second: bytes, or with a unit (64K, 100M)", h.sizeArg)
    .option("--no-wait", "return once the backup has started")
    .action(async (domain: string, dir: string, o: { full?: boolean; quiesce?: boolean; bandwidth?: number; wait: boolean }) => {
      const c = h.ctx();
      const r = await h.call(c, "POST", "/v1/sets/backup", {
        domain,
        dir,
        full: o.full === true,
        quiesce: o.quiesce === true,
        ...(o.bandwidth !== undefined ? { bandwidth: o.bandwidth } : {}),
      });
      const s = r.body as Started;
      const what = s.kind === "incremental" ? "incremental" : `full${s.reason === null ? "" : ` (${s.reason})`}`;
      if (!o.wait) {
        h.out(c, s, () => `Backup of ${domain} into ${s.set} started: ${what}, restore point ${s.checkpoint}, job ${s.job.id}\n`);
        return;
      }
      if (!c.json) process.stdout.write(`Backup of ${domain} into ${s.set}: ${what}, restore point ${s.checkpoint}\n`);
      const tty = process.stdout.isTTY === true && !c.json;
      let drawn = false;
      for (;;) {
        const l = await h.call(c, "GET", `/v1/sets/points?dir=${enc(s.set)}`);
        const listing = l.body as Listing;
        if (listing.pending === null || listing.pending.checkpoint !== s.checkpoint) {
          if (drawn) process.stdout.write("\n");
          const point = listing.points.find((p) => p.checkpoint === s.checkpoint);
          if (point === undefined) {
            const why = listing.lastSettled?.checkpoint === s.checkpoint ? listing.lastSettled.message : null;
            throw h.fail(`the backup did not become a restore point${why ? `: ${why}` : ""}`, EXIT.failed, "job-failed");
          }
          h.out(
            c,
            { ...s, point },
            () =>
              `Restore point ${point.checkpoint} recorded (${point.kind}): ${point.disks.map((d) => `${d.name} ${sizeFormat(d.dataSize)}`).join(", ")}\n`,
          );
          return;
        }
        if (tty) {
          const j = await h.ask(c, "GET", `/v1/domains/${enc(domain)}/backup`);
          if (j.status < 400) {
            process.stdout.write(progressBar(j.body as JobInfoLike));
            drawn = true;
          }
        }
        await sleep(tty ? 250 : 500);
      }
    });

  program
    .command("backup-list <dir>")
    .description("the restore points of the backup set DIR, oldest first")
    .action(async (dir: string) => {
      const c = h.ctx();
      const r = await h.call(c, "GET", `/v1/sets/points?dir=${enc(dir)}`);
      const l = r.body as Listing;
      h.out(c, l, () => {
        const rows = l.points.flatMap((p) =>
          p.disks.map((d, i) => [
            i === 0 ? p.checkpoint : "",
            i === 0 ? p.time : "",
            i === 0 ? `${p.kind}${p.merged ? " (merged)" : ""}` : "",
            d.name,
            d.file,
            sizeFormat(d.dataSize),
            sizeFormat(d.virtualSize),
          ]),
        );
        const pend = l.pending === null ? "" : `Backup in progress: ${l.pending.checkpoint} (${l.pending.state})\n`;
        return `${h.table(["Restore point", "Time", "Kind", "Disk", "File", "Data", "Virtual"], rows)}${pend}`;
      });
    });

  program
    .command("restore <dir> <disk> <file>")
    .description("write DISK as it was at a restore point (default: the newest) into FILE, which must not exist")
    .option("--at <checkpoint>", "the restore point")
    .option("--format <format>", "raw or qcow2", "raw")
    .action(async (dir: string, disk: string, file: string, o: { at?: string; format: string }) => {
      if (o.format !== "raw" && o.format !== "qcow2") throw h.fail("--format is raw or qcow2", EXIT.usage, "usage");
      const c = h.ctx();
      const r = await h.call(c, "POST", "/v1/sets/restore", {
        dir,
        disk,
        file,
        format: o.format,
        ...(o.at !== undefined ? { at: o.at } : {}),
      });
      const b = r.body as { checkpoint: string; file: string; format: string; virtualSize: number; elapsedMs: number };
      h.out(
        c,
        b,
        () =>
          `Restored ${disk} at ${b.checkpoint} into ${b.file} (${b.format}, ${sizeFormat(b.virtualSize)}, ${(b.elapsedMs / 1000).toFixed(1)} s)\n`,
      );
    });

  program
    .command("verify <dir>")
    .description("check every image of the backup set DIR (qemu-img check, chain links, content digests); exit 1 naming what is damaged")
    .action(async (dir: string) => {
      const c = h.ctx();
      const r = await h.call(c, "POST", "/v1/sets/verify", { dir });
      const v = r.body as {
        set: string;
        intact: boolean;
        images: number;
        bytesRead: number;
        damaged: { file: string; point: string; problems: string[] }[];
        damagedPoints: string[];
      };
      h.out(c, v, () =>
        v.intact
          ? `Backup set ${v.set} intact: ${v.images} images, ${sizeFormat(v.bytesRead)} read\n`
          : `Backup set ${v.set} DAMAGED\n${v.damaged.map((d) => `  ${d.file} (restore point ${d.point}): ${d.problems.join("; ")}\n`).join("")}Restore points affected: ${v.damagedPoints.join(", ")}\n`,
      );
      h.setExit(v.intact ? EXIT.ok : EXIT.failed);
    });

  program
    .command("prune <dir>")
    .description("keep the newest N restore points of the backup set DIR (older images merged into the oldest kept one)")
    .requiredOption("--keep <n>", "how many restore points to keep", (v) => Number(v))
    .action(async (dir: string, o: { keep: number }) => {
      if (!Number.isSafeInteger(o.keep) || o.keep < 1)
        throw h.fail("--keep takes a number of restore points, at least 1", EXIT.usage, "usage");
      const c = h.ctx();
      const r = await h.call(c, "POST", "/v1/sets/prune", { dir, keep: o.keep });
      const p = r.body as {
        kept: string[];
        removed: string[];
        merged: string[];
        checkpointsDeleted: string[];
        checkpointsLeft: { checkpoint: string; reason: string }[];
      };
      h.out(c, p, () =>
        [
          `Kept ${p.kept.length} restore point(s), removed ${p.removed.length}${p.removed.length > 0 ? `: ${p.removed.join(", ")}` : ""}\n`,
          p.merged.length > 0 ? `Merged the older images into ${p.merged.join(", ")}\n` : "",
          p.checkpointsDeleted.length > 0 ? `Deleted checkpoints: ${p.checkpointsDeleted.join(", ")}\n` : "",
          ...p.checkpointsLeft.map((x) => `Checkpoint ${x.checkpoint} not deleted now: ${x.reason}\n`),
        ].join(""),
      );
    });

  program
    .command("export <dir> <disk>")
    .description("serve a restore point of DISK read-only over NBD on a unix socket until interrupted")
    .option("--at <checkpoint>", "the restore point (default: the newest)")
    // given as --socket after the verb (main.ts renames it: the program's own --socket is the daemon's)
    .requiredOption("--nbd-socket <path>", "the NBD server's unix socket (also --socket after the verb)")
    .action(async (dir: string, disk: string, o: { at?: string; nbdSocket: string }) => {
      const c = h.ctx();
      const r = await h.call(c, "POST", "/v1/sets/exports", {
        dir,
        disk,
        socket: o.nbdSocket,
        ...(o.at !== undefined ? { at: o.at } : {}),
      });
      const e = r.body as { id: string; uri: string; checkpoint: string };
      h.out(c, e, () => `Serving ${disk} at ${e.checkpoint}: ${e.uri} (export ${e.id}; Ctrl-C ends it)\n`);
      let stop = false;
      const onSig = () => {
        stop = true;
      };
      process.once("SIGINT", onSig);
      process.once("SIGTERM", onSig);
      while (!stop) {
        await sleep(500);
        const l = await h.ask(c, "GET", "/v1/sets/exports");
        if (l.status < 400 && !(l.body as { id: string }[]).some((x) => x.id === e.id))
          throw h.fail(`export ${e.id} ended by itself`, EXIT.failed, "failed");
      }
      await h.call(c, "DELETE", `/v1/sets/exports/${enc(e.id)}`);
      if (!c.json) process.stdout.write(`Export ${e.id} ended\n`);
    });
}
