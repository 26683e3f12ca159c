/**
 * The long form of the abort race (issue 11): 300 rounds of aborts racing
 * begins at random delays of 0–100 ms, push and pull, with and without
 * checkpoints, a daemon kill -9 every 20 rounds.
 *   node --import tsx scripts/abort-race.ts [--rounds 300] [--kill-every 20] [--seed 11]
 */
import { parseArgs } from "node:util";
import { abortRace } from "./lib/abort-race.js";
import { Cleanup } from "./lib/teardown.js";

const { values } = parseArgs({
  options: {
    rounds: { type: "string", default: "300" },
    "kill-every": { type: "string", default: "20" },
    seed: { type: "string", default: "11" },
  },
});
const cleanup = new Cleanup();
const started = Date.now();
try {
  const r = await abortRace(cleanup, {
    rounds: Number(values.rounds),
    killEvery: Number(values["kill-every"]),
    seed: Number(values.seed),
    log: (s) => console.log(`• ${s}`),
  });
  console.log(`${r.rounds} rounds, ${r.kills} daemon kills, ${((Date.now() - started) / 1000).toFixed(0)} s`);
  console.log(`  abort answers: ${JSON.stringify(r.answers)}`);
  console.log(r.failures.length === 0 ? "  every answer true, nothing left behind" : `  FAILURES:\n  ${r.failures.join("\n  ")}`);
  if (r.failures.length > 0) process.exitCode = 1;
} finally {
  await cleanup.run();
}
