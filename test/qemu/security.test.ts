/** Paths, names, metadata durability on a full disk, and random API bodies. */
import { execFileSync } from "node:child_process";
import { mkdirSync, mkdtempSync, readdirSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t from "tap";
import { CheckpointManager } from "../../src/checkpoints/manager.js";
import { CheckpointStore } from "../../src/checkpoints/store.js";
import { ApiClient, isCallError } from "../../src/cli/client.js";
import { checkBackupPath } from "../../src/jobs/paths.js";
import { QmpClient } from "../../src/qmp/index.js";
import { startDaemon } from "../helpers/daemon.js";
import { jobManager, testDomain } from "../helpers/domain.js";
import { execFileP, silentLogger, startVm, tempDir } from "../helpers/qemu.js";

t.test("target paths: traversal, symlinks out, devices, relative, existing — refused before anything is created", async (t) => {
  const root = tempDir(t);
  const allowed = join(root, "allowed");
  const outside = join(root, "outside");
  mkdirSync(allowed);
  mkdirSync(outside);
  symlinkSync(outside, join(allowed, "link-dir"));
  writeFileSync(join(outside, "victim.qcow2"), "x");
  symlinkSync(join(outside, "victim.qcow2"), join(allowed, "link-file.qcow2"));
  writeFileSync(join(allowed, "regular.qcow2"), "x");
  const cases: [string, boolean, RegExp][] = [
    [join(allowed, "..", "outside", "x.qcow2"), false, /outside the allowed directories/],
    [join(allowed, "link-dir", "x.qcow2"), false, /outside the allowed directories/],
    [join(allowed, "link-file.qcow2"), true, /not a regular file/],
    [join(allowed, "link-file.qcow2"), false, /already exists/],
    [join(allowed, "regular.qcow2"), false, /already exists/],
    ["/dev/null", true, /outside the allowed directories/],
    ["relative/x.qcow2", false, /not an absolute path/],
    [join(allowed, "no-such-dir", "x.qcow2"), false, /does not exist/],
    [`${allowed}/`, false, /does not name a file/],
    [join(allowed, "a\nb.qcow2"), false, /control characters/],
  ];
  for (const [p, reuse, re] of cases) {
    const r = await checkBackupPath(p, [allowed], reuse, "target");
    t.match(r.isErr() && r.error.message, re, `${JSON.stringify(p)} reuse=${reuse}`);
  }
  t.ok((await checkBackupPath(join(allowed, "new.qcow2"), [allowed], false, "target")).isOk());
  t.ok((await checkBackupPath(join(allowed, "regular.qcow2"), [allowed], true, "target")).isOk(), "reuse of a regular file inside");
  t.same(readdirSync(outside).sort(), ["victim.qcow2"], "nothing created outside");
});

t.test("a block device as target is refused with a clear error", async (t) => {
  const d = await testDomain(t, "vm1", [{ size: "16M" }]);
  const jm = jobManager(d.backupDir, { allowedDirs: [d.backupDir, "/dev"] });
  const xml = "<domainbackup><disks><disk name='vda' type='block'><target dev='/dev/null'/></disk></disks></domainbackup>";
  t.match((await jm.begin(d.domain, xml, undefined))._unsafeUnwrapErr(), { code: "unsupported", message: /block device targets/ });
});

t.test("metadata on a full disk: the failed checkpoint leaves no bitmap and no half-written file; earlier ones stay", async (t) => {
  const vm = await startVm(t, { disks: [{ size: "16M" }] });
  const client = (await QmpClient.connect({ path: vm.qmpPath }, { logger: silentLogger }))._unsafeUnwrap();
  t.teardown(() => client.close());
  const state = mkdtempSync(join(tmpdir(), "qbk-full-"));
  await execFileP("mount", ["-t", "tmpfs", "-o", "size=64k", "tmpfs", state]);
  t.teardown(async () => {
    await execFileP("umount", ["-l", state]).catch(() => {});
    rmSync(state, { recursive: true, force: true });
  });
  const store = (await CheckpointStore.open(state, "vm1", silentLogger))._unsafeUnwrap();
  const mgr = new CheckpointManager(store, { logger: silentLogger });
  (await mgr.create(client, "<domaincheckpoint><name>before</name></domaincheckpoint>"))._unsafeUnwrap();
  // fill the filesystem
  try {
    execFileSync("dd", ["if=/dev/zero", `of=${join(state, "filler")}`, "bs=4k", "count=100"], { stdio: "ignore" });
  } catch {
    // dd stops at ENOSPC, as intended
  }
  const e = (
    await mgr.create(client, `<domaincheckpoint><name>after</name><description>${"d".repeat(8000)}</description></domaincheckpoint>`)
  )._unsafeUnwrapErr();
  t.match(e, { code: "io", errno: "ENOSPC" });
  const bitmaps = (await client.execute("query-block"))._unsafeUnwrap()[0]!.inserted!["dirty-bitmaps"]!.map((b) => b.name);
  t.same(bitmaps, ["before"], "the new bitmap was rolled back");
  const again = (await CheckpointStore.open(state, "vm1", silentLogger))._unsafeUnwrap();
  t.same(
    again.list().map((c) => c.name),
    ["before"],
  );
  t.equal(again.current, "before");
  t.same(again.loadReport.skipped, [], "no half-written file loads or even exists");
  t.notOk(
    readdirSync(join(state, "checkpoint", "vm1")).some((f) => f.startsWith(".tmp-")),
    "no temp file left",
  );
});

t.test("random API bodies: typed 4xx errors, the daemon keeps serving", async (t) => {
  const d = await startDaemon(t);
  const api = new ApiClient(d.socket);
  let seed = 1;
  const r = () => {
    seed = (seed * 1103515245 + 12345) % 2147483648;
    return seed / 2147483648;
  };
  const values = [null, true, 0, -1, 1e308, "", "x", "../x", [], {}, { name: "a" }, "<domainbackup>", "\u0000", "a".repeat(300)];
  const paths = ["/v1/domains", "/v1/domains/x/backup", "/v1/domains/x/checkpoints", "/v1/domains/x/backup/bandwidth"];
  const statuses = new Map<number, number>();
  for (let i = 0; i < 300; i++) {
    const body: Record<string, unknown> = {};
    for (const k of ["name", "qmp", "agent", "xml", "backupXml", "checkpointXml", "bandwidth", "redefine", "quiesce", "extra"]) {
      if (r() < 0.4) body[k] = values[Math.floor(r() * values.length)];
    }
    const path = paths[Math.floor(r() * paths.length)]!;
    const res = await api.request(
      path.endsWith("bandwidth") ? "PUT" : "POST",
      path,
      r() < 0.1 ? values[Math.floor(r() * values.length)] : body,
    );
    if (isCallError(res)) {
      t.fail(`daemon unreachable: ${res.message}`);
      return;
    }
    statuses.set(res.status, (statuses.get(res.status) ?? 0) + 1);
    if (res.status >= 500 || typeof (res.body as { code?: unknown }).code !== "string") {
      if (res.status !== 201) {
        t.fail(`${path} ${JSON.stringify(body).slice(0, 200)} → ${res.status} ${res.text.slice(0, 200)}`);
        return;
      }
    }
  }
  t.ok(
    [...statuses.keys()].every((s) => s < 500),
    `statuses: ${[...statuses].map(([k, v]) => `${k}×${v}`).join(" ")}`,
  );
  t.match((await api.request("GET", "/v1/health")) as object, { status: 200 });
});

t.test("a job record that cannot be written stops the backup before QEMU is touched", async (t) => {
  const d = await testDomain(t, "vm1", [{ size: "16M" }]);
  const state = mkdtempSync(join(tmpdir(), "qbk-jobfull-"));
  await execFileP("mount", ["-t", "tmpfs", "-o", "size=16k", "tmpfs", state]);
  t.teardown(async () => {
    await execFileP("umount", ["-l", state]).catch(() => {});
    rmSync(state, { recursive: true, force: true });
  });
  try {
    execFileSync("dd", ["if=/dev/zero", `of=${join(state, "filler")}`, "bs=4k", "count=10"], { stdio: "ignore" });
  } catch {
    // full, as intended
  }
  const { JobManager } = await import("../../src/jobs/manager.js");
  const jm = new JobManager({ logger: silentLogger, backupDir: d.backupDir, allowedDirs: [d.backupDir], stateDir: state });
  const e = (await jm.begin(d.domain, undefined, "<domaincheckpoint><name>j</name></domaincheckpoint>"))._unsafeUnwrapErr();
  t.match(e, { code: "io", errno: "ENOSPC" });
  const { leftovers } = await import("../helpers/domain.js");
  t.same(await leftovers(d.client), [], "nothing added to QEMU");
  t.same(readdirSync(join(d.backupDir, "vm1")), [], "no target created");
  t.equal(d.checkpoints.store.get("j"), undefined);
});
