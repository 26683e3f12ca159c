/** Runs the built daemon (bin/qbackupd) and CLI (bin/qbackup) as a user would. */
import { type ChildProcess, execFile, spawn } from "node:child_process";
import { existsSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { Test } from "tap";
import { ApiClient } from "../../src/cli/client.js";
import { type Teardown, tempDir } from "./qemu.js";

const ROOT = join(import.meta.dirname, "..", "..");
/** Without the test runner's loaders. */
const ENV = { ...process.env, NODE_OPTIONS: "", QBACKUPD_LOG_LEVEL: process.env.QBACKUPD_DAEMON_LOG ?? "warn" };

export interface RunningDaemon {
  readonly socket: string;
  readonly stateDir: string;
  readonly dir: string;
  readonly proc: ChildProcess;
  log(): string;
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

export async function startDaemon(
  t: Teardown,
  opts: {
    args?: string[];
    dir?: string;
    env?: Record<string, string>;
    /** The program and its first arguments (default: bin/qbackupd). */
    command?: readonly string[];
    /** Another state directory than <dir>/state (another daemon's, say). */
    stateDir?: string;
    /** How long it may take to listen, and then to answer (ms each; a start that deals with leftovers takes longer). */
    readyMs?: number;
  } = {},
): Promise<RunningDaemon> {
  const dir = opts.dir ?? tempDir(t, "qbackupd-daemon-");
  const socket = join(dir, "api.sock");
  const stateDir = opts.stateDir ?? join(dir, "state");
  // an explicit (empty) configuration, so a host's /etc/qbackupd/config.json never leaks into tests
  const config = join(dir, "config.json");
  if (!existsSync(config)) writeFileSync(config, "{}\n");
  const [program, ...first] = opts.command ?? [join(ROOT, "bin", "qbackupd")];
  const proc = spawn(program!, [...first, "--socket", socket, "--state-dir", stateDir, "--config", config, ...(opts.args ?? [])], {
    env: { ...ENV, ...opts.env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let out = "";
  proc.stdout?.setEncoding("utf8").on("data", (d: string) => {
    if (out.length < 1 << 20) out += d;
  });
  proc.stderr?.setEncoding("utf8").on("data", (d: string) => {
    if (out.length < 1 << 20) out += d;
  });
  const exited = new Promise<number | null>((r) => proc.once("exit", (code) => r(code)));
  t.teardown(async () => {
    if (proc.exitCode === null && proc.signalCode === null) {
      proc.kill("SIGKILL");
      await exited;
    }
  });
  const tries = (opts.readyMs ?? 5000) / 25;
  for (let i = 0; i < tries && !existsSync(socket); i++) {
    if (proc.exitCode !== null) throw new Error(`qbackupd exited: ${out}`);
    await new Promise((r) => setTimeout(r, 25));
  }
  if (!existsSync(socket)) throw new Error(`qbackupd did not listen: ${out}`);
  // the socket file appears at bind(); the daemon is ready once it answers (and has set the socket's mode and group)
  const api = new ApiClient(socket);
  for (let i = 0; ; i++) {
    const r = await api.request("GET", "/v1/health");
    if ("status" in r && r.status === 200) break;
    if (i >= tries || proc.exitCode !== null) throw new Error(`qbackupd did not answer: ${out}`);
    await new Promise((r) => setTimeout(r, 25));
  }
  return {
    socket,
    stateDir,
    dir,
    proc,
    log: () => out,
    async stop(signal: NodeJS.Signals = "SIGTERM") {
      if (proc.exitCode !== null) return proc.exitCode;
      proc.kill(signal);
      return exited;
    },
  };
}

export interface DaemonExit {
  /** Exit status, or null when a signal ended it (or it still ran after `ms` and was killed). */
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
  /** It did not end by itself within `ms`. */
  readonly stillRunning: boolean;
  readonly output: string;
}

/** Run bin/qbackupd on `dir` (as startDaemon does) expecting it to end by itself within `ms`; kill it if it does not. */
export function runDaemonToExit(
  dir: string,
  opts: { stateDir?: string; env?: Record<string, string>; ms?: number } = {},
): Promise<DaemonExit> {
  const config = join(dir, "config.json");
  if (!existsSync(config)) writeFileSync(config, "{}\n");
  const args = ["--socket", join(dir, "api.sock"), "--state-dir", opts.stateDir ?? join(dir, "state"), "--config", config];
  const proc = spawn(join(ROOT, "bin", "qbackupd"), args, { env: { ...ENV, ...opts.env }, stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  proc.stdout.setEncoding("utf8").on("data", (d: string) => (out += d));
  proc.stderr.setEncoding("utf8").on("data", (d: string) => (out += d));
  return new Promise((resolve) => {
    let stillRunning = false;
    const timer = setTimeout(() => {
      stillRunning = true;
      proc.kill("SIGKILL");
    }, opts.ms ?? 10_000);
    proc.once("exit", (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stillRunning, output: out });
    });
  });
}

export interface CliResult {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

/** Run qbackup (`bin`: another copy of it, default bin/qbackup). */
export function cli(socket: string, args: string[], bin = join(ROOT, "bin", "qbackup")): Promise<CliResult> {
  return new Promise((resolve) => {
    execFile(bin, args, { env: { ...ENV, QBACKUP_SOCKET: socket } }, (err, stdout, stderr) => {
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr });
    });
  });
}

/**
 * qbackup on `socket`: `q` runs it, `ok` also asserts exit 0 (the message
 * carries its stderr); `lastFile` is the first disk's target of the
 * domain's last finished backup.
 */
export function cliOn(t: Pick<Test, "equal">, socket: string) {
  const q = (...args: string[]) => cli(socket, args);
  const ok = async (...args: string[]) => {
    const r = await q(...args);
    t.equal(r.code, 0, `qbackup ${args.join(" ")}: ${r.stderr.trim()}`);
    return r;
  };
  const lastFile = async (domain = "vm1") =>
    (JSON.parse((await ok("--json", "domjobinfo", domain, "--completed")).stdout) as { disks: { file: string }[] }).disks[0]?.file ?? "";
  return { q, ok, lastFile };
}

/** Writes a file (an XML request) into `dir`; its path. */
export function fileWriter(dir: string): (name: string, text: string) => string {
  return (name, text) => {
    const p = join(dir, name);
    writeFileSync(p, text);
    return p;
  };
}

/** Poll `fn` every 50 ms until it holds; throw after `ms`. */
export async function until(what: string, fn: () => Promise<boolean>, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (await fn()) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`timed out waiting for ${what}`);
}

/** Until the daemon lists the domain as connected. */
export async function connected(d: RunningDaemon, name: string): Promise<void> {
  await until(`${name} connected`, async () => {
    const r = await cli(d.socket, ["--json", "domain-list"]);
    return (
      r.code === 0 && (JSON.parse(r.stdout) as { name: string; state: string }[]).some((x) => x.name === name && x.state === "connected")
    );
  });
}

/** Register a domain and wait until the daemon has connected it. */
export async function addDomain(d: RunningDaemon, name: string, qmp: string, extra: string[] = []): Promise<void> {
  const added = await cli(d.socket, ["domain-add", name, "--qmp", qmp, ...extra]);
  if (added.code !== 0) throw new Error(`domain-add ${name}: ${added.stderr}`);
  await connected(d, name);
}
