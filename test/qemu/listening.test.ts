/**
 * util/listening: is anything accepting connections at a unix socket. The
 * daemon asks it when its QMP connection drops, to tell a dead QEMU (fail
 * the backup) from a live one (adopt the job again at reconnect).
 */
import net from "node:net";
import { join } from "node:path";
import t from "tap";
import { QmpClient } from "../../src/qmp/index.js";
import { listening, stillListening } from "../../src/util/listening.js";
import { execFileP, silentLogger, startVm, tempDir } from "../helpers/qemu.js";

t.test("a listener is listening; a socket nobody listens on, or no file, is not", async (t) => {
  const dir = tempDir(t);
  const path = join(dir, "s.sock");
  const server = net.createServer((c) => c.destroy());
  await new Promise<void>((r) => server.listen(path, r));
  t.equal(await listening({ path }), true);
  t.equal(await stillListening({ path }, [20]), true);
  await new Promise<void>((r) => server.close(() => r()));
  t.equal(await listening({ path }), false, "gone");
  // what a killed process leaves: the socket file, refusing (ECONNREFUSED)
  const refusing = join(dir, "dead.sock");
  await execFileP("python3", ["-c", `import socket; socket.socket(socket.AF_UNIX).bind(${JSON.stringify(refusing)})`]);
  t.equal(await listening({ path: refusing }), false, "refusing");
});

t.test("QEMU SIGKILLed: as its QMP connection drops, it is not taken for alive", async (t) => {
  // A single check right at the drop said 'alive' 7 times in 30 here; the daemon then kept a dead QEMU's backup waiting.
  const N = 15;
  let alive = 0;
  for (let i = 0; i < N; i++) {
    const vm = await startVm(t, { disks: [{ size: "16M" }] });
    const client = (await QmpClient.connect({ path: vm.qmpPath }, { logger: silentLogger }))._unsafeUnwrap();
    const verdict = new Promise<boolean>((r) => client.onClose(() => void stillListening({ path: vm.qmpPath }).then(r)));
    vm.proc.kill("SIGKILL");
    if (await verdict) alive++;
  }
  t.equal(alive, 0, `taken for alive ${alive} times in ${N}`);
  const live = await startVm(t, { disks: [{ size: "16M" }] });
  t.equal(await stillListening({ path: live.qmpPath }), true, "a running QEMU is alive");
});
