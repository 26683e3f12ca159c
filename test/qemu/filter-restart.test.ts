/**
 * A daemon restarted while its own push runs: the push's copy-before-write
 * filter sits above the disk (query-block reports the filter), yet every
 * checkpoint still lists as valid, during the job and after it ends. Real
 * QEMU, built daemon and CLI.
 */
import t from "tap";
import { cli, startDaemon } from "../helpers/daemon.js";
import { startVm } from "../helpers/qemu.js";

const MiB = 1024 * 1024;

t.test("checkpoints stay valid across a daemon restart during a push", async (t) => {
  const vm = await startVm(t, { disks: [{ size: "16M" }] });
  const d1 = await startDaemon(t);
  const ok = async (socket: string, ...args: string[]) => {
    const r = await cli(socket, args);
    t.equal(r.code, 0, `qbackup ${args.join(" ")}: ${r.stderr.trim()}`);
    return r;
  };
  const connected = async (socket: string) => {
    for (let i = 0; i < 200; i++) {
      const l = JSON.parse((await ok(socket, "--json", "domain-list")).stdout) as { state: string }[];
      if (l[0]?.state === "connected") return;
      await new Promise((r) => setTimeout(r, 50));
    }
  };
  const valid = async (socket: string) =>
    (JSON.parse((await ok(socket, "--json", "checkpoint-list", "vm1")).stdout) as { name: string; valid: boolean | null }[]).map((c) => [
      c.name,
      c.valid,
    ]);
  await ok(d1.socket, "domain-add", "vm1", "--qmp", vm.qmpPath);
  await connected(d1.socket);
  await ok(d1.socket, "checkpoint-create-as", "vm1", "c1");
  await vm.write(0, 0x11, 0, 8 * MiB);
  await ok(d1.socket, "backup-begin", "vm1", "--bandwidth", "65536");
  const top = (await vm.monitor.execute("query-block"))._unsafeUnwrap()[0]?.inserted;
  t.not(top?.["node-name"], vm.disks[0]!.node, `a filter (${top?.drv}) is above the disk while the push runs`);

  await d1.stop("SIGKILL");
  const d2 = await startDaemon(t, { dir: d1.dir });
  await connected(d2.socket);
  t.same(await valid(d2.socket), [["c1", true]], "valid after the restart, the push still running");
  // the restarted daemon adopts the running push a moment after it connects (QEMU 10.0 takes longer)
  // (domjobinfo answers "Job type: None", exit 0, as virsh, until then)
  const adopted = async () =>
    ((JSON.parse((await cli(d2.socket, ["--json", "domjobinfo", "vm1"])).stdout || "{}") as { type?: string }).type ?? "None") !== "None";
  for (let i = 0; i < 200 && !(await adopted()); i++) await new Promise((r) => setTimeout(r, 50));
  await ok(d2.socket, "domjobabort", "vm1");
  t.same(await valid(d2.socket), [["c1", true]], "valid after the push ended");
});
