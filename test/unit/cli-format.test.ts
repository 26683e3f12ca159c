/**
 * The CLI's pure parts as virsh behaves: sizes with units, domjobinfo's
 * layout, checkpoint-list's filters and their combinations, and the
 * configuration warning about generated targets (issue 12).
 */
import t from "tap";
import { type CheckpointRow, checkpointListSelect, checkpointTreeRender, localTime } from "../../src/cli/checkpoint-list.js";
import { type JobInfoLike, jobText, nbdExportUri, progressBar } from "../../src/cli/jobinfo.js";
import { sizeFormat, sizeParse } from "../../src/cli/units.js";
import { configWarnings, parseConfig } from "../../src/conf/config.js";
import { progressTotal } from "../../src/jobs/job.js";

t.test("sizes: parse with units, print as virsh", async (t) => {
  const cases: [string, number][] = [
    ["65536", 65536],
    ["64K", 65536],
    ["1M", 1 << 20],
    ["100M", 100 << 20],
    ["1.5GiB", 1.5 * 2 ** 30],
    ["1.5 GiB", 1.5 * 2 ** 30],
    ["10MB", 10_000_000],
    ["2m/s", 2 << 20],
    ["0", 0],
  ];
  for (const [s, n] of cases) t.equal(sizeParse(s)._unsafeUnwrap(), n, s);
  for (const s of ["", "lots", "-1", "1.5", "1X", "1e9", "M"]) t.ok(sizeParse(s).isErr(), `refused: '${s}'`);
  t.equal(sizeFormat(0), "0.000 B");
  t.equal(sizeFormat(1023), "1023.000 B");
  t.equal(sizeFormat(1536), "1.500 KiB");
  t.equal(sizeFormat(16 << 20), "16.000 MiB");
  t.equal(sizeFormat(3 * 2 ** 40), "3.000 TiB");
});

const job: JobInfoLike = {
  id: "j1",
  domain: "vm1",
  mode: "push",
  state: "running",
  active: true,
  startedAt: "2026-01-01T00:00:00Z",
  elapsedMs: 1500,
  bytesDone: 4 << 20,
  bytesTotal: 16 << 20,
  rate: 1 << 20,
  disks: [{ name: "vda", state: "running", bytesDone: 4 << 20, bytesTotal: 16 << 20, file: "/b/vda.qcow2" }],
};

t.test("domjobinfo: virsh's rows first, Job type None without a job", async (t) => {
  t.equal(jobText(undefined), "Job type:         None        \n");
  const lines = jobText(job).split("\n");
  t.same(lines.slice(0, 6), [
    "Job type:         Unbounded   ",
    "Operation:        Backup      ",
    "Time elapsed:     1500         ms",
    "Data processed:   4.000 MiB",
    "Data remaining:   12.000 MiB",
    "Data total:       16.000 MiB",
  ]);
  t.match(jobText({ ...job, active: false, state: "ready" }), /^Job type:\s+Completed/);
  t.match(jobText({ ...job, active: false, state: "cancelled" }), /^Job type:\s+Cancelled/);
  t.match(jobText({ ...job, active: false, state: "failed" }), /^Job type:\s+Failed/);
  t.equal(nbdExportUri("nbd+unix:///?socket=/run/x.sock", "vda"), "nbd+unix:///vda?socket=/run/x.sock");
  t.equal(nbdExportUri("nbd://127.0.0.1:10809", "vdb"), "nbd://127.0.0.1:10809/vdb");
  t.match(
    jobText({ ...job, mode: "pull", nbd: "nbd://h:1", disks: [{ ...job.disks[0]!, exportName: "vda" }] }),
    /Disk vda:.* nbd:\/\/h:1\/vda/,
  );
});

t.test("progress bar: an ETA while running, full once finished", async (t) => {
  t.equal(progressBar(job), `\r[########----------------------]  25% 4.000 MiB / 16.000 MiB  1.000 MiB/s  ETA 12s\x1b[K`);
  t.match(progressBar({ ...job, rate: 16 << 10 }), /ETA 12m48s/);
  t.match(progressBar({ ...job, rate: 1 << 10, bytesTotal: 64 << 20 }), /ETA 17h04m/);
  const done = { ...job, active: false, state: "ready", bytesDone: 16 << 20 };
  t.equal(progressBar(done), `\r[##############################] 100% 16.000 MiB / 16.000 MiB  1.000 MiB/s\x1b[K`);
  t.match(progressBar({ ...job, active: false, state: "ready", bytesDone: 0, bytesTotal: 0 }), / 100% /, "nothing to copy: done");
});

t.test("a total not known yet (QEMU sizing a copy): no percentage, no ETA, no Data total row", async (t) => {
  const sizing = { ...job, bytesDone: 0, bytesTotal: 0 };
  t.equal(progressBar(sizing), `\r[------------------------------] sizing: 0.000 B copied  1.000 MiB/s\x1b[K`);
  t.notMatch(jobText(sizing), /Data (total|remaining)/);
  t.match(jobText(job), /Data total:\s+16\.000 MiB/);
  t.match(jobText({ ...sizing, active: false, state: "ready" }), /Data total:\s+0\.000 B/, "a finished job shows its total");
});

t.test("progressTotal: a top copy's shrinking total is not shown until copying starts", async (t) => {
  const top = { sync: "top" as const };
  t.equal(progressTotal(top, { "current-progress": 0, "total-progress": 1 << 30 }, 0), 0, "scanning: QEMU's total is the virtual size");
  t.equal(progressTotal(top, { "current-progress": 0, "total-progress": 2 << 20 }, 0), 0, "still scanning");
  t.equal(progressTotal(top, { "current-progress": 65536, "total-progress": 2 << 20 }, 0), 2 << 20, "copying: final");
  t.equal(progressTotal({ sync: "full" }, { "current-progress": 0, "total-progress": 1 << 30 }, 1 << 30), 1 << 30);
  t.equal(progressTotal({ sync: "incremental" }, { "current-progress": 0, "total-progress": 4096 }, 0), 4096);
  t.equal(
    progressTotal({ sync: "none" }, { "current-progress": 0, "total-progress": 0 }, 1 << 30),
    1 << 30,
    "a pull keeps its export's size",
  );
});

// r ─ a ─ c         (r has children a, b; a has child c; z is another root without children)
//   └ b
// z
const row = (name: string, parent: string | null, at: number): CheckpointRow => ({
  name,
  parent,
  creationTime: at,
  valid: true,
  current: false,
});
const all = [row("r", null, 1), row("a", "r", 2), row("b", "r", 3), row("c", "a", 4), row("z", null, 5)];
const names = (o: Parameters<typeof checkpointListSelect>[1]) => checkpointListSelect(all, o).map((l) => l.map((c) => c.name));

t.test("checkpoint-list: filters combine as virsh's flags do", async (t) => {
  t.same(names({})._unsafeUnwrap(), ["a", "b", "c", "r", "z"], "by name, not by age");
  t.same(names({ topological: true })._unsafeUnwrap(), ["r", "a", "c", "b", "z"]);
  t.same(names({ roots: true })._unsafeUnwrap(), ["r", "z"]);
  t.same(names({ roots: true, leaves: true })._unsafeUnwrap(), ["z"], "a root with children is no leaf");
  t.same(names({ roots: true, noLeaves: true })._unsafeUnwrap(), ["r"]);
  t.same(names({ leaves: true })._unsafeUnwrap(), ["b", "c", "z"]);
  t.same(names({ noLeaves: true })._unsafeUnwrap(), ["a", "r"]);
  t.same(names({ from: "r" })._unsafeUnwrap(), ["a", "b"], "children only");
  t.same(names({ from: "r", descendants: true })._unsafeUnwrap(), ["a", "b", "c"]);
  t.same(names({ from: "r", leaves: true })._unsafeUnwrap(), ["b"]);
  t.same(names({ from: "r", descendants: true, leaves: true })._unsafeUnwrap(), ["b", "c"]);
  t.same(names({ from: "r", noLeaves: true })._unsafeUnwrap(), ["a"]);
  t.same(names({ from: "r", descendants: true, topological: true })._unsafeUnwrap(), ["a", "c", "b"]);
  t.same(names({ from: "nope" })._unsafeUnwrapErr(), { code: "not-found", message: "checkpoint 'nope' does not exist" });
  // virsh's refusals
  for (const [o, m] of [
    [{ descendants: true }, "--descendants requires --from"],
    [{ tree: true, leaves: true }, "--leaves and --tree are mutually exclusive"],
    [{ tree: true, noLeaves: true }, "--no-leaves and --tree are mutually exclusive"],
    [{ tree: true, name: true }, "options --tree and --name are mutually exclusive"],
    [{ parent: true, roots: true }, "options --parent and --roots are mutually exclusive"],
    [{ parent: true, tree: true }, "options --parent and --tree are mutually exclusive"],
    [{ roots: true, tree: true }, "options --roots and --tree are mutually exclusive"],
    [{ roots: true, from: "r" }, "options --roots and --from are mutually exclusive"],
  ] as const)
    t.same(checkpointListSelect(all, o)._unsafeUnwrapErr(), { code: "usage", message: m }, m);
});

t.test("checkpoint-list --tree, with and without --from", async (t) => {
  t.equal(checkpointTreeRender(checkpointListSelect(all, { tree: true })._unsafeUnwrap()), "r\n├─ a\n│  └─ c\n└─ b\nz\n");
  t.equal(checkpointTreeRender(checkpointListSelect(all, { tree: true, from: "a" })._unsafeUnwrap(), "a"), "a\n└─ c\n");
  t.equal(checkpointTreeRender(checkpointListSelect(all, { tree: true, from: "r" })._unsafeUnwrap(), "r"), "r\n├─ a\n│  └─ c\n└─ b\n");
});

t.test("creation time in local time, virsh's format", async (t) => {
  const saved = process.env.TZ;
  t.teardown(() => {
    process.env.TZ = saved;
  });
  // TZ is read per call by V8 on Linux
  process.env.TZ = "UTC";
  t.equal(localTime(0), "1970-01-01 00:00:00 +0000");
  process.env.TZ = "Asia/Kolkata";
  t.equal(localTime(0), "1970-01-01 05:30:00 +0530");
  process.env.TZ = "America/New_York";
  t.equal(localTime(1_700_000_000), "2023-11-14 17:13:20 -0500");
});

t.test("configuration: a warning when generated targets fall outside the allowed directories", async (t) => {
  const cfg = (flags: Parameters<typeof parseConfig>[1], file = "{}") => parseConfig(file, flags)._unsafeUnwrap();
  t.same(configWarnings(cfg({ stateDir: "/s" })), [], "defaults: backupDir is the allowed directory");
  t.same(configWarnings(cfg({ stateDir: "/s", allowDir: ["/s"] })), [], "inside an allowed directory");
  t.match(configWarnings(cfg({ stateDir: "/s", allowDir: ["/elsewhere"] })), [/backupDir \/s\/backups is outside the allowed directories/]);
  t.same(configWarnings(cfg({ stateDir: "/s", allowDir: ["/b"], backupDir: "/b/gen" })), [], "--backup-dir inside");
  t.same(cfg({ stateDir: "/s", backupDir: "/b" }).allowDirs, ["/b"], "--backup-dir is the default allowed directory");
  t.same(configWarnings(cfg({ stateDir: "/s", allowDir: ["/s/backups-other"] })).length, 1, "a sibling with a common prefix is outside");
});
