/**
 * qbackupd's command-line flags, defined once: the parser's options, the
 * usage text and the man page are all generated from this table, so they
 * cannot disagree. Pure; never reads the configuration or starts anything.
 */
import type { ParseArgsConfig } from "node:util";

interface FlagDef {
  readonly name: string;
  readonly short?: string;
  /** The value's placeholder; none: a boolean flag. */
  readonly value?: string;
  readonly multiple?: boolean;
  readonly help: string;
}

export const DAEMON_FLAGS: readonly FlagDef[] = [
  { name: "config", value: "FILE", help: "configuration file (default /etc/qbackupd/config.json, optional)" },
  { name: "socket", value: "PATH", help: "API socket (default /run/qbackupd/qbackupd.sock)" },
  { name: "state-dir", value: "DIR", help: "checkpoints, registered domains, job records (default /var/lib/qbackupd)" },
  { name: "backup-dir", value: "DIR", help: "where the targets of a backup without XML are generated (default <state-dir>/backups)" },
  {
    name: "allow-dir",
    value: "DIR",
    multiple: true,
    help: "targets and scratch files must lie under one of these (repeatable; default <backup-dir>); a warning at start when backup-dir falls outside them",
  },
  {
    name: "log-level",
    value: "LEVEL",
    help: "trace, debug, info, warn, error, fatal or silent (default info; debug adds a line per API request); wins over QBACKUPD_LOG_LEVEL, which wins over the configuration file",
  },
  {
    name: "check-config",
    value: "FILE",
    help: "validate FILE (with the other flags), print the warnings start-up would print, exit 0 (valid) or 2",
  },
  { name: "manpage", help: "print this man page (roff) and exit" },
  { name: "version", short: "V", help: "print the version and exit" },
  { name: "help", short: "h", help: "print the usage and exit" },
];

export function daemonParseOptions(): NonNullable<ParseArgsConfig["options"]> {
  return Object.fromEntries(
    DAEMON_FLAGS.map((f) => [
      f.name,
      {
        type: f.value === undefined ? ("boolean" as const) : ("string" as const),
        ...(f.short ? { short: f.short } : {}),
        ...(f.multiple ? { multiple: true } : {}),
      },
    ]),
  );
}

const flagText = (f: FlagDef) => `${f.short ? `-${f.short}, ` : ""}--${f.name}${f.value ? ` ${f.value}` : ""}`;

const SIGNALS = "SIGHUP reloads the configuration; SIGTERM/SIGINT stop the daemon (backup jobs keep running inside QEMU).";

export function daemonUsage(): string {
  const w = Math.max(...DAEMON_FLAGS.map((f) => flagText(f).length));
  return `usage: qbackupd [FLAGS]

Runs in the foreground. Flags override the configuration file.
${DAEMON_FLAGS.map((f) => `  ${flagText(f).padEnd(w)}  ${f.help}`).join("\n")}
Signals: ${SIGNALS}`;
}

const roff = (s: string) =>
  s
    .replace(/\\/g, "\\e")
    .replace(/^([.'])/gm, "\\&$1")
    .replace(/-/g, "\\-");

export function daemonManPage(version: string): string {
  return `.TH QBACKUPD 8 "" "qbackupd ${version}" "System Administration"
.SH NAME
qbackupd \\- backup daemon for QEMU: push and pull backups with dirty\\-bitmap checkpoints over QMP
.SH SYNOPSIS
.B qbackupd
[\\fIFLAGS\\fR]
.SH DESCRIPTION
Runs in the foreground (systemd style) and serves an HTTP API on a unix socket; \\fBqbackup\\fR(1) is its client. Flags override the configuration file.
.SH OPTIONS
${DAEMON_FLAGS.map((f) => `.TP\n.B ${roff(flagText(f))}\n${roff(f.help)}\n`).join("")}.SH SIGNALS
${roff(SIGNALS)}
.SH EXIT STATUS
0 on a clean stop or a valid \\fB\\-\\-check\\-config\\fR; 1 when the daemon cannot start; 2 on bad flags or an invalid configuration.
.SH SEE ALSO
.BR qbackup (1)
`;
}
