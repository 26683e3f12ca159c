/** `qbackupd`: the daemon. (The service arrives with the API issue.) */
const USAGE = `usage: qbackupd [--config FILE] [--socket PATH] [--state-dir DIR] [--allow-dir DIR]...
qbackupd is not runnable as a service yet.`;

export function main(argv: readonly string[]): number {
  if (argv.includes("--help") || argv.includes("-h")) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  process.stderr.write(`${USAGE}\n`);
  return 2;
}
