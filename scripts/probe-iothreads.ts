/**
 * Tries, on the QEMU on PATH, each backup step with a disk in an iothread
 * (a qemu-storage-daemon serving it as vhost-user-blk from iothread io0, as
 * production storage daemons do), each in a fresh process, and prints what
 * happened: "ok", or "aborts" with QEMU's last stderr line. This is how the
 * table in src/qmp/iothread-hazards.ts was decided; test/qemu/iothread-probe.test.ts
 * runs the same probes and fails when the table and QEMU disagree.
 *   node --import tsx scripts/probe-iothreads.ts
 */
import { probeAll } from "../test/helpers/iothread-probe.js";

const results = await probeAll();
for (const r of results) console.log(`${r.op.padEnd(28)} ${r.outcome}${r.detail ? `  (${r.detail})` : ""}`);
process.exit(0);
