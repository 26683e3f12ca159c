/** The short form of scripts/abort-race: aborts racing begins through the daemon, with a daemon kill -9 every 10 rounds. */
import t from "tap";
import { abortRace } from "../../scripts/lib/abort-race.js";

t.test(
  "aborts racing begins (push/pull, with and without checkpoints), daemon killed every 10 rounds: every answer true, nothing left",
  async (t) => {
    // each round on stderr: a run that stalls shows where
    const r = await abortRace(t, { rounds: 30, killEvery: 10, seed: 7, log: (s) => process.stderr.write(`abort-race: ${s}\n`) });
    t.comment(`answers: ${JSON.stringify(r.answers)}`);
    t.same(r.failures, [], "no failure");
    t.ok((r.answers.cancelled ?? 0) > 0, "some aborts landed while the backup was starting or running");
    t.equal(r.kills, 3);
  },
);
