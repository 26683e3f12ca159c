/** The daemon process: configured domains, SIGHUP reload, domains registered at run time survive a restart, SIGTERM. */
import { statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { cli, startDaemon, until } from "../helpers/daemon.js";
import { startVm, tempDir } from "../helpers/qemu.js";

async function names(socket: string): Promise<string[]> {
  const r = await cli(socket, ["--json", "domain-list"]);
  return (JSON.parse(r.stdout) as { name: string }[]).map((d) => d.name);
}

t.test("config domains, reload, persistence, stop", async (t) => {
  const [a, b, c] = await Promise.all([startVm(t), startVm(t), startVm(t)]);
  const dir = tempDir(t, "qbackupd-daemon-");
  const config = join(dir, "config.json");
  writeFileSync(config, JSON.stringify({ domains: [{ name: "a", qmp: a.qmpPath }] }));
  const d = await startDaemon(t, { dir });
  t.same(await names(d.socket), ["a"], "configured domain");
  t.equal((await cli(d.socket, ["domain-add", "b", "--qmp", b.qmpPath])).code, 0);
  writeFileSync(config, JSON.stringify({ domains: [{ name: "c", qmp: c.qmpPath }] }));
  d.proc.kill("SIGHUP");
  for (let i = 0; i < 100 && (await names(d.socket)).join() !== "b,c"; i++) await new Promise((r) => setTimeout(r, 50));
  t.same(await names(d.socket), ["b", "c"], "SIGHUP: a removed, c added, b (registered at run time) kept");
  writeFileSync(config, "{ broken");
  const logged = d.log().length;
  d.proc.kill("SIGHUP");
  // the refusal is logged once the daemon has handled the signal (the helper logs at warn and above)
  await until("the reload refused", async () => d.log().slice(logged).includes("reload refused: configuration invalid"));
  t.same(await names(d.socket), ["b", "c"], "an invalid configuration is refused; the daemon keeps running");
  t.equal(await d.stop("SIGTERM"), 0, "SIGTERM: clean exit");
  writeFileSync(config, "{}");
  const again = await startDaemon(t, { dir });
  t.same(await names(again.socket), ["b"], "a domain registered at run time survives a restart");
  t.equal((await cli(again.socket, ["domain-remove", "b"])).code, 0);
  await again.stop();
  const third = await startDaemon(t, { dir });
  t.same(await names(third.socket), [], "and its removal too");
});

t.test("the API socket's group comes from the configuration", async (t) => {
  const dir = tempDir(t, "qbackupd-daemon-");
  writeFileSync(join(dir, "config.json"), JSON.stringify({ socketGroup: "4242", socketMode: "0660" }));
  const d = await startDaemon(t, { dir });
  const st = statSync(d.socket);
  t.equal(st.gid, 4242);
  t.equal(st.mode & 0o777, 0o660);
});

t.test("domain-add returns once the domain is connected: a verb right after it works", async (t) => {
  const vm = await startVm(t);
  const d = await startDaemon(t);
  const add = await cli(d.socket, ["domain-add", "vm1", "--qmp", vm.qmpPath]);
  t.equal(add.code, 0, add.stderr);
  t.match(add.stdout, /added and connected/);
  const cp = await cli(d.socket, ["checkpoint-create-as", "vm1", "c1"]);
  t.equal(cp.code, 0, `no "not connected" race: ${cp.stderr}`);
});

t.test("domain-add says in one line why a domain is not connected; --no-wait keeps the old behaviour", async (t) => {
  const dir = tempDir(t, "qbackupd-daemon-");
  const d = await startDaemon(t);
  const missing = join(dir, "nope.sock");
  const add = await cli(d.socket, ["domain-add", "vm1", "--qmp", missing, "--timeout", "20"]);
  t.equal(add.code, 5, "exit code 5: QEMU unreachable");
  t.equal(add.stderr.trim().split("\n").length, 1, "one line");
  t.match(add.stderr, /domain 'vm1' is registered but not connected: .*(ENOENT|no such file)/i);
  const list = JSON.parse((await cli(d.socket, ["--json", "domain-list"])).stdout) as { name: string; error: string | null }[];
  t.match(list[0]?.error ?? "", /ENOENT|no such file/i, "domain-list shows the reason too");
  const start = Date.now();
  const quick = await cli(d.socket, ["domain-add", "vm2", "--qmp", missing, "--no-wait"]);
  t.equal(quick.code, 0, quick.stderr);
  t.ok(Date.now() - start < 10_000, "--no-wait does not wait for a connection");
  t.equal((await cli(d.socket, ["domain-add", "vm3", "--qmp", missing, "--timeout", "0"])).code, 2, "a bad --timeout is a usage error");
});
