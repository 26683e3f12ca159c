/**
 * The iothread hazard table (src/qmp/iothread-hazards.ts) against the QEMU
 * under test: each step is tried on a fresh qemu-storage-daemon whose disk
 * runs in an iothread. What the table calls safe must run; what it refuses
 * must really abort this QEMU (so nothing is refused on a guess). A QEMU
 * version missing from the table fails here: try it, then add it.
 */
import { execFileSync } from "node:child_process";
import t from "tap";
import { IOTHREAD_TRIED, type IothreadOp, iothreadVerdict } from "../../src/qmp/iothread-hazards.js";
import { type ProbeOp, probe } from "../helpers/iothread-probe.js";

const out = execFileSync("qemu-system-x86_64", ["--version"], { encoding: "utf8" });
const m = /version (\d+)\.(\d+)\.(\d+)/.exec(out);
const version = { major: Number(m?.[1]), minor: Number(m?.[2]), micro: Number(m?.[3]) };
const label = `${version.major}.${version.minor}.${version.micro}`;

t.test(`QEMU ${label} is in the table of what was tried`, async (t) => {
  t.ok(
    IOTHREAD_TRIED.some((e) => e.major === version.major && e.minor === version.minor),
    `run scripts/probe-iothreads.ts on QEMU ${label} and add what it shows to src/qmp/iothread-hazards.ts`,
  );
});

const CHECKS: readonly [IothreadOp, ProbeOp][] = [
  ["push", "push"],
  ["push", "push-abort"],
  ["pull", "pull-export-client"],
];

for (const [op, p] of CHECKS) {
  t.test(`${op} (${p}) on QEMU ${label}: the table says what QEMU does`, async (t) => {
    const verdict = iothreadVerdict(version, op);
    const r = await probe(p);
    if (verdict.safe) t.equal(r.outcome, "ok", `the table allows ${op}: it must run (${r.detail ?? ""})`);
    else t.equal(r.outcome, "aborts", `the table refuses ${op} (${verdict.reason}): it must abort this QEMU (${r.detail ?? ""})`);
  });
}

t.test(`checkpoints (bitmap add, merge, remove) of a disk in an iothread run on QEMU ${label}`, async (t) => {
  const r = await probe("checkpoint-add-merge-remove");
  t.equal(r.outcome, "ok", r.detail ?? "");
});
