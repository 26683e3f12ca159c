/**
 * `qbackup`: the command-line client of qbackupd, with virsh's verbs and
 * virsh's behaviour where virsh has the verb (differences kept are listed in
 * the README with their reasons). Human output by default, --json for
 * scripts; errors are one line on stderr (under --json one JSON object
 * {code,message}); exit codes from exit-codes.ts. It never changes anything
 * but through the daemon's API.
 */
import { readFileSync } from "node:fs";
import { Command, CommanderError } from "commander";
import { escapeText } from "../conf/escape.js";
import { packageVersion } from "../version.js";
import {
  type CheckpointRow,
  checkpointListSelect,
  checkpointTreeRender,
  type ListOptions,
  localTime,
  volatileDisks,
} from "./checkpoint-list.js";
import { ApiClient, type ApiReply, isCallError } from "./client.js";
import { bashCompletion, manPage } from "./docs.js";
import { EXIT, EXIT_MEANING, exitCodeForStatus } from "./exit-codes.js";
import { diskTarget, type JobInfoLike, jobText, jobType, progressBar } from "./jobinfo.js";
import { registerSetVerbs } from "./sets.js";
import { sizeFormat, sizeParse } from "./units.js";

const DEFAULT_SOCKET = "/run/qbackupd/qbackupd.sock";

/** A failure the CLI reports: `code` is the daemon's error code, or the CLI's own (usage, unreachable, timeout). */
class CliFailure extends Error {
  constructor(
    message: string,
    readonly exitCode: number,
    readonly code: string = codeForExit(exitCode),
  ) {
    super(message);
  }
}

function codeForExit(exit: number): string {
  switch (exit) {
    case EXIT.usage:
      return "usage";
    case EXIT.notFound:
      return "not-found";
    case EXIT.conflict:
      return "conflict";
    case EXIT.unavailable:
      return "unreachable";
    case EXIT.timeout:
      return "timeout";
    default:
      return "failed";
  }
}

/** A size argument with units (virsh's scaled integers); a usage error otherwise. */
function sizeArg(v: string): number {
  const r = sizeParse(v);
  if (r.isErr()) throw new CliFailure(r.error.message, EXIT.usage);
  return r.value;
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

/** Any answer of the daemon, errors included; only an unreachable daemon throws. */
async function ask(ctx: Ctx, method: string, path: string, body?: unknown): Promise<ApiReply> {
  const r = await ctx.api.request(method, path, body);
  if (isCallError(r)) throw new CliFailure(r.message, EXIT.unavailable, r.code);
  return r;
}

function failureOf(r: ApiReply): CliFailure {
  const b = r.body as { message?: string; code?: string };
  const message = typeof b === "object" && b !== null && typeof b.message === "string" ? b.message : r.text;
  const code = typeof b === "object" && b !== null && typeof b.code === "string" ? b.code : undefined;
  return new CliFailure(message, exitCodeForStatus(r.status), code);
}

const errorCode = (r: ApiReply): string | undefined => {
  const b = r.body as { code?: unknown };
  return typeof b === "object" && b !== null && typeof b.code === "string" ? b.code : undefined;
};

async function call(ctx: Ctx, method: string, path: string, body?: unknown): Promise<ApiReply> {
  const r = await ask(ctx, method, path, body);
  if (r.status >= 400) throw failureOf(r);
  return r;
}

const enc = encodeURIComponent;

function out(ctx: Ctx, value: unknown, human: () => string): void {
  process.stdout.write(ctx.json ? `${JSON.stringify(value, null, 2)}\n` : human());
}

/** virsh's vshTable layout: each cell after one space, columns three spaces apart, a rule of dashes. */
function table(header: string[], rows: string[][]): string {
  const w = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)));
  const line = (r: string[]) =>
    r
      .map((c, i) => ` ${c.padEnd(w[i]!)}`)
      .join("  ")
      .trimEnd();
  return `${[line(header), "-".repeat(w.reduce((a, x) => a + x + 3, 0)), ...rows.map(line)].join("\n")}\n`;
}

function settledExit(j: JobInfoLike): number {
  return j.state === "ready" ? EXIT.ok : EXIT.failed;
}

const settledText = (j: JobInfoLike) => `backup ${j.state}${j.error ? `: ${j.error}` : ""} (job ${j.id})\n`;

/**
 * Wait for the running backup (or, with `job`, for that job only) to settle.
 * Without `job` and with nothing running, the daemon's wait answers: the
 * last finished backup (a job may settle before `wait` starts), unless the
 * domain's latest begin was refused, which makes it "not found": an older
 * job's outcome is never the answer to a refused begin. Once a running job
 * was seen, this wait is for that job (as with `job`). With `job`, another
 * job's outcome never is the answer either.
 */
async function waitVerb(ctx: Ctx, domain: string, timeoutS: number | undefined, job: string | undefined): Promise<number> {
  const deadline = timeoutS === undefined ? Number.POSITIVE_INFINITY : Date.now() + timeoutS * 1000;
  const tty = process.stdout.isTTY === true && !ctx.json;
  // the job this wait is for: asked for, or the first seen running
  let target = job;
  const notThatJob = (found: string | undefined) =>
    new CliFailure(
      `backup job '${target}' is neither running nor the last finished one on '${domain}'${found === undefined ? "" : ` (that is '${found}')`}`,
      EXIT.notFound,
      "no-job",
    );
  let drawn = false;
  for (;;) {
    const left = deadline - Date.now();
    if (left <= 0) {
      // the message goes on its own line, not after the progress bar
      if (drawn) process.stdout.write("\n");
      throw new CliFailure(`timed out waiting for the backup on '${domain}'`, EXIT.timeout);
    }
    const r = await ask(ctx, "GET", `/v1/domains/${enc(domain)}/backup`);
    const running = r.status < 400 ? (r.body as JobInfoLike) : undefined;
    if (r.status >= 400 && errorCode(r) !== "no-job") throw failureOf(r);
    if (running === undefined && target === undefined) {
      // nothing running and no job in view: the daemon says what the answer is (the last finished job, or none)
      const w = await ask(ctx, "GET", `/v1/domains/${enc(domain)}/backup/wait?timeout=0`);
      if (w.status >= 400 && errorCode(w) === "timeout") continue; // a job started meanwhile: follow it
      if (w.status >= 400) throw failureOf(w);
      const j = w.body as JobInfoLike;
      if (drawn) process.stdout.write(`${progressBar(j)}\n`);
      out(ctx, j, () => settledText(j));
      return settledExit(j);
    }
    if (running !== undefined && target === undefined) target = running.id;
    if (running === undefined || running.id !== target) {
      // nothing running (or another job): the last finished one, if it is the one this wait is for
      const done = await ask(ctx, "GET", `/v1/domains/${enc(domain)}/backup?completed=1`);
      if (done.status >= 400) {
        if (errorCode(done) === "no-job") throw notThatJob(running?.id);
        throw failureOf(done);
      }
      const j = done.body as JobInfoLike;
      if (j.id !== target) throw notThatJob(running?.id ?? j.id);
      // the bar's last frame is the finished job's, not the last one polled (91% before "backup ready")
      if (drawn) process.stdout.write(`${progressBar(j)}\n`);
      out(ctx, j, () => settledText(j));
      return settledExit(j);
    }
    const j = running;
    if (j.state === "ready" || j.state === "failed" || j.state === "cancelled") {
      if (tty) process.stdout.write(`${progressBar(j)}\n`);
      out(ctx, j, () => settledText(j));
      return settledExit(j);
    }
    if (tty) {
      process.stdout.write(progressBar(j));
      drawn = true;
      await new Promise((res) => setTimeout(res, 250));
    } else {
      // long poll: the daemon answers as soon as the job settles
      const slice = Math.min(30, Math.max(0, Math.ceil(left / 1000)));
      const w = await ctx.api.request("GET", `/v1/domains/${enc(domain)}/backup/wait?timeout=${Number.isFinite(slice) ? slice : 30}`);
      if (isCallError(w)) throw new CliFailure(w.message, EXIT.unavailable, w.code);
    }
  }
}

/** `--disk vda=/images/vda.qcow2[,format=raw]` → the API's disk object. */
function diskArg(v: string): { name: string; file: string; format: string } {
  const m = /^([^=,]+)=([^,]+)(?:,format=(qcow2|raw))?$/.exec(v);
  if (m === null) throw new CliFailure(`--disk '${v}': expected DEV=FILE[,format=qcow2|raw]`, EXIT.usage);
  return { name: m[1]!, file: m[2]!, format: m[3] ?? "qcow2" };
}

/** Set by main() from the raw arguments, before commander parses them (its own errors come first). */
let jsonErrors = false;
/** The raw arguments: commander folds --leaves and --no-leaves into one value, virsh applies both. */
let rawArgs: readonly string[] = [];

export function buildCli(setExit: (code: number) => void): Command {
  const program = new Command("qbackup");
  program
    .description("Command-line client of qbackupd, the QEMU backup daemon")
    .option("--socket <path>", "daemon socket (also $QBACKUP_SOCKET)", process.env.QBACKUP_SOCKET ?? DEFAULT_SOCKET)
    .option("--json", "machine-readable output (errors too: one JSON object {code,message} on stderr)", false)
    .version(packageVersion(), "-V, --version", "print the version")
    .showHelpAfterError(false)
    .configureOutput({
      writeErr: (s) => process.stderr.write(s),
      // under --json, main() reports commander's errors as JSON instead
      outputError: (s, write) => {
        if (!jsonErrors) write(s);
      },
    });
  const ctx = (): Ctx => {
    const o = program.opts<{ socket: string; json: boolean }>();
    return { api: new ApiClient(o.socket), json: o.json };
  };

  program
    .command("domain-add <name>")
    .description("register a domain (without --qmp: its --disk images only, backed up offline)")
    .option("--qmp <path>", "QMP socket path (or host:port)")
    .option(
      "--disk <dev=file[,format=qcow2|raw]>",
      "a disk's image, for a VM qbackupd never saw run (repeatable)",
      (v: string, acc: string[]) => [...acc, v],
      [] as string[],
    )
    .option("--agent <path>", "guest agent socket (for --quiesce)")
    .option("--qemu-user <uid:gid>", "QEMU runs as this user (default: the QMP socket's owner)")
    .option("--no-wait", "return at once, without waiting for the daemon to connect to QEMU")
    .option("--timeout <seconds>", "how long to wait for the connection", "30")
    .action(
      async (name: string, o: { qmp?: string; disk: string[]; agent?: string; qemuUser?: string; wait: boolean; timeout: string }) => {
        const c = ctx();
        const secs = Number(o.timeout);
        if (!Number.isFinite(secs) || secs <= 0 || secs > 300) throw new CliFailure("--timeout takes seconds from 1 to 300", EXIT.usage);
        if (o.qmp === undefined && o.disk.length === 0) throw new CliFailure("domain-add needs --qmp, --disk or both", EXIT.usage);
        const disks = o.disk.map(diskArg);
        // without QMP there is nothing to connect to
        const wait = o.wait && o.qmp !== undefined;
        const r = await call(c, "POST", `/v1/domains${wait ? `?wait=${secs}` : ""}`, {
          name,
          ...(o.qmp !== undefined ? { qmp: o.qmp } : {}),
          ...(disks.length > 0 ? { disks } : {}),
          ...(o.agent ? { agent: o.agent } : {}),
          ...(o.qemuUser ? { qemuUser: o.qemuUser } : {}),
        });
        const d = r.body as { state: string; error: string | null };
        if (wait && d.state !== "connected") {
          const why = d.error ?? `still connecting after ${secs} s`;
          throw new CliFailure(
            `domain '${name}' is registered but not connected: ${why} (the daemon keeps retrying; domain-remove to drop it)`,
            d.error === null ? EXIT.timeout : EXIT.unavailable,
          );
        }
        out(c, r.body, () =>
          wait ? `Domain ${name} added and connected\n` : `Domain ${name} added${o.qmp === undefined ? " (offline)" : ""}\n`,
        );
      },
    );
  program
    .command("domain-list")
    .description("list domains")
    .action(async () => {
      const c = ctx();
      const r = await call(c, "GET", "/v1/domains");
      const list = r.body as { name: string; state: string; qmp: string | null; checkpoints: number; currentCheckpoint: string | null }[];
      out(c, list, () =>
        table(
          ["Name", "State", "Checkpoints", "Current", "QMP"],
          list.map((d) => [d.name, d.state, String(d.checkpoints), d.currentCheckpoint ?? "-", d.qmp ?? "-"]),
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
    .option("--bandwidth <size>", "per-disk limit per second: bytes, or with a unit (64K, 100M, 1.5GiB)", sizeArg)
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
        out(
          c,
          j,
          () =>
            `Backup started (${j.mode}, job ${j.id})${j.nbd ? `: NBD server ${j.nbd}` : ""}\n${j.disks.map((d) => `  ${d.name}: ${diskTarget(j, d)}\n`).join("")}`,
        );
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
    .description("state and progress of the running backup (Job type: None when there is none, as virsh)")
    .option("--completed", "the last finished backup instead")
    .action(async (domain: string, o: { completed?: boolean }) => {
      const c = ctx();
      const r = await ask(c, "GET", `/v1/domains/${enc(domain)}/backup${o.completed ? "?completed=1" : ""}`);
      if (r.status >= 400 && errorCode(r) !== "no-job") throw failureOf(r);
      const j = r.status >= 400 ? undefined : (r.body as JobInfoLike);
      out(c, j === undefined ? { type: "None" } : { ...j, type: jobType(j) }, () => jobText(j));
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
    .command("set-bandwidth <domain> <bandwidth>")
    .description("change the running backup's per-disk limit per second (bytes or with a unit: 100M, 1.5GiB; 0: none)")
    .action(async (domain: string, bw: string) => {
      const c = ctx();
      const r = await call(c, "PUT", `/v1/domains/${enc(domain)}/backup/bandwidth`, { bandwidth: sizeArg(bw) });
      const b = r.body as { bandwidth: number };
      out(c, b, () => (b.bandwidth === 0 ? "Bandwidth unlimited\n" : `Bandwidth set to ${sizeFormat(b.bandwidth)}/s\n`));
    });
  program
    .command("wait <domain>")
    .description("wait until the backup is ready (push: complete; pull: exports served)")
    .option("--timeout <seconds>", "give up after this long", (v) => Number(v))
    .option("--job <id>", "only this job (backup-begin prints its id): another job's outcome is never the answer")
    .action(async (domain: string, o: { timeout?: number; job?: string }) => {
      if (o.timeout !== undefined && (!Number.isFinite(o.timeout) || o.timeout < 0))
        throw new CliFailure("--timeout takes seconds", EXIT.usage);
      setExit(await waitVerb(ctx(), domain, o.timeout, o.job));
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
    .command("checkpoint-create-as <domain> [name] [description]")
    .description("create a checkpoint from a name and description (both also as --name, --description, as virsh)")
    .option("--name <name>", "name")
    .option("--description <text>", "description")
    .option("--print-xml", "print the XML instead of creating the checkpoint")
    .option("--quiesce", "freeze guest filesystems through the guest agent")
    .action(
      async (
        domain: string,
        posName: string | undefined,
        posDesc: string | undefined,
        o: { name?: string; description?: string; printXml?: boolean; quiesce?: boolean },
      ) => {
        if (posName !== undefined && o.name !== undefined) throw new CliFailure("the name is given twice", EXIT.usage);
        if (posDesc !== undefined && o.description !== undefined) throw new CliFailure("the description is given twice", EXIT.usage);
        const name = posName ?? o.name;
        const description = posDesc ?? o.description;
        const c = ctx();
        const xml = `<domaincheckpoint>${name !== undefined ? `<name>${escapeText(name)}</name>` : ""}${description !== undefined ? `<description>${escapeText(description)}</description>` : ""}</domaincheckpoint>`;
        if (o.printXml) {
          out(c, { xml }, () => `${xml}\n`);
          return;
        }
        const r = await call(c, "POST", `/v1/domains/${enc(domain)}/checkpoints`, { xml, quiesce: o.quiesce === true });
        const cp = r.body as { name: string };
        out(c, cp, () => `Domain checkpoint ${cp.name} created\n`);
      },
    );
  program
    .command("checkpoint-list <domain>")
    .description("list checkpoints, sorted by name (filters combine as virsh's)")
    .option("--name", "names only, one per line")
    .option("--tree", "the hierarchy")
    .option("--roots", "only checkpoints without a parent")
    .option("--leaves", "only checkpoints without children")
    .option("--no-leaves", "only checkpoints with children")
    .option("--topological", "parents before children instead of by name")
    .option("--parent", "show each checkpoint's parent")
    .option("--from <name>", "children of this checkpoint")
    .option("--descendants", "with --from: all levels, not only children")
    .action(async (domain: string, o: Record<string, boolean | string | undefined>) => {
      // commander folds --leaves/--no-leaves into one "leaves" (the last wins); virsh applies both filters
      const both = rawArgs.includes("--leaves") && rawArgs.includes("--no-leaves");
      const opts: ListOptions = {
        name: o.name === true,
        tree: o.tree === true,
        roots: o.roots === true,
        leaves: o.leaves === true || both,
        noLeaves: o.leaves === false || both,
        topological: o.topological === true,
        parent: o.parent === true,
        from: typeof o.from === "string" ? o.from : undefined,
        descendants: o.descendants === true,
      };
      const c = ctx();
      const r = await call(c, "GET", `/v1/domains/${enc(domain)}/checkpoints`);
      const sel = checkpointListSelect(r.body as CheckpointRow[], opts);
      if (sel.isErr())
        throw new CliFailure(
          sel.error.code === "not-found" ? `${sel.error.message} in domain '${domain}'` : sel.error.message,
          sel.error.code === "usage" ? EXIT.usage : EXIT.notFound,
          sel.error.code,
        );
      const list = sel.value;
      if (opts.tree) {
        const text = checkpointTreeRender(list, opts.from);
        out(c, { tree: text }, () => text);
        return;
      }
      if (opts.name) {
        out(
          c,
          list.map((x) => x.name),
          () => list.map((x) => `${x.name}\n`).join(""),
        );
        return;
      }
      // a column of its own only where a listed checkpoint has volatile bitmaps (raw disks): the virsh table otherwise
      const volatileColumn = list.some((x) => volatileDisks(x).length > 0);
      const header = ["Name", "Creation Time", ...(opts.parent ? ["Parent"] : []), "Valid", ...(volatileColumn ? ["Volatile"] : [])];
      out(c, list, () =>
        table(
          header,
          list.map((x) => [
            `${x.name}${x.current ? " *" : ""}`,
            localTime(x.creationTime),
            ...(opts.parent ? [x.parent ?? ""] : []),
            x.valid === null ? "unknown" : x.valid ? "yes" : "NO",
            ...(volatileColumn ? [volatileDisks(x).join(",") || "-"] : []),
          ]),
        ),
      );
    });
  program
    .command("checkpoint-info <domain> <name>")
    .description("a checkpoint's name, domain, parent, number of children and descendants")
    .action(async (domain: string, name: string) => {
      const c = ctx();
      const r = await call(c, "GET", `/v1/domains/${enc(domain)}/checkpoints`);
      const all = r.body as CheckpointRow[];
      const cp = all.find((x) => x.name === name);
      if (cp === undefined) throw new CliFailure(`checkpoint '${name}' does not exist in domain '${domain}'`, EXIT.notFound, "not-found");
      const children = checkpointListSelect(all, { from: name })._unsafeUnwrap().length;
      const descendants = checkpointListSelect(all, { from: name, descendants: true })._unsafeUnwrap().length;
      const info = { name, domain, parent: cp.parent, children, descendants };
      const row = (k: string, v: string) => `${`${k}:`.padEnd(15)} ${v}\n`;
      out(
        c,
        info,
        () =>
          `${row("Name", name)}${row("Domain", domain)}${row("Parent", cp.parent ?? "-")}${row("Children", String(children))}${row("Descendants", String(descendants))}`,
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
  registerSetVerbs(program, {
    ctx,
    call,
    ask,
    out,
    table,
    fail: (m, exit, code) => new CliFailure(m, exit, code),
    sizeArg,
    setExit,
  });

  program
    .command("events [domain]")
    .description("stream events (NDJSON with --json) until interrupted or --timeout")
    .option("--timeout <seconds>", "stop after this long (exit 0)", (v) => Number(v))
    .action(async (domain: string | undefined, o: { timeout?: number }) => {
      if (o.timeout !== undefined && (!Number.isFinite(o.timeout) || o.timeout <= 0))
        throw new CliFailure("--timeout takes seconds", EXIT.usage);
      const c = ctx();
      // an unknown domain would stream nothing, forever: virsh refuses it at once
      if (domain !== undefined) await call(c, "GET", `/v1/domains/${enc(domain)}`);
      const e = await c.api.stream(
        `/v1/events${domain ? `?domain=${enc(domain)}` : ""}`,
        (line) => {
          if (c.json) process.stdout.write(`${line}\n`);
          else {
            try {
              const ev = JSON.parse(line) as { type: string; domain?: string; time: string; job?: JobInfoLike; message?: string };
              if (ev.type === "hello") return;
              const detail = ev.job
                ? `${ev.job.mode} ${ev.job.state}${ev.job.error ? `: ${ev.job.error}` : ""} ${sizeFormat(ev.job.bytesDone)}/${sizeFormat(ev.job.bytesTotal)}`
                : (ev.message ?? "");
              process.stdout.write(`${ev.time} ${ev.domain ?? "-"} ${ev.type} ${detail}\n`);
            } catch {
              process.stdout.write(`${line}\n`);
            }
          }
        },
        o.timeout === undefined ? undefined : o.timeout * 1000,
      );
      if (e !== undefined) throw new CliFailure(e.message, EXIT.unavailable, e.code);
    });
  program
    .command("completion <shell>")
    .description(
      "print a completion script (bash), generated from these definitions: source it, or install it in /usr/share/bash-completion/completions/qbackup",
    )
    .action((shell: string) => {
      if (shell !== "bash") throw new CliFailure(`no completion for '${shell}' (bash only)`, EXIT.usage);
      process.stdout.write(bashCompletion(program));
    });
  program
    .command("manpage")
    .description("print the man page (roff), generated from these definitions: man -l <(qbackup manpage)")
    .action(() => {
      process.stdout.write(manPage(program, packageVersion(), EXIT_MEANING));
    });
  return program;
}

/**
 * `export DIR DISK --socket PATH`: that --socket is the NBD server's, not the
 * daemon's (the program's own --socket, which commander would take it for,
 * goes before the verb). Renamed to the export's --nbd-socket before parsing.
 */
function exportSocketArgs(argv: readonly string[]): string[] {
  const verb = argv.indexOf("export");
  if (verb < 0) return [...argv];
  return argv.map((a, i) =>
    i <= verb ? a : a === "--socket" ? "--nbd-socket" : a.startsWith("--socket=") ? `--nbd-socket=${a.slice(9)}` : a,
  );
}

export async function main(argv: readonly string[]): Promise<number> {
  let code: number = EXIT.ok;
  jsonErrors = argv.includes("--json");
  rawArgs = argv;
  const fail = (e: { code: string; message: string }) =>
    process.stderr.write(jsonErrors ? `${JSON.stringify({ code: e.code, message: e.message })}\n` : `qbackup: ${e.message}\n`);
  const program = buildCli((c) => {
    code = c;
  });
  program.exitOverride();
  for (const sub of program.commands) sub.exitOverride();
  try {
    await program.parseAsync(exportSocketArgs(argv), { from: "user" });
  } catch (e) {
    if (e instanceof CliFailure) {
      fail(e);
      return e.exitCode;
    }
    if (e instanceof CommanderError) {
      // commander already printed its message (or the help, or the version); under --json it kept its error for us
      if (e.exitCode === 0) return EXIT.ok;
      if (jsonErrors) fail({ code: "usage", message: e.message.replace(/^error: /, "") });
      return EXIT.usage;
    }
    fail({ code: "failed", message: (e as Error).message });
    return EXIT.failed;
  }
  if (argv.length === 0) {
    program.outputHelp();
    return EXIT.usage;
  }
  return code;
}
