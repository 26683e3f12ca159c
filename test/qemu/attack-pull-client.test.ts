/**
 * Attack: a pull ended (and one aborted while still starting) with an NBD
 * client still connected and reading. The export is removed in hard mode,
 * so the client is cut off; the end must answer only once the export, the
 * NBD server and the scratch node are gone, and never hang on the client.
 */
import { spawn } from "node:child_process";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import t from "tap";
import { jobManager, leftovers, testDomain } from "../helpers/domain.js";

const MiB = 1024 * 1024;

t.test("a pull ended while an NBD client is connected and reading", async (t) => {
  const d = await testDomain(t, "vm1", [{ size: "64M" }]);
  await d.vm.write(0, 0x3c, 0, 32 * MiB);
  const jm = jobManager(d.backupDir);
  const sock = join(d.backupDir, "nbd.sock");
  const xml = `<domainbackup mode='pull'><server transport='unix' socket='${sock}'/></domainbackup>`;
  for (let round = 0; round < 4; round++) {
    (await jm.begin(d.domain, xml, `<domaincheckpoint><name>p${round}</name></domaincheckpoint>`))._unsafeUnwrap();
    // an interactive qemu-io keeps its connection open; it reads in a loop
    const io = spawn("qemu-io", ["-r", "-f", "raw", `nbd+unix:///vda?socket=${sock}`], { stdio: ["pipe", "pipe", "pipe"] });
    t.teardown(() => {
      io.kill("SIGKILL");
    });
    let out = "";
    io.stdout.on("data", (b: Buffer) => (out += b.toString()));
    io.stderr.on("data", (b: Buffer) => (out += b.toString()));
    for (let i = 0; i < 16; i++) io.stdin.write(`read ${(i % 16) * 4}M 4M\n`);
    await sleep(round * 40);
    const started = Date.now();
    const ended = await Promise.race([jm.end("vm1"), sleep(20_000).then(() => undefined)]);
    t.ok(ended !== undefined, `round ${round}: the end answers (${Date.now() - started} ms)`);
    const state = ended === undefined ? "no answer" : ended.isOk() ? ended.value.state : ended.error.code;
    t.equal(state, "ready", `round ${round}: a pull ended is ready`);
    t.same(await leftovers(d.client), [], `round ${round}: no export, node or job left`);
    const free = await d.client.execute("nbd-server-start", { addr: { type: "unix", data: { path: sock } } });
    t.ok(free.isOk(), `round ${round}: no NBD server left`);
    if (free.isOk()) await d.client.execute("nbd-server-stop");
    io.stdin.end("read 0 4M\nquit\n");
    const exited = io.exitCode !== null || io.signalCode !== null ? Promise.resolve() : new Promise((r) => io.once("exit", r));
    if ((await Promise.race([exited, sleep(5000).then(() => "stuck")])) === "stuck") io.kill("SIGKILL");
    t.comment(
      `round ${round}: client saw ${(out.match(/bytes at offset/g) ?? []).length} reads, then ${/(error|fail)[^\n]*/i.exec(out)?.[0] ?? "no error"}`,
    );
    (await d.checkpoints.delete(d.client, `p${round}`))._unsafeUnwrap();
  }
});
