/**
 * QMP client benchmark against real QEMU: round-trip latency (p50, p99) and
 * pipelined throughput, beside a minimal raw-socket client in the same run.
 *   node --import tsx scripts/bench-qmp.ts [--rounds N] [--pipelined N]
 * Targets (issue 2): p50 within 1.5x of raw; at least 5,000 pipelined cmds/s.
 * The raw client negotiates what QmpClient does ("oob" when offered); a third
 * line shows the raw client without it, for what that capability is worth.
 */
import net from "node:net";
import { parseArgs } from "node:util";
import { QmpClient } from "../src/qmp/index.js";
import { silentLogger, startVm } from "../test/helpers/qemu.js";
import { Cleanup } from "./lib/teardown.js";

const { values } = parseArgs({ options: { rounds: { type: "string", default: "3000" }, pipelined: { type: "string", default: "20000" } } });
const ROUNDS = Number(values.rounds);
const PIPELINED = Number(values.pipelined);

/** The baseline: connect, negotiate, then one line out, one line in. No ids, no parsing beyond newline. */
class RawClient {
  private buf = "";
  private waiters: ((l: string) => void)[] = [];
  private constructor(private readonly sock: net.Socket) {
    sock.setNoDelay(true);
    sock.setEncoding("utf8");
    sock.on("data", (d: string) => {
      // Lines are only counted here, not parsed: the cheapest possible reader.
      let start = 0;
      let nl = d.indexOf("\n");
      while (nl !== -1) {
        const line = this.buf + d.slice(start, nl);
        this.buf = "";
        this.waiters.shift()?.(line);
        start = nl + 1;
        nl = d.indexOf("\n", start);
      }
      this.buf += d.slice(start);
    });
  }
  /** `oob`: negotiate it as QmpClient does when QEMU offers it (QEMU then reads pipelined commands ahead). */
  static async connect(path: string, oob: boolean): Promise<RawClient> {
    const sock = net.createConnection(path);
    await new Promise((r) => sock.once("connect", r));
    const c = new RawClient(sock);
    const greeting = await c.next();
    const enable = oob && greeting.includes('"oob"') ? ',"arguments":{"enable":["oob"]}' : "";
    await c.cmd(`{"execute":"qmp_capabilities"${enable},"id":"cap"}\n`);
    return c;
  }
  next(): Promise<string> {
    return new Promise((r) => this.waiters.push(r));
  }
  cmd(line: string): Promise<string> {
    const p = this.next();
    this.out.push(line);
    if (this.out.length === 1) queueMicrotask(() => this.sock.write(this.out.splice(0).join("")));
    return p;
  }
  private readonly out: string[] = [];
  close(): void {
    this.sock.destroy();
  }
}

function pct(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}

async function latency(run: () => Promise<unknown>): Promise<{ p50: number; p99: number }> {
  for (let i = 0; i < 200; i++) await run(); // warm-up
  const t: number[] = [];
  for (let i = 0; i < ROUNDS; i++) {
    const s = process.hrtime.bigint();
    await run();
    t.push(Number(process.hrtime.bigint() - s) / 1e6);
  }
  t.sort((a, b) => a - b);
  return { p50: pct(t, 50), p99: pct(t, 99) };
}

async function throughput(runAll: () => Promise<unknown>): Promise<number> {
  const s = process.hrtime.bigint();
  await runAll();
  return PIPELINED / (Number(process.hrtime.bigint() - s) / 1e9);
}

const TRIALS = 5;
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

const cleanup = new Cleanup();
try {
  const vm = await startVm(cleanup);
  // The baseline sends the same bytes as QmpClient (a unique id per command: QEMU
  // must echo it, which costs QEMU measurable time), but does no correlation,
  // no parsing beyond the newline, no timeouts.
  let n = 0;
  const line = () => `{"execute":"query-version","id":${++n}}\n`;
  const rawLat: { p50: number; p99: number }[] = [];
  const ourLat: { p50: number; p99: number }[] = [];
  const rawTput: number[] = [];
  const rawNoOobTput: number[] = [];
  const ourTput: number[] = [];
  // A QMP monitor serves one client at a time, so the two take turns; trials
  // interleave so drift on a busy machine hits both alike.
  for (let trial = 0; trial < TRIALS; trial++) {
    const raw = await RawClient.connect(vm.qmpPath, true);
    rawLat.push(await latency(() => raw.cmd(line())));
    rawTput.push(await throughput(() => Promise.all(Array.from({ length: PIPELINED }, () => raw.cmd(line())))));
    raw.close();
    const plain = await RawClient.connect(vm.qmpPath, false);
    rawNoOobTput.push(await throughput(() => Promise.all(Array.from({ length: PIPELINED }, () => plain.cmd(line())))));
    plain.close();
    const client = (await QmpClient.connect({ path: vm.qmpPath }, { logger: silentLogger }))._unsafeUnwrap();
    ourLat.push(await latency(async () => await client.execute("query-version")));
    ourTput.push(
      await throughput(async () => {
        const rs = await Promise.all(Array.from({ length: PIPELINED }, () => client.execute("query-version")));
        if (rs.some((r) => r.isErr())) throw new Error("a pipelined command failed");
      }),
    );
    await client.close();
  }
  const f = (x: number) => x.toFixed(3);
  const rl = { p50: median(rawLat.map((x) => x.p50)), p99: median(rawLat.map((x) => x.p99)) };
  const ol = { p50: median(ourLat.map((x) => x.p50)), p99: median(ourLat.map((x) => x.p99)) };
  const rt = median(rawTput);
  const ot = median(ourTput);
  console.log(`QEMU ${(await vm.monitor.execute("query-version"))._unsafeUnwrap().package}; medians of ${TRIALS} interleaved trials`);
  console.log(`Round trip (query-version, ${ROUNDS} sequential per trial):`);
  console.log(`  raw socket : p50 ${f(rl.p50)} ms  p99 ${f(rl.p99)} ms`);
  console.log(`  QmpClient  : p50 ${f(ol.p50)} ms  p99 ${f(ol.p99)} ms   (p50 ratio ${(ol.p50 / rl.p50).toFixed(2)}x, target <= 1.5x)`);
  console.log(`Pipelined (${PIPELINED} in flight at once):`);
  console.log(`  raw socket, oob not enabled : ${Math.round(median(rawNoOobTput))} cmds/s   (QEMU reads one command at a time)`);
  console.log(`  raw socket : ${Math.round(rt)} cmds/s`);
  console.log(`  QmpClient  : ${Math.round(ot)} cmds/s   (${(ot / rt).toFixed(2)}x of raw, target >= 5000/s)`);
} finally {
  await cleanup.run();
}
