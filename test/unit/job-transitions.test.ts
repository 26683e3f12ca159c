/** The job's phase table (src/jobs/transitions.ts), walked: every move allowed is listed, every other move throws. */
import t from "tap";
import type { JobState } from "../../src/jobs/model.js";
import {
  canTransition,
  checkTransition,
  IllegalTransition,
  type JobPhase,
  reportedState,
  TERMINAL,
  TRANSITIONS,
} from "../../src/jobs/transitions.js";

const PHASES = Object.keys(TRANSITIONS) as JobPhase[];

t.test("the table, as documented", async (t) => {
  t.same(TRANSITIONS, {
    begin: ["running", "serving", "finishing", "detached"],
    adopting: ["running", "serving", "finishing", "detached"],
    running: ["finishing", "detached"],
    serving: ["finishing", "detached"],
    finishing: ["ended", "detached"],
    ended: [],
    detached: [],
  });
});

t.test("every pair: allowed moves pass, the others throw IllegalTransition", async (t) => {
  for (const from of PHASES)
    for (const to of PHASES) {
      const allowed = TRANSITIONS[from].includes(to);
      t.equal(canTransition(from, to), allowed, `${from} → ${to}`);
      let thrown: unknown;
      try {
        checkTransition(from, to);
      } catch (e) {
        thrown = e;
      }
      t.equal(thrown instanceof IllegalTransition, !allowed, `${from} → ${to} ${allowed ? "passes" : "throws IllegalTransition"}`);
    }
});

t.test("every phase is reachable from begin or adopting, and every path ends in a terminal phase", async (t) => {
  const reach = new Set<JobPhase>(["begin", "adopting"]);
  for (let changed = true; changed; ) {
    changed = false;
    for (const p of [...reach])
      for (const q of TRANSITIONS[p])
        if (!reach.has(q)) {
          reach.add(q);
          changed = true;
        }
  }
  t.same([...reach].sort(), [...PHASES].sort());
  for (const p of PHASES) t.equal(TRANSITIONS[p].length === 0, TERMINAL.has(p), `${p}: terminal iff no way out`);
  // no cycles: a job never goes back
  const visit = (p: JobPhase, seen: Set<JobPhase>): boolean => !seen.has(p) && TRANSITIONS[p].every((q) => visit(q, new Set([...seen, p])));
  t.ok(visit("begin", new Set()) && visit("adopting", new Set()), "acyclic");
});

t.test("the reported state follows the phase", async (t) => {
  const prev: JobState = "begin";
  t.equal(reportedState("running", prev, undefined), "inprogress");
  t.equal(reportedState("serving", prev, undefined), "ready");
  t.equal(reportedState("finishing", "inprogress", "cancelled"), "inprogress", "finishing keeps what was reported until ended");
  t.equal(reportedState("ended", "inprogress", "cancelled"), "cancelled");
  t.equal(reportedState("ended", "ready", "ready"), "ready");
  t.equal(reportedState("detached", "inprogress", undefined), "inprogress");
});
