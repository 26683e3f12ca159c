/**
 * Crash points, for the reliability tests: started with QBACKUPD_CRASH_AT=NAME
 * in its environment, the daemon kills itself with SIGKILL (as an OOM kill or
 * a power cut would stop it) on reaching the point of that name. The tests
 * use it to crash the daemon between each job-record write and the step it
 * precedes, and check that the next start cleans up or finishes the job.
 * Without the variable this is one string comparison.
 */
const CRASH_AT = process.env.QBACKUPD_CRASH_AT;

export function crashPoint(name: string): void {
  // SIGKILL to ourselves is delivered as the kill() call returns: nothing after it runs
  if (CRASH_AT === name) process.kill(process.pid, "SIGKILL");
}
