/**
 * Backups of a qemu-storage-daemon's disks (real qsd, no iothreads, started
 * without any --object): a pull is served; an NBD server qsd already runs
 * for its own clients makes a pull fail with a clear error, nothing left.
 */
import { join } from "node:path";
import t from "tap";
import { jobManager, leftovers, settledBackup, testDomain } from "../helpers/domain.js";
import { rangeHolds } from "../helpers/qemu.js";

const pull = (sock: string) => `<domainbackup mode='pull'><server transport='unix' socket='${sock}'/></domainbackup>`;

t.test("pull and push of a storage daemon's disks", async (t) => {
  const d = await testDomain(t, "qsd", [{ size: "16M" }, { size: "16M" }], undefined, { storageDaemon: true });
  const jm = jobManager(d.backupDir);
  const sock = join(d.backupDir, "nbd.sock");
  const info = (await jm.begin(d.domain, pull(sock), "<domaincheckpoint><name>p1</name></domaincheckpoint>"))._unsafeUnwrap();
  t.equal(info.state, "ready", info.error ?? "");
  t.ok(await rangeHolds(`nbd+unix:///disk1?socket=${sock}`, "raw", 0, 0, 16 << 20), "disk1 served (empty)");
  (await jm.end("qsd"))._unsafeUnwrap();
  t.equal((await settledBackup(jm, d, "<domainbackup><incremental>p1</incremental></domainbackup>", undefined)).state, "ready");
  t.same(await leftovers(d.client), []);
});

t.test("an NBD server already running in QEMU: the pull fails clearly, nothing left", async (t) => {
  const d = await testDomain(t, "qsd", [{ size: "16M" }], undefined, { storageDaemon: true });
  const theirs = { type: "unix" as const, data: { path: join(d.vm.dir, "theirs.sock") } };
  (await d.vm.monitor.execute("nbd-server-start", { addr: theirs }))._unsafeUnwrap();
  const jm = jobManager(d.backupDir);
  const e = (
    await jm.begin(d.domain, pull(join(d.backupDir, "nbd.sock")), "<domaincheckpoint><name>p1</name></domaincheckpoint>")
  )._unsafeUnwrapErr();
  t.match(e.message, /cannot start the NBD server .*NBD server already running/);
  t.same(await leftovers(d.client), []);
  t.notOk(d.checkpoints.store.get("p1"), "no checkpoint");
});
