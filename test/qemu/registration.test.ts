/**
 * One QEMU, two registrations (its second QMP monitor added under another
 * name while the first backs up): the second is refused, recognised by the
 * marker the first left in QEMU (src/daemon/ownership.ts), and nothing of the
 * first's backup is touched: its names carry its own domain tag, so no
 * start-up cleanup of another domain can take them for its leftovers.
 */
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { claimQemu } from "../../src/daemon/ownership.js";
import { QmpClient } from "../../src/qmp/index.js";
import { addDomain, cli, connected, startDaemon, until } from "../helpers/daemon.js";
import { leftovers } from "../helpers/domain.js";
import { reply, startFakeQmp } from "../helpers/fake-qmp.js";
import { rangeHolds, silentLogger, startVm, tempDir } from "../helpers/qemu.js";

const MiB = 1024 * 1024;

t.test("a second registration of a QEMU that backs up is refused; the backup is untouched", async (t) => {
  const dir = tempDir(t);
  const third = join(dir, "third.sock");
  const vm = await startVm(t, { disks: [{ size: "16M" }], extraArgs: ["-qmp", `unix:${third},server=on,wait=off`] });
  await vm.write(0, 0x3c, 0, 8 * MiB);
  const d = await startDaemon(t);
  await addDomain(d, "vm1", vm.qmpPath);
  const begin = await cli(d.socket, ["--json", "backup-begin", "vm1", "--bandwidth", String(2 * MiB)]);
  t.equal(begin.code, 0, begin.stderr);
  const add = await cli(d.socket, ["domain-add", "vmB", "--qmp", third]);
  t.equal(add.code, 5, "refused: exit code 5");
  t.match(add.stderr, /vmB' is registered but not connected: this QEMU is already registered as domain 'vm1'/);
  const w = await cli(d.socket, ["--json", "wait", "vm1", "--timeout", "60"]);
  t.equal(w.code, 0, `vm1's backup was not disturbed: ${w.stdout}${w.stderr}`);
  const done = JSON.parse(w.stdout) as { state: string; disks: { file: string }[] };
  t.equal(done.state, "ready");
  t.ok(await rangeHolds(done.disks[0]!.file, "qcow2", 0x3c, 0, 8 * MiB), "byte-exact");
  t.same(await leftovers(vm.monitor), [], "nothing left in QEMU");
  // once vm1 is removed (its marker with it), vmB can have the QEMU
  t.equal((await cli(d.socket, ["domain-remove", "vmB"])).code, 0);
  t.equal((await cli(d.socket, ["domain-remove", "vm1"])).code, 0);
  const again = await cli(d.socket, ["domain-add", "vmB", "--qmp", third]);
  t.equal(again.code, 0, again.stderr);
  const objs = (await vm.monitor.execute("qom-list", { path: "/objects" }))._unsafeUnwrap().map((o) => o.name);
  t.equal(objs.filter((n) => n.startsWith("qbk-owner-")).length, 1, "one marker: vmB's");
});

t.test("a marker of a domain no longer registered is taken over", async (t) => {
  const vm = await startVm(t, { disks: [{ size: "16M" }] });
  (await vm.monitor.execute("object-add", { "qom-type": "secret", id: "qbk-owner-abcdef", data: "x" }))._unsafeUnwrap();
  const d = await startDaemon(t);
  const add = await cli(d.socket, ["domain-add", "vm1", "--qmp", vm.qmpPath]);
  t.equal(add.code, 0, add.stderr);
  const objs = (await vm.monitor.execute("qom-list", { path: "/objects" }))._unsafeUnwrap().map((o) => o.name);
  t.notOk(objs.includes("qbk-owner-abcdef"), "the stale marker is gone");
  t.equal(objs.filter((n) => n.startsWith("qbk-owner-")).length, 1, "ours is there");
  // a restart of the daemon finds its own marker and connects
  await d.stop();
  const d2 = await startDaemon(t, { dir: d.dir });
  await connected(d2, "vm1");
  t.pass("after a restart the domain finds its own marker and connects");
});

t.test("two registrations of one QEMU connecting at once: never both connected", async (t) => {
  for (let round = 0; round < 5; round++) {
    const dir = tempDir(t, "qbackupd-daemon-");
    const second = join(dir, "second.sock");
    const vm = await startVm(t, { disks: [{ size: "16M" }], extraArgs: ["-qmp", `unix:${second},server=on,wait=off`] });
    writeFileSync(
      join(dir, "config.json"),
      JSON.stringify({
        domains: [
          { name: "a", qmp: vm.qmpPath },
          { name: "b", qmp: second },
        ],
      }),
    );
    const d = await startDaemon(t, { dir });
    let list: { name: string; state: string; error: string | null }[] = [];
    await until("both settled", async () => {
      list = JSON.parse((await cli(d.socket, ["--json", "domain-list"])).stdout);
      return list.every((x) => x.state !== "connecting");
    });
    const up = list.filter((x) => x.state === "connected");
    t.ok(up.length <= 1, `round ${round}: at most one connected (${JSON.stringify(list)})`);
    for (const x of list.filter((y) => y.state !== "connected")) t.match(x.error, /already registered as domain/);
    await d.stop();
  }
});

t.test("a peer that answers qom-list with nonsense: the claim fails with a reason, nothing throws", async (t) => {
  const peer = await startFakeQmp(t, (cmd, p) => p.write(reply(cmd.id, cmd.execute === "qom-list" ? { not: "a list" } : {})));
  const c = (await QmpClient.connect({ path: peer.path }, { logger: silentLogger }))._unsafeUnwrap();
  t.teardown(() => c.close());
  const r = await claimQemu(c, "vm1", () => undefined);
  t.ok(r.isErr());
  t.match(r._unsafeUnwrapErr().message, /cannot list QEMU's objects/);
});
