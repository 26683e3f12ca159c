/**
 * A registered "QEMU" that answers every command with `{"return": {}}`: the
 * daemon (the built one, as a user runs it) must fail that domain with a
 * protocol error and go on serving the others — also after a restart with
 * both in domains.json, which once made it crash at every start.
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { parseDomainConfig } from "../../src/conf/config.js";
import { DomainRegistry } from "../../src/daemon/domains.js";
import { REQUIRED_COMMANDS } from "../../src/qmp/capabilities.js";
import { cli, connected, type RunningDaemon, startDaemon, until } from "../helpers/daemon.js";
import { reply, startFakeQmp } from "../helpers/fake-qmp.js";
import { mulberry32, nonsense, SAMPLES } from "../helpers/nonsense.js";
import { rangeHolds, silentLogger, startVm, tempDir } from "../helpers/qemu.js";

const MiB = 1024 * 1024;

interface Listed {
  name: string;
  state: string;
  error: string | null;
}

async function list(d: RunningDaemon): Promise<Listed[]> {
  const r = await cli(d.socket, ["--json", "domain-list"]);
  if (r.code !== 0) throw new Error(`domain-list: ${r.stderr}`);
  return JSON.parse(r.stdout) as Listed[];
}

/** Until the bad domain shows its protocol error. */
async function refused(d: RunningDaemon): Promise<Listed> {
  let bad: Listed | undefined;
  await until("the bad domain refused", async () => {
    bad = (await list(d)).find((x) => x.name === "bad");
    return bad?.state === "unsupported";
  });
  return bad!;
}

t.test("a peer answering {} to everything fails its own domain only, before and after a restart", async (t) => {
  const vm = await startVm(t, { disks: [{ size: "16M" }] });
  await vm.write(0, 0x5a, 0, 4 * MiB);
  const peer = await startFakeQmp(t, (cmd, p) => p.write(reply(cmd.id, {})));
  const d = await startDaemon(t);
  const good = await cli(d.socket, ["domain-add", "good", "--qmp", vm.qmpPath]);
  t.equal(good.code, 0, good.stderr);
  const bad = await cli(d.socket, ["domain-add", "bad", "--qmp", peer.path, "--timeout", "10"]);
  t.not(bad.code, 0, "domain-add says the bad one is not connected");
  t.match(bad.stderr, /registered but not connected: QMP protocol error: query-version answered with a reply of the wrong shape/);
  const listed = await refused(d);
  t.match(listed.error, /QMP protocol error: query-version answered with a reply of the wrong shape: return\.qemu: expected an object/);
  t.equal(d.proc.exitCode, null, "the daemon is running");

  const begin = await cli(d.socket, ["--json", "backup-begin", "good"]);
  t.equal(begin.code, 0, begin.stderr);
  const w = await cli(d.socket, ["--json", "wait", "good", "--timeout", "60"]);
  t.equal(w.code, 0, `${w.stdout}${w.stderr}`);
  const done = JSON.parse(w.stdout) as { state: string; disks: { file: string }[] };
  t.equal(done.state, "ready");
  t.ok(await rangeHolds(done.disks[0]!.file, "qcow2", 0x5a, 0, 4 * MiB), "the good domain's backup is byte-exact");

  t.equal(await d.stop(), 0, "a clean stop");
  const persisted = () =>
    (JSON.parse(readFileSync(join(d.stateDir, "domains.json"), "utf8")) as { name: string }[]).map((x) => x.name).sort();
  t.same(persisted(), ["bad", "good"]);

  // both in domains.json: the daemon starts, stays up, and serves the good one
  const d2 = await startDaemon(t, { dir: d.dir });
  await connected(d2, "good");
  t.match((await refused(d2)).error, /QMP protocol error/);
  const dialled = peer.negotiations.length;
  await new Promise((r) => setTimeout(r, 3000));
  t.equal(d2.proc.exitCode, null, "still running after 3 s");
  // redialled with backoff (200 ms, 400, 800, 1600…), not every 200 ms
  t.ok(peer.negotiations.length - dialled <= 5, `the bad peer redialled ${peer.negotiations.length - dialled} times in 3 s`);
  t.same(
    (await list(d2)).map((x) => [x.name, x.state]),
    [
      ["bad", "unsupported"],
      ["good", "connected"],
    ],
  );
  t.same(persisted(), ["bad", "good"], "domains.json still lists both");
  const again = await cli(d2.socket, ["--json", "backup-begin", "good"]);
  t.equal(again.code, 0, again.stderr);
  t.equal((await cli(d2.socket, ["wait", "good", "--timeout", "60"])).code, 0);
  t.equal(await d2.stop(), 0);
});

t.test("a throw while a domain connects fails that domain, not the process", async (t) => {
  const rejections: unknown[] = [];
  const onRejection = (e: unknown) => rejections.push(e);
  process.on("unhandledRejection", onRejection);
  t.teardown(() => process.off("unhandledRejection", onRejection));
  // a peer good enough to pass the probe and the claim
  const peer = await startFakeQmp(t, (cmd, p) => {
    const answers: Record<string, unknown> = {
      "query-version": { qemu: { major: 7, minor: 2, micro: 0 }, package: "fake-for-a-throw" },
      "query-qmp-schema": REQUIRED_COMMANDS.map((name) => ({ name, "meta-type": "command" })),
      "qom-list": [],
    };
    p.write(reply(cmd.id, answers[cmd.execute] ?? {}));
  });
  const stateDir = tempDir(t);
  // stands for a bug in job adoption or cleanup: code past the QMP checks that throws
  const registry = new DomainRegistry(
    stateDir,
    silentLogger,
    () => {},
    async () => {
      throw new Error("boom in onConnect");
    },
  );
  t.teardown(() => registry.stopAll());
  const d = (await registry.add(parseDomainConfig({ name: "vm1", qmp: peer.path }, "test")._unsafeUnwrap(), "config"))._unsafeUnwrap();
  await d.settled(5000);
  await new Promise((r) => setTimeout(r, 50));
  t.same(rejections, [], "no unhandled rejection");
  t.equal(d.state, "unsupported");
  t.match(d.error, /boom in onConnect/);
});

t.test("fuzz through the daemon: a peer that passes the probe, then answers at random, never brings it down", async (t) => {
  const seed = Number(process.env.QBACKUPD_FUZZ_SEED ?? 1202);
  const rnd = mulberry32(seed);
  const schema = REQUIRED_COMMANDS.map((name) => ({ name, "meta-type": "command" }));
  const peer = await startFakeQmp(t, (cmd, p) => {
    let v: unknown;
    if (cmd.execute === "query-version") v = { qemu: { major: 7, minor: 2, micro: 0 }, package: `fuzz-${seed}` };
    else if (cmd.execute === "query-qmp-schema") v = schema;
    else if (rnd() < 0.05) v = nonsense(cmd.execute, rnd);
    else v = SAMPLES[cmd.execute as keyof typeof SAMPLES] ?? {};
    p.write(reply(cmd.id, v));
  });
  const d = await startDaemon(t);
  t.equal((await cli(d.socket, ["domain-add", "fz", "--qmp", peer.path, "--no-wait"])).code, 0);
  const end = Date.now() + 10_000;
  const codes = new Map<string, Set<number>>();
  while (Date.now() < end) {
    for (const args of [
      ["backup-begin", "fz"],
      ["checkpoint-create-as", "fz"],
      ["checkpoint-list", "fz"],
      ["domjobinfo", "fz"],
      ["domjobabort", "fz"],
      ["domain-list"],
    ]) {
      const r = await cli(d.socket, args);
      const seen = codes.get(args[0]!) ?? new Set<number>();
      seen.add(r.code);
      codes.set(args[0]!, seen);
      t.equal(d.proc.exitCode, null, `seed ${seed}: the daemon is up after ${args.join(" ")}`);
      if (d.proc.exitCode !== null) break;
    }
    if (d.proc.exitCode !== null) break;
  }
  t.comment(
    `seed ${seed}: ${peer.received.length} commands answered; exit codes ${JSON.stringify([...codes].map(([k, v]) => [k, [...v]]))}`,
  );
  t.ok(peer.received.length > 30, `the peer was asked ${peer.received.length} commands`);
  if (process.env.QBACKUPD_FUZZ_LOG) (await import("node:fs")).writeFileSync(process.env.QBACKUPD_FUZZ_LOG, d.log());
  t.notMatch(d.log(), /TypeError|RangeError|Unhandled|uncaught/i, "nothing thrown in the daemon's log");
  t.equal(await d.stop(), 0, "a clean stop");
});
