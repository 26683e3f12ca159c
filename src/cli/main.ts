/** `qbackup`: the command-line client of qbackupd. (The verbs arrive with the service.) */
const USAGE = `usage: qbackup [--socket PATH] [--json] VERB ...
qbackup talks to the qbackupd daemon; the daemon and its verbs are not built yet.`;

export function main(argv: readonly string[]): number {
  if (argv.includes("--help") || argv.includes("-h") || argv.length === 0) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  process.stderr.write(`qbackup: unknown verb '${argv[0]}'\n${USAGE}\n`);
  return 2;
}
