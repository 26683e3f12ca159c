/**
 * The phases of a backup job and the only moves between them. Every phase
 * change of a BackupJob goes through `checkTransition`; a move not in the
 * table is a bug and throws (it must never be reachable from input).
 *
 *   begin ──► running (push started) ──► finishing ──► ended
 *     │   └─► serving (pull exported) ─┘      ▲
 *     └────────────────────────────────────────┘ (begin failed or aborted: undo)
 *   adopting (after a restart) ──► running | serving | finishing
 *   begin | adopting | running | serving ──► detached (the daemon stops
 *     following; QEMU keeps what it has and the record says what; the next
 *     connect adopts it again with a new instance)
 *   finishing ──► detached (undo could not reach QEMU, which still runs:
 *     the record keeps the outcome asked for, the next connect finishes it)
 *
 * What this module must never do: act. It only says what may follow what;
 * libvirt's prepare / start / end phases are the model.
 */
import type { JobOutcome, JobState } from "./model.js";

export type JobPhase = "begin" | "adopting" | "running" | "serving" | "finishing" | "ended" | "detached";

export const TRANSITIONS: Readonly<Record<JobPhase, readonly JobPhase[]>> = {
  begin: ["running", "serving", "finishing", "detached"],
  adopting: ["running", "serving", "finishing", "detached"],
  running: ["finishing", "detached"],
  serving: ["finishing", "detached"],
  finishing: ["ended", "detached"],
  ended: [],
  detached: [],
};

export const TERMINAL: ReadonlySet<JobPhase> = new Set(["ended", "detached"]);

export function canTransition(from: JobPhase, to: JobPhase): boolean {
  return TRANSITIONS[from].includes(to);
}

export class IllegalTransition extends Error {
  constructor(
    readonly from: JobPhase,
    readonly to: JobPhase,
  ) {
    super(`illegal backup job transition ${from} → ${to}`);
  }
}

export function checkTransition(from: JobPhase, to: JobPhase): void {
  if (!canTransition(from, to)) throw new IllegalTransition(from, to);
}

/**
 * The state a job reports in a phase: begin and adopting keep what was
 * reported before, finishing too (until ended says the outcome).
 */
export function reportedState(to: JobPhase, previous: JobState, outcome: JobOutcome | undefined): JobState {
  switch (to) {
    case "running":
      return "inprogress";
    case "serving":
      return "ready";
    case "ended":
      return outcome ?? previous;
    case "begin":
    case "adopting":
    case "finishing":
    case "detached":
      return previous;
  }
}
