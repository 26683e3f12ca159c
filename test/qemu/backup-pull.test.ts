/** Pull backups on real QEMU with 2 disks: point-in-time exports over NBD, dirty maps, teardown. */
import { existsSync, lstatSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { backupDefParse } from "../../src/conf/backup.js";
import { handBackups } from "../helpers/backup.js";
import { jobManager, leftovers, testDomain } from "../helpers/domain.js";
import { execFileP, imagesIdentical, rangeHolds } from "../helpers/qemu.js";
import { relaxngValidate } from "../helpers/xml.js";

const KiB = 1024;
const MiB = 1024 * KiB;
const DISKS = [{ size: "16M" }, { size: "16M" }];

async function dirtyMap(uri: string, bitmap: string): Promise<[number, number][]> {
  const r = await execFileP("nbdinfo", ["--json", `--map=qemu:dirty-bitmap:${bitmap}`, uri]);
  const extents = JSON.parse(r.stdout) as { offset: number; length: number; type: number }[];
  return extents.filter((e) => (e.type & 1) === 1).map((e) => [e.offset, e.length]);
}

t.test("pull full then incremental over a unix socket", async (t) => {
  const d = await testDomain(t, "vm1", DISKS);
  const jm = jobManager(d.backupDir);
  const sock = join(d.backupDir, "nbd.sock");
  await d.vm.write(0, 0x81, 0, 2 * MiB);
  await d.vm.write(1, 0x91, 4 * MiB, MiB);
  const before = d.vm.disks.map((x) => join(d.vm.dir, `before-${x.id}.qcow2`));
  await handBackups(
    d.client,
    "16M",
    d.vm.disks.map((x, i) => ({ node: x.node, target: before[i]!, sync: "full" as const })),
  );

  const xml = `<domainbackup mode='pull'><server transport='unix' socket='${sock}'/></domainbackup>`;
  const info = (await jm.begin(d.domain, xml, "<domaincheckpoint><name>p1</name></domaincheckpoint>"))._unsafeUnwrap();
  t.equal(info.state, "ready", "pull is ready as soon as the exports are served");
  t.equal(info.nbd, `nbd+unix:///?socket=${sock}`);
  // the guest keeps writing; the export keeps the point in time
  await d.vm.write(0, 0x82, 0, 64 * KiB);
  await d.vm.write(1, 0x92, 4 * MiB, 64 * KiB);
  const uri = (disk: string) => `nbd+unix:///${disk}?socket=${sock}`;
  t.ok(await rangeHolds(uri("vda"), "raw", 0x81, 0, 2 * MiB), "vda export: data at begin");
  t.ok(await rangeHolds(uri("vdb"), "raw", 0x91, 4 * MiB, MiB), "vdb export: data at begin");
  for (const [i, disk] of ["vda", "vdb"].entries()) {
    const copy = join(d.vm.dir, `copy-${disk}.raw`);
    await execFileP("nbdcopy", [uri(disk), copy]);
    const cmp = await imagesIdentical(copy, before[i]!);
    t.ok(cmp.identical, `nbdcopy of ${disk} equals the disk at begin: ${cmp.output}`);
  }
  const dump = (await jm.xml("vm1"))._unsafeUnwrap();
  t.match(dump, /exportname='vda'/);
  t.same(await relaxngValidate("domainbackup", [dump]), [undefined], "backup-dumpxml validates");
  const ended = (await jm.end("vm1"))._unsafeUnwrap();
  t.equal(ended.state, "ready");
  t.equal(ended.active, false);
  t.same(await leftovers(d.client), [], "nothing left in QEMU");
  t.same(readdirSync(join(d.backupDir, "vm1")), [], "scratch files removed");
  t.ok(d.checkpoints.store.get("p1"), "the checkpoint stays after a pull ends");

  // incremental since p1
  await d.vm.write(0, 0x83, 5 * MiB, 128 * KiB);
  await d.vm.write(0, 0x84, 9 * MiB + 10, 10);
  const incXml = `<domainbackup mode='pull'><incremental>p1</incremental><server transport='unix' socket='${sock}'/></domainbackup>`;
  (await jm.begin(d.domain, incXml, "<domaincheckpoint><name>p2</name></domaincheckpoint>"))._unsafeUnwrap();
  await d.vm.write(0, 0x85, 12 * MiB, MiB); // after begin: neither in the map nor in the data
  t.same(
    await dirtyMap(uri("vda"), "backup-vda"),
    [
      [0, 64 * KiB],
      [5 * MiB, 128 * KiB],
      [9 * MiB, 64 * KiB],
    ],
    "vda dirty map: exactly the ranges written since p1",
  );
  t.same(await dirtyMap(uri("vdb"), "backup-vdb"), [[4 * MiB, 64 * KiB]], "vdb dirty map");
  t.ok(await rangeHolds(uri("vda"), "raw", 0x83, 5 * MiB, 128 * KiB));
  t.ok(await rangeHolds(uri("vda"), "raw", 0, 12 * MiB, MiB), "writes after begin do not show");
  const dump2 = (await jm.xml("vm1"))._unsafeUnwrap();
  t.match(dump2, /exportbitmap='backup-vda'/);
  t.same(await relaxngValidate("domainbackup", [dump2]), [undefined]);
  (await jm.end("vm1"))._unsafeUnwrap();
  t.same(await leftovers(d.client), []);
  t.notOk(existsSync(sock), "NBD server stopped");
});

t.test("pull over TCP without a port: a free one is picked and shown", async (t) => {
  const d = await testDomain(t, "vm1", DISKS);
  const jm = jobManager(d.backupDir);
  await d.vm.write(1, 0xa1, 0, MiB);
  (
    await jm.begin(
      d.domain,
      "<domainbackup mode='pull'><server name='localhost'/><disks><disk name='vdb'/></disks></domainbackup>",
      undefined,
    )
  )._unsafeUnwrap();
  const dump = (await jm.xml("vm1"))._unsafeUnwrap();
  const def = backupDefParse(dump)._unsafeUnwrap();
  t.equal(def.server?.transport, "tcp");
  const port = def.server?.transport === "tcp" ? def.server.port : undefined;
  t.ok(port !== undefined && port > 0, `port ${port}`);
  t.match(dump, /<disk name='vda' backup='no'\/>/);
  t.ok(await rangeHolds(`nbd://localhost:${port}/vdb`, "raw", 0xa1, 0, MiB));
  t.same(await relaxngValidate("domainbackup", [dump]), [undefined]);
  (await jm.end("vm1"))._unsafeUnwrap();
  t.same(await leftovers(d.client), []);
  t.match((await jm.begin(d.domain, "<domainbackup mode='pull'><server name='192.0.2.1'/></domainbackup>", undefined))._unsafeUnwrapErr(), {
    code: "path-refused",
    message: /without TLS is refused/,
  });
  t.match(
    (
      await jm.begin(d.domain, "<domainbackup mode='pull'><server name='localhost' tls='yes'/></domainbackup>", undefined)
    )._unsafeUnwrapErr(),
    {
      code: "unsupported",
      message: /tlsDir/,
    },
  );
});

t.test("an export removed behind the daemon's back fails the pull and cleans up", async (t) => {
  const d = await testDomain(t, "vm1", DISKS);
  const jm = jobManager(d.backupDir);
  const sock = join(d.backupDir, "nbd.sock");
  (
    await jm.begin(d.domain, `<domainbackup mode='pull'><server transport='unix' socket='${sock}'/></domainbackup>`, undefined)
  )._unsafeUnwrap();
  const exports = (await d.vm.monitor.execute("query-block-exports"))._unsafeUnwrap();
  const e1 = exports.map((e) => e.id).find((id) => /^qbk-[0-9a-f]{6}-[0-9a-f]{8}-e1$/.test(id));
  t.ok(e1, "exports are named after the domain and the job");
  (await d.vm.monitor.execute("block-export-del", { id: e1! }))._unsafeUnwrap();
  for (let i = 0; i < 200 && jm.job("vm1")?.active; i++) await new Promise((res) => setTimeout(res, 25));
  const r = (await jm.info("vm1", { completed: true }))._unsafeUnwrap();
  t.equal(r.state, "failed");
  t.match(r.error, /disk 'vdb': its NBD export was removed/);
  t.same(await leftovers(d.client), []);
  t.same(readdirSync(join(d.backupDir, "vm1")), []);
});

t.test("the NBD socket path: QEMU unlinks what is there, so only allowed directories and stale sockets", async (t) => {
  const d = await testDomain(t, "vm1", DISKS);
  const e = await testDomain(t, "vm2", DISKS);
  const jm = jobManager(d.backupDir);
  const pull = (sock: string) => `<domainbackup mode='pull'><server transport='unix' socket='${sock}'/></domainbackup>`;
  // a file outside the allowed directories, and one inside: neither is touched
  const outside = join(d.vm.dir, "precious");
  const inside = join(d.backupDir, "precious");
  for (const f of [outside, inside]) writeFileSync(f, "keep me");
  t.match((await jm.begin(d.domain, pull(outside), undefined))._unsafeUnwrapErr(), {
    code: "path-refused",
    message: /NBD socket .* is outside the allowed directories/,
  });
  t.match((await jm.begin(d.domain, pull(inside), undefined))._unsafeUnwrapErr(), {
    code: "target-exists",
    message: /exists and is not a socket: QEMU would delete it/,
  });
  for (const f of [outside, inside]) t.equal(readFileSync(f, "utf8"), "keep me", `${f} untouched`);
  t.same(await leftovers(d.client), [], "refused before QEMU was touched");

  // a stale socket (nothing listens) is replaced; a live one is refused
  const sock = join(d.backupDir, "nbd.sock");
  // bound, never listening: what a crashed server leaves behind
  const { execFileSync } = await import("node:child_process");
  execFileSync("python3", ["-c", `import socket; s=socket.socket(socket.AF_UNIX); s.bind(${JSON.stringify(sock)})`]);
  t.ok(lstatSync(sock).isSocket(), "a stale socket is there");
  (await jm.begin(d.domain, pull(sock), undefined))._unsafeUnwrap();
  t.ok(await rangeHolds(`nbd+unix:///vda?socket=${sock}`, "raw", 0, 0, MiB), "the export serves on it");
  const jm2 = jobManager(e.backupDir, { allowedDirs: [d.backupDir, e.backupDir] });
  t.match((await jm2.begin(e.domain, pull(sock), undefined))._unsafeUnwrapErr(), {
    code: "target-exists",
    message: /is in use/,
  });
  t.ok(await rangeHolds(`nbd+unix:///vda?socket=${sock}`, "raw", 0, 0, MiB), "the first pull's export still serves");
  (await jm.end("vm1"))._unsafeUnwrap();
  t.same(await leftovers(e.client), []);
});
