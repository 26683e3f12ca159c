/**
 * Aborts racing begins through the daemon's API, as a careless script would:
 * a begin (push or pull, full or incremental, with or without a checkpoint,
 * rate-limited), then DELETE …/backup after a random 0–100 ms; every
 * `killEvery` rounds the daemon is killed (-9) at that moment instead and
 * started again. After every answer it checks what the answer claims:
 * "cancelled" means no node, job, export, NBD server, temporary bitmap,
 * target or scratch file of the job is left and no checkpoint claims it;
 * and at every round's end, nothing of ours is left in QEMU and every
 * checkpoint listed belongs to a backup that was not cancelled. Used by
 * scripts/abort-race (300 rounds) and, in a short form, by the test suite.
 */
import { existsSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { ApiClient, type ApiReply } from "../../src/cli/client.js";
import { cli, type RunningDaemon, startDaemon } from "../../test/helpers/daemon.js";
import { leftovers } from "../../test/helpers/domain.js";
import { type QemuProcess, startVm, type Teardown, tempDir } from "../../test/helpers/qemu.js";

const MiB = 1 << 20;

/** Every dirty bitmap's name on every named node (query-block would show a running backup's filter node instead of the disk's). */
async function bitmapNames(vm: QemuProcess): Promise<string[]> {
  const nodes = (await vm.monitor.execute("query-named-block-nodes", { flat: true }))._unsafeUnwrap();
  return nodes.flatMap((n) => (n["dirty-bitmaps"] ?? []).flatMap((b) => (b.name === undefined ? [] : [b.name])));
}

export interface AbortRaceResult {
  readonly rounds: number;
  readonly kills: number;
  /** How each round's abort was answered: cancelled, ready (a pull ended, or the job was done), no-job, … */
  readonly answers: Record<string, number>;
  readonly failures: string[];
}

interface JobBody {
  readonly state?: string;
  readonly code?: string;
  readonly checkpoint?: string;
}

/** A reproducible pseudo-random sequence (so a failing round can be run again). */
function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>> 0) / 2 ** 32;
  };
}

export async function abortRace(
  t: Teardown,
  opts: { rounds: number; killEvery: number; seed?: number; log?: (s: string) => void },
): Promise<AbortRaceResult> {
  const log = opts.log ?? (() => {});
  const rand = rng(opts.seed ?? 11);
  const vm = await startVm(t, { disks: [{ size: "16M" }, { size: "16M" }] });
  await vm.write(0, 0x51, 0, 4 * MiB);
  await vm.write(1, 0x52, 4 * MiB, 4 * MiB);
  const dir = tempDir(t, "qbackupd-race-");
  let d: RunningDaemon = await startDaemon(t, { dir });
  const failures: string[] = [];
  const answers: Record<string, number> = {};
  const fail = (round: number, what: string) => {
    failures.push(`round ${round}: ${what}`);
    log(`FAIL round ${round}: ${what}`);
  };
  const client = () => new ApiClient(d.socket);
  // every request bounded: an answer that never comes fails the run naming the request and round, not at tap's timeout
  let current = -1;
  const api = () => ({
    request: (method: string, path: string, body?: unknown) => {
      const c = client();
      let timer: NodeJS.Timeout | undefined;
      const late = new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`round ${current}: ${method} ${path} got no answer in 120 s`)), 120_000);
      });
      return Promise.race([c.request(method, path, body), late]).finally(() => clearTimeout(timer));
    },
  });
  const addOk = await cli(d.socket, ["domain-add", "vm", "--qmp", vm.qmpPath]);
  if (addOk.code !== 0) throw new Error(`domain-add: ${addOk.stderr}`);
  const base = await api().request("POST", "/v1/domains/vm/checkpoints", { xml: "<domaincheckpoint><name>base</name></domaincheckpoint>" });
  if (!("status" in base) || base.status >= 300) throw new Error(`checkpoint base: ${JSON.stringify(base)}`);
  const backups = join(dir, "state", "backups", "vm");
  const files = () =>
    existsSync(backups)
      ? readdirSync(backups)
          .filter((f) => !f.endsWith(".sock"))
          .sort()
      : [];
  const sock = join(dir, "state", "backups", "nbd.sock");
  /** Checkpoints whose backup was answered "cancelled": none of them may ever be listed. */
  const cancelledCps = new Set<string>();
  let kills = 0;

  const listCheckpoints = async (): Promise<string[]> => {
    const r = await api().request("GET", "/v1/domains/vm/checkpoints");
    return "status" in r && Array.isArray(r.body) ? (r.body as { name: string }[]).map((c) => c.name) : [];
  };
  const settle = async (round: number): Promise<void> => {
    // whatever the round left running ends now: a push completes at full speed, a pull is ended
    await api().request("PUT", "/v1/domains/vm/backup/bandwidth", { bandwidth: 0 });
    const w = await api().request("GET", "/v1/domains/vm/backup/wait?timeout=60");
    const j = "status" in w && w.status === 200 ? (w.body as JobBody) : undefined;
    if (j !== undefined && j.state === "ready") {
      const info = await api().request("GET", "/v1/domains/vm/backup");
      if ("status" in info && info.status === 200) {
        const e = await api().request("DELETE", "/v1/domains/vm/backup");
        if (!("status" in e) || e.status !== 200) fail(round, `ending the pull: ${JSON.stringify(e)}`);
      }
    }
  };
  const waitConnected = async (): Promise<void> => {
    for (let i = 0; i < 200; i++) {
      const r = await api().request("GET", "/v1/domains/vm");
      if ("status" in r && (r.body as { state?: string }).state === "connected") return;
      await sleep(50);
    }
    throw new Error("the restarted daemon did not connect to the VM");
  };

  for (let round = 0; round < opts.rounds; round++) {
    const pull = rand() < 0.5;
    const incremental = rand() < 0.5;
    const withCp = rand() < 0.7;
    const delay = Math.floor(rand() * 100);
    const kill = opts.killEvery > 0 && round % opts.killEvery === opts.killEvery - 1;
    const cp = `r${round}`;
    current = round;
    log(
      `round ${round}: ${pull ? "pull" : "push"}${incremental ? " incremental" : ""}${withCp ? " +checkpoint" : ""}, ${kill ? "kill" : "abort"} after ${delay} ms`,
    );
    const inc = incremental ? "<incremental>base</incremental>" : "";
    const backupXml = pull
      ? `<domainbackup mode='pull'>${inc}<server transport='unix' socket='${sock}'/></domainbackup>`
      : `<domainbackup>${inc}</domainbackup>`;
    await vm.write(round % 2, 0x60 + (round % 32), (round % 12) * MiB, MiB);
    const before = files();
    const begin = api().request("POST", "/v1/domains/vm/backup", {
      backupXml,
      ...(withCp ? { checkpointXml: `<domaincheckpoint><name>${cp}</name></domaincheckpoint>` } : {}),
      bandwidth: 2 * MiB,
    });
    await sleep(delay);
    if (kill) {
      await d.stop("SIGKILL");
      kills++;
      await begin;
      d = await startDaemon(t, { dir });
      await waitConnected();
      answers.killed = (answers.killed ?? 0) + 1;
      await settle(round);
    } else {
      const ab = (await api().request("DELETE", "/v1/domains/vm/backup")) as ApiReply | { code: string; message: string };
      const body = "status" in ab ? (ab.body as JobBody) : undefined;
      const answer = "status" in ab ? (ab.status === 200 ? (body?.state ?? "?") : (body?.code ?? String(ab.status))) : `error ${ab.code}`;
      answers[answer] = (answers[answer] ?? 0) + 1;
      if (answer === "cancelled") {
        // checked at the moment of the answer: it must already be true
        const left = await leftovers(vm.monitor);
        if (left.length > 0) fail(round, `answered cancelled with ${left.join(", ")} in QEMU`);
        if (withCp) {
          cancelledCps.add(cp);
          if ((await bitmapNames(vm)).includes(cp)) fail(round, `answered cancelled with checkpoint ${cp}'s bitmaps in QEMU`);
          if ((await listCheckpoints()).includes(cp)) fail(round, `answered cancelled with checkpoint ${cp} listed`);
        }
        const now = files();
        if (now.join() !== before.join())
          fail(round, `answered cancelled with files left: ${now.filter((f) => !before.includes(f)).join(", ")}`);
      } else if (answer !== "ready" && answer !== "no-job") fail(round, `abort answered ${answer}`);
      const b = await begin;
      if ("status" in b && b.status !== 201 && (b.body as JobBody).code !== "aborted")
        fail(round, `begin answered ${b.status} ${JSON.stringify(b.body)}`);
      await settle(round);
    }
    // the round is over: nothing of ours may be left, whatever happened
    const left = await leftovers(vm.monitor);
    if (left.length > 0) fail(round, `left in QEMU after the round: ${left.join(", ")}`);
    const listed = await listCheckpoints();
    for (const c of listed) if (cancelledCps.has(c)) fail(round, `checkpoint ${c} of a cancelled backup is listed`);
    const bitmaps = new Set(await bitmapNames(vm));
    for (const c of listed) if (!bitmaps.has(c)) fail(round, `checkpoint ${c} is listed without its bitmaps`);
    for (const b of bitmaps) if (b?.startsWith("r") && !listed.includes(b)) fail(round, `bitmap ${b} without a checkpoint`);
    if (existsSync(join(dir, "state", "jobs", "vm.json"))) fail(round, "a job record is left");
    const free = await vm.monitor.execute("nbd-server-start", { addr: { type: "unix", data: { path: join(vm.dir, "probe.sock") } } });
    if (free.isErr()) fail(round, `an NBD server is left: ${free.error.code}`);
    else await vm.monitor.execute("nbd-server-stop");
    // keep the chain short: checkpoints of finished backups go (their bitmaps with them)
    for (const c of listed) if (c !== "base") await api().request("DELETE", `/v1/domains/vm/checkpoints/${c}`);
    if (round % 10 === 9) log(`${round + 1} rounds: ${JSON.stringify(answers)}; ${failures.length} failures`);
  }
  return { rounds: opts.rounds, kills, answers, failures };
}
