/**
 * `qbackup`: the command-line client of qbackupd, with virsh-like verbs.
 * Human output by default, --json for scripts; errors are one line on
 * stderr; exit codes from exit-codes.ts.
 */
import { readFileSync } from "node:fs";
import { Command, CommanderError } from "commander";
import { escapeText } from "../conf/escape.js";
import { ApiClient, type ApiReply, isCallError } from "./client.js";
import { EXIT, exitCodeForStatus } from "./exit-codes.js";

const DEFAULT_SOCKET = "/run/qbackupd/qbackupd.sock";

class CliFailure extends Error {
  constructor(
    message: string,
    readonly exitCode: number,
  ) {
    super(message);
  }
}

interface Ctx {
  api: ApiClient;
  json: boolean;
}

/** An XML file argument; "" means none (so a checkpoint XML can follow an absent backup XML), "-" is stdin. */
function readXml(path: string | undefined): string | undefined {
  if (path === undefined || path === "") return undefined;
  try {
    return readFileSync(path === "-" ? 0 : path, "utf8");
  } catch (e) {
    throw new CliFailure(`cannot read ${path}: ${(e as Error).message}`, EXIT.usage);
  }
}

async function call(ctx: Ctx, method: string, path: string, body?: unknown): Promise<ApiReply> {
  const r = await ctx.api.request(method, path, body);
  if (isCallError(r)) throw new CliFailure(r.message, EXIT.unavailable);
  if (r.status >= 400) {
    const b = r.body as { message?: string };
    const message = typeof b === "object" && b !== null && typeof b.message === "string" ? b.message : r.text;
    throw new CliFailure(message, exitCodeForStatus(r.status));
  }
  return r;
}

const enc = encodeURIComponent;

function out(ctx: Ctx, value: unknown, human: () => string): void {
  process.stdout.write(ctx.json ? `${JSON.stringify(value, null, 2)}\n` : human());
}

interface JobInfoLike {
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

const MiB = 1024 * 1024;
const mib = (n: number) => `${(n / MiB).toFixed(1)} MiB`;

function jobText(j: JobInfoLike): string {
  const rows: [string, string][] = [
    ["Job type", j.active ? "Active" : "Completed"],
    ["Operation", `Backup (${j.mode})`],
    ["State", j.state],
    ["Time elapsed", `${j.elapsedMs} ms`],
    ["Data processed", mib(j.bytesDone)],
    ["Data total", mib(j.bytesTotal)],
    ["Rate", `${mib(j.rate)}/s`],
  ];
  if (j.incremental) rows.push(["Incremental since", j.incremental]);
  if (j.checkpoint) rows.push(["Checkpoint", j.checkpoint]);
  if (j.nbd) rows.push(["NBD server", j.nbd]);
  if (j.durable === false) rows.push(["Durable", "no (ready once copied, not waiting for the disk)"]);
  if (j.error) rows.push(["Error", j.error]);
  for (const d of j.disks)
    rows.push([
      `Disk ${d.name}`,
      `${d.state} ${mib(d.bytesDone)}/${mib(d.bytesTotal)} ${d.exportName ? `export ${d.exportName}` : d.file}`,
    ]);
  return `${rows.map(([k, v]) => `${`${k}:`.padEnd(20)}${v}`).join("\n")}\n`;
}

function table(header: string[], rows: string[][]): string {
  const w = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)));
  const line = (r: string[]) =>
    r
      .map((c, i) => c.padEnd(w[i]!))
      .join("   ")
      .trimEnd();
  return `${[line(header), w.map((x) => "-".repeat(x)).join("---"), ...rows.map(line)].join("\n")}\n`;
}

function settledExit(j: JobInfoLike): number {
  return j.state === "ready" ? EXIT.ok : EXIT.failed;
}

function progressBar(j: JobInfoLike): string {
  const frac = j.bytesTotal > 0 ? j.bytesDone / j.bytesTotal : 0;
  const width = 30;
  const filled = Math.round(frac * width);
  return `\r[${"#".repeat(filled)}${"-".repeat(width - filled)}] ${(frac * 100).toFixed(0).padStart(3)}% ${mib(j.bytesDone)} / ${mib(j.bytesTotal)}  ${mib(j.rate)}/s `;
}

async function waitVerb(ctx: Ctx, domain: string, timeoutS: number | undefined): Promise<number> {
  const deadline = timeoutS === undefined ? Number.POSITIVE_INFINITY : Date.now() + timeoutS * 1000;
  const tty = process.stdout.isTTY === true && !ctx.json;
  for (;;) {
    const left = deadline - Date.now();
    if (left <= 0) throw new CliFailure(`timed out waiting for the backup on '${domain}'`, EXIT.timeout);
    const r = await ctx.api.request("GET", `/v1/domains/${enc(domain)}/backup`);
    if (isCallError(r)) throw new CliFailure(r.message, EXIT.unavailable);
    if (r.status === 404) {
      // no running job: report the last finished one
      const done = await call(ctx, "GET", `/v1/domains/${enc(domain)}/backup?completed=1`);
      const j = done.body as JobInfoLike;
      if (tty) process.stdout.write("\n");
      out(ctx, j, () => `backup ${j.state}${j.error ? `: ${j.error}` : ""}\n`);
      return settledExit(j);
    }
    if (r.status >= 400) return call(ctx, "GET", `/v1/domains/${enc(domain)}/backup`).then(() => EXIT.failed);
    const j = r.body as JobInfoLike;
    if (j.state === "ready" || j.state === "failed" || j.state === "cancelled") {
      if (tty) process.stdout.write(`${progressBar(j)}\n`);
      out(ctx, j, () => `backup ${j.state}${j.error ? `: ${j.error}` : ""}\n`);
      return settledExit(j);
    }
    if (tty) process.stdout.write(progressBar(j));
    if (tty) await new Promise((res) => setTimeout(res, 250));
    else {
      // long poll: the daemon answers as soon as the job settles
      const slice = Math.min(30, Math.max(0, Math.ceil(left / 1000)));
      const w = await ctx.api.request("GET", `/v1/domains/${enc(domain)}/backup/wait?timeout=${Number.isFinite(slice) ? slice : 30}`);
      if (isCallError(w)) throw new CliFailure(w.message, EXIT.unavailable);
    }
  }
}

export function buildCli(setExit: (code: number) => void): Command {
  const program = new Command("qbackup");
  program
    .description("Command-line client of qbackupd, the QEMU backup daemon")
    .option("--socket <path>", "daemon socket (also $QBACKUP_SOCKET)", process.env.QBACKUP_SOCKET ?? DEFAULT_SOCKET)
    .option("--json", "machine-readable output", false)
    .showHelpAfterError(false)
    .configureOutput({ writeErr: (s) => process.stderr.write(s) });
  const ctx = (): Ctx => {
    const o = program.opts<{ socket: string; json: boolean }>();
    return { api: new ApiClient(o.socket), json: o.json };
  };

  program
    .command("domain-add <name>")
    .description("register a domain")
    .requiredOption("--qmp <path>", "QMP socket path (or host:port)")
    .option("--agent <path>", "guest agent socket (for --quiesce)")
    .option("--qemu-user <uid:gid>", "QEMU runs as this user (default: the QMP socket's owner)")
    .option("--no-wait", "return at once, without waiting for the daemon to connect to QEMU")
    .option("--timeout <seconds>", "how long to wait for the connection", "30")
    .action(async (name: string, o: { qmp: string; agent?: string; qemuUser?: string; wait: boolean; timeout: string }) => {
      const c = ctx();
      const secs = Number(o.timeout);
      if (!Number.isFinite(secs) || secs <= 0 || secs > 300) throw new CliFailure("--timeout takes seconds from 1 to 300", EXIT.usage);
      const r = await call(c, "POST", `/v1/domains${o.wait ? `?wait=${secs}` : ""}`, {
        name,
        qmp: o.qmp,
        ...(o.agent ? { agent: o.agent } : {}),
        ...(o.qemuUser ? { qemuUser: o.qemuUser } : {}),
      });
      const d = r.body as { state: string; error: string | null };
      if (o.wait && d.state !== "connected") {
        const why = d.error ?? `still connecting after ${secs} s`;
        throw new CliFailure(
          `domain '${name}' is registered but not connected: ${why} (the daemon keeps retrying; domain-remove to drop it)`,
          d.error === null ? EXIT.timeout : EXIT.unavailable,
        );
      }
      out(c, r.body, () => (o.wait ? `Domain ${name} added and connected\n` : `Domain ${name} added\n`));
    });
  program
    .command("domain-list")
    .description("list domains")
    .action(async () => {
      const c = ctx();
      const r = await call(c, "GET", "/v1/domains");
      const list = r.body as { name: string; state: string; qmp: string; checkpoints: number; currentCheckpoint: string | null }[];
      out(c, list, () =>
        table(
          ["Name", "State", "Checkpoints", "Current", "QMP"],
          list.map((d) => [d.name, d.state, String(d.checkpoints), d.currentCheckpoint ?? "-", d.qmp]),
        ),
      );
    });
  program
    .command("domain-remove <name>")
    .description("unregister a domain (its checkpoints stay on disk)")
    .action(async (name: string) => {
      const c = ctx();
      const r = await call(c, "DELETE", `/v1/domains/${enc(name)}`);
      out(c, r.body, () => `Domain ${name} removed\n`);
    });

  program
    .command("backup-begin <domain> [backupxml] [checkpointxml]")
    .description("start a backup (push or pull per the XML; full push of all disks without one)")
    .option("--reuse-external", "use target files the caller created")
    .option("--quiesce", "freeze guest filesystems through the guest agent")
    .option("--bandwidth <bytes>", "per-disk limit in bytes/s", (v) => Number(v))
    .option("--no-durable", "push: report ready once copied, without waiting for the targets to reach the disk")
    .action(
      async (
        domain: string,
        bx: string | undefined,
        cx: string | undefined,
        o: { reuseExternal?: boolean; quiesce?: boolean; bandwidth?: number; durable?: boolean },
      ) => {
        const c = ctx();
        const body = {
          ...(bx !== undefined ? { backupXml: readXml(bx) } : {}),
          ...(cx !== undefined ? { checkpointXml: readXml(cx) } : {}),
          reuseExternal: o.reuseExternal === true,
          quiesce: o.quiesce === true,
          ...(o.durable === false ? { durable: false } : {}),
          ...(o.bandwidth !== undefined ? { bandwidth: o.bandwidth } : {}),
        };
        const r = await call(c, "POST", `/v1/domains/${enc(domain)}/backup`, body);
        const j = r.body as JobInfoLike;
        out(c, j, () => `Backup started (${j.mode}, job ${j.id})${j.nbd ? `: NBD at ${j.nbd}` : ""}\n`);
      },
    );
  program
    .command("backup-dumpxml <domain>")
    .description("the running backup's XML, defaults filled in")
    .action(async (domain: string) => {
      const c = ctx();
      const r = await call(c, "GET", `/v1/domains/${enc(domain)}/backup/xml`);
      out(c, { xml: r.text }, () => r.text);
    });
  program
    .command("domjobinfo <domain>")
    .description("state and progress of the running backup")
    .option("--completed", "the last finished backup instead")
    .action(async (domain: string, o: { completed?: boolean }) => {
      const c = ctx();
      const r = await call(c, "GET", `/v1/domains/${enc(domain)}/backup${o.completed ? "?completed=1" : ""}`);
      out(c, r.body, () => jobText(r.body as JobInfoLike));
    });
  program
    .command("domjobabort <domain>")
    .description("end a pull backup, or abort a push backup")
    .action(async (domain: string) => {
      const c = ctx();
      const r = await call(c, "DELETE", `/v1/domains/${enc(domain)}/backup`);
      const j = r.body as JobInfoLike;
      out(c, j, () => `Backup ${j.mode === "pull" && j.state === "ready" ? "ended" : j.state}\n`);
    });
  program
    .command("wait <domain>")
    .description("wait until the backup is ready (push: complete; pull: exports served)")
    .option("--timeout <seconds>", "give up after this long", (v) => Number(v))
    .action(async (domain: string, o: { timeout?: number }) => {
      if (o.timeout !== undefined && (!Number.isFinite(o.timeout) || o.timeout < 0))
        throw new CliFailure("--timeout takes seconds", EXIT.usage);
      setExit(await waitVerb(ctx(), domain, o.timeout));
    });

  program
    .command("checkpoint-create <domain> [xmlfile]")
    .description("create a checkpoint from XML (or all defaults)")
    .option("--redefine", "restore metadata of an existing checkpoint (bitmaps must exist)")
    .option("--quiesce", "freeze guest filesystems through the guest agent")
    .action(async (domain: string, file: string | undefined, o: { redefine?: boolean; quiesce?: boolean }) => {
      const c = ctx();
      const xml = readXml(file);
      if (o.redefine && xml === undefined) throw new CliFailure("--redefine needs an XML file", EXIT.usage);
      const r = await call(c, "POST", `/v1/domains/${enc(domain)}/checkpoints`, {
        ...(xml ? { xml } : {}),
        redefine: o.redefine === true,
        quiesce: o.quiesce === true,
      });
      const cp = r.body as { name: string };
      out(c, cp, () => `Domain checkpoint ${cp.name} ${o.redefine ? "redefined" : "created"}\n`);
    });
  program
    .command("checkpoint-create-as <domain> [name]")
    .description("create a checkpoint from a name and description")
    .option("--description <text>", "description")
    .option("--quiesce", "freeze guest filesystems through the guest agent")
    .action(async (domain: string, name: string | undefined, o: { description?: string; quiesce?: boolean }) => {
      const c = ctx();
      const xml = `<domaincheckpoint>${name !== undefined ? `<name>${escapeText(name)}</name>` : ""}${o.description !== undefined ? `<description>${escapeText(o.description)}</description>` : ""}</domaincheckpoint>`;
      const r = await call(c, "POST", `/v1/domains/${enc(domain)}/checkpoints`, { xml, quiesce: o.quiesce === true });
      const cp = r.body as { name: string };
      out(c, cp, () => `Domain checkpoint ${cp.name} created\n`);
    });
  program
    .command("checkpoint-list <domain>")
    .description("list checkpoints")
    .option("--name", "names only, one per line, oldest first")
    .option("--tree", "the hierarchy")
    .option("--roots", "only checkpoints without a parent")
    .option("--leaves", "only checkpoints without children")
    .option("--topological", "parents before children")
    .option("--parent", "show each checkpoint's parent")
    .option("--from <name>", "descendants of this checkpoint")
    .option("--descendants", "with --from: all levels, not only children")
    .action(async (domain: string, o: Record<string, boolean | string | undefined>) => {
      const c = ctx();
      if (o.tree) {
        const r = await call(c, "GET", `/v1/domains/${enc(domain)}/checkpoints?tree=1`);
        out(c, { tree: r.text }, () => r.text);
        return;
      }
      const q = new URLSearchParams();
      if (o.roots) q.set("roots", "1");
      if (o.leaves) q.set("leaves", "1");
      if (o.topological) q.set("topological", "1");
      if (typeof o.from === "string") q.set("descendants", o.from);
      if (o.descendants) q.set("deep", "1");
      const r = await call(c, "GET", `/v1/domains/${enc(domain)}/checkpoints?${q}`);
      const list = r.body as { name: string; parent: string | null; creationTime: number; valid: boolean | null; current: boolean }[];
      if (o.name) {
        out(
          c,
          list.map((x) => x.name),
          () => list.map((x) => `${x.name}\n`).join(""),
        );
        return;
      }
      const header = ["Name", "Creation Time", ...(o.parent ? ["Parent"] : []), "Valid"];
      out(c, list, () =>
        table(
          header,
          list.map((x) => [
            `${x.name}${x.current ? " *" : ""}`,
            new Date(x.creationTime * 1000)
              .toISOString()
              .replace("T", " ")
              .replace(/\.\d+Z$/, " +0000"),
            ...(o.parent ? [x.parent ?? "-"] : []),
            x.valid === null ? "unknown" : x.valid ? "yes" : "NO",
          ]),
        ),
      );
    });
  program
    .command("checkpoint-dumpxml <domain> <name>")
    .description("a checkpoint's XML")
    .option("--size", "include bytes changed since the checkpoint, per disk")
    .action(async (domain: string, name: string, o: { size?: boolean }) => {
      const c = ctx();
      const r = await call(c, "GET", `/v1/domains/${enc(domain)}/checkpoints/${enc(name)}/xml${o.size ? "?size=1" : ""}`);
      out(c, { xml: r.text }, () => r.text);
    });
  program
    .command("checkpoint-parent <domain> <name>")
    .description("a checkpoint's parent")
    .action(async (domain: string, name: string) => {
      const c = ctx();
      const r = await call(c, "GET", `/v1/domains/${enc(domain)}/checkpoints/${enc(name)}`);
      const cp = r.body as { parent: string | null };
      if (cp.parent === null) throw new CliFailure(`checkpoint '${name}' has no parent`, EXIT.notFound);
      out(c, { parent: cp.parent }, () => `${cp.parent}\n`);
    });
  program
    .command("checkpoint-delete <domain> <name>")
    .description("delete a checkpoint (its bitmaps and metadata)")
    .option("--children", "and all its descendants")
    .option("--children-only", "only its descendants")
    .option("--metadata", "metadata only; bitmaps stay in QEMU")
    .action(async (domain: string, name: string, o: { children?: boolean; childrenOnly?: boolean; metadata?: boolean }) => {
      const c = ctx();
      const q = new URLSearchParams();
      if (o.children) q.set("children", "1");
      if (o.childrenOnly) q.set("childrenOnly", "1");
      if (o.metadata) q.set("metadata", "1");
      const r = await call(c, "DELETE", `/v1/domains/${enc(domain)}/checkpoints/${enc(name)}?${q}`);
      const d = r.body as { deleted: string[] };
      out(c, d, () => `Domain checkpoint ${name}${o.childrenOnly ? " children" : ""} deleted (${d.deleted.join(", ") || "none"})\n`);
    });
  program
    .command("events [domain]")
    .description("stream events (NDJSON with --json) until interrupted")
    .action(async (domain: string | undefined) => {
      const c = ctx();
      const e = await c.api.stream(`/v1/events${domain ? `?domain=${enc(domain)}` : ""}`, (line) => {
        if (c.json) process.stdout.write(`${line}\n`);
        else {
          try {
            const ev = JSON.parse(line) as { type: string; domain?: string; time: string; job?: JobInfoLike; message?: string };
            if (ev.type === "hello") return;
            const detail = ev.job
              ? `${ev.job.mode} ${ev.job.state}${ev.job.error ? `: ${ev.job.error}` : ""} ${mib(ev.job.bytesDone)}/${mib(ev.job.bytesTotal)}`
              : (ev.message ?? "");
            process.stdout.write(`${ev.time} ${ev.domain ?? "-"} ${ev.type} ${detail}\n`);
          } catch {
            process.stdout.write(`${line}\n`);
          }
        }
      });
      if (e !== undefined) throw new CliFailure(e.message, EXIT.unavailable);
    });
  return program;
}

export async function main(argv: readonly string[]): Promise<number> {
  let code: number = EXIT.ok;
  const program = buildCli((c) => {
    code = c;
  });
  program.exitOverride();
  for (const sub of program.commands) sub.exitOverride();
  try {
    await program.parseAsync([...argv], { from: "user" });
  } catch (e) {
    if (e instanceof CliFailure) {
      process.stderr.write(`qbackup: ${e.message}\n`);
      return e.exitCode;
    }
    if (e instanceof CommanderError) {
      // commander already printed its message (or the help)
      return e.exitCode === 0 ? EXIT.ok : EXIT.usage;
    }
    process.stderr.write(`qbackup: ${(e as Error).message}\n`);
    return EXIT.failed;
  }
  if (argv.length === 0) {
    program.outputHelp();
    return EXIT.usage;
  }
  return code;
}
