/**
 * The container image, without a container engine (none runs here): the
 * Dockerfile's runtime stage is assembled in a directory from its own COPY
 * lines, with only the production dependencies `npm prune --omit=dev` keeps,
 * and its ENTRYPOINT runs a full push of a real QEMU's disk, checked byte for
 * byte. What this cannot catch: the base image itself (node:24-bookworm-slim; the
 * Node 24 leg of scripts/test-matrix.mjs runs this test on Node 24).
 */
import { execFile } from "node:child_process";
import { cpSync, existsSync, mkdirSync, readFileSync, statSync, symlinkSync } from "node:fs";
import { basename, dirname, join, relative } from "node:path";
import { promisify } from "node:util";
import t from "tap";
import { cli, connected, startDaemon } from "../helpers/daemon.js";
import { rangeHolds, startVm, tempDir } from "../helpers/qemu.js";

const ROOT = join(import.meta.dirname, "..", "..");
const run = promisify(execFile);

interface Stage {
  readonly name: string | undefined;
  workdir: string;
  readonly lines: string[];
}

/** Instructions per stage; comments dropped, continuations joined. */
function stages(text: string): Stage[] {
  const out: Stage[] = [];
  const joined = text
    .split("\n")
    .filter((l) => !l.trimStart().startsWith("#"))
    .join("\n")
    .replace(/\\\n/g, " ");
  for (const raw of joined.split("\n")) {
    const line = raw.trim();
    if (line === "") continue;
    const from = /^FROM\s+\S+(?:\s+AS\s+(\S+))?$/i.exec(line);
    if (from) out.push({ name: from[1], workdir: "/", lines: [] });
    else out.at(-1)!.lines.push(line);
  }
  return out;
}

const dockerfile = readFileSync(join(ROOT, "Dockerfile"), "utf8");
const all = stages(dockerfile);
const runtime = all.at(-1)!;
const ignored = readFileSync(join(ROOT, ".dockerignore"), "utf8")
  .split("\n")
  .map((l) => l.trim())
  .filter((l) => l !== "" && !l.startsWith("#"));

/** Every COPY from the build context names something that exists and is not left out of the context. */
t.test("COPY sources exist in the build context", async (t) => {
  for (const s of all)
    for (const l of s.lines) {
      const m = /^COPY\s+(?!--from)(.+)\s+(\S+)$/.exec(l);
      if (!m) continue;
      for (const src of m[1]!.split(/\s+/)) {
        t.ok(existsSync(join(ROOT, src)), `${src} exists`);
        t.notOk(
          ignored.some((p) => src === p || src.startsWith(`${p}/`)),
          `${src} is not in .dockerignore`,
        );
      }
    }
});

/** The production dependency tree, as `npm prune --omit=dev` leaves node_modules (top-level entries). */
async function productionModules(): Promise<string[]> {
  const { stdout } = await run("npm", ["ls", "--omit=dev", "--all", "--parseable"], { cwd: ROOT, maxBuffer: 16 << 20 });
  const top = join(ROOT, "node_modules");
  return [
    ...new Set(
      stdout
        .split("\n")
        .filter((p) => p.startsWith(`${top}/`))
        .map((p) => relative(top, p))
        .filter((p) => !p.includes("node_modules")),
    ),
  ];
}

t.test("the runtime stage, assembled from the Dockerfile, runs a backup", async (t) => {
  const fsRoot = tempDir(t, "qbackupd-image-");
  const at = (p: string) => join(fsRoot, p);
  let workdir = "/";
  const fromBuild = (p: string) => relative("/src", p); // the build stage's WORKDIR
  for (const l of runtime.lines) {
    const wd = /^WORKDIR\s+(\S+)$/.exec(l);
    if (wd) workdir = wd[1]!;
    const cp = /^COPY\s+(?:--from=(\S+)\s+)?(\S+)\s+(\S+)$/.exec(l);
    if (cp) {
      const [, from, src, dest] = cp;
      const source = from === undefined ? join(ROOT, src!) : join(ROOT, fromBuild(src!));
      // Docker: a file copied to a directory (dest ending in /) keeps its name; a directory's contents are copied
      const into = dest!.endsWith("/") && !statSync(source).isDirectory() ? join(dest!, basename(src!)) : dest!;
      const target = at(into.startsWith("/") ? into : join(workdir, into));
      mkdirSync(dirname(target), { recursive: true });
      if (from !== undefined && fromBuild(src!) === "node_modules") {
        // the build stage ran `npm ci` then `npm prune --omit=dev`
        for (const m of await productionModules()) cpSync(join(ROOT, "node_modules", m), join(target, m), { recursive: true });
      } else {
        // from the context; or package.json, and dist/ as `npm run build` (run by npm test) left it
        cpSync(source, target, { recursive: true });
      }
    }
    const ln = /^RUN ln -s (\S+) (\S+)(?: && ln -s (\S+) (\S+))?$/.exec(l);
    if (ln) {
      for (const [a, b] of [
        [ln[1], ln[2]],
        [ln[3], ln[4]],
      ]) {
        if (a === undefined || b === undefined) continue;
        mkdirSync(dirname(at(b)), { recursive: true });
        symlinkSync(at(a), at(b));
      }
    }
  }
  t.notOk(existsSync(at("/opt/qbackupd/node_modules/tap")), "no dev dependency in the image");
  t.notOk(existsSync(at("/opt/qbackupd/src")), "no sources in the image");
  const entry = /^ENTRYPOINT\s+(\[.*\])$/m.exec(runtime.lines.join("\n"));
  t.ok(entry, "an ENTRYPOINT in exec form");
  const command = (JSON.parse(entry![1]!) as string[]).map((a) => (a.startsWith("/") ? at(a) : a));

  const vm = await startVm(t, { disks: [{ size: "16M" }] });
  await vm.write(0, 0x5a, 0, 4 << 20);
  const d = await startDaemon(t, { command });
  const qbackup = at("/usr/local/bin/qbackup"); // the symlink: bin/qbackup must find dist/ through it
  const q = (...args: string[]) => cli(d.socket, args, qbackup);
  t.equal((await q("domain-add", "vm", "--qmp", vm.qmpPath)).code, 0);
  await connected(d, "vm");
  t.equal((await q("backup-begin", "vm")).code, 0);
  const done = await q("--json", "wait", "vm", "--timeout", "60");
  t.equal(done.code, 0, done.stderr);
  const info = JSON.parse((await q("--json", "domjobinfo", "vm", "--completed")).stdout) as { state: string; disks: { file: string }[] };
  t.equal(info.state, "ready");
  // the disk is open in QEMU, so its file is not compared directly: the pattern written and zeros after
  const target = info.disks[0]!.file;
  t.ok(await rangeHolds(target, "qcow2", 0x5a, 0, 4 << 20), "the data written is in the backup");
  t.ok(await rangeHolds(target, "qcow2", 0, 4 << 20, 12 << 20), "and nothing else");
  t.equal(await d.stop("SIGTERM"), 0, "SIGTERM: clean exit");
});
