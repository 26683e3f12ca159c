/**
 * The process-wide pino logger. Library modules take a `Logger` in their
 * options and fall back to a child of this one; nothing here writes anywhere
 * but stdout, and nothing here decides the level from the configuration
 * (main.ts does, at start and on SIGHUP).
 *
 * Lines are pino's JSON with the level as its name ("level":"warn"), so a
 * reader of `journalctl -o cat` or a log shipper needs no table of pino's
 * numbers. Under systemd (JOURNAL_STREAM set: stdout is the journal) each
 * line also starts with the sd-daemon(3) priority prefix (`<4>` for warn),
 * which journald strips and files as the entry's PRIORITY — without it every
 * line, errors included, lands at the unit's default priority (info). As
 * systemd.exec(5) advises, JOURNAL_STREAM counts only when its device:inode is
 * stdout's own (a child started from a unit with stdout elsewhere inherits
 * the variable). The
 * prefix is chosen by pino's own multistream (one stream per level, dedupe:
 * each line goes to the highest level's stream only), so no line is parsed
 * again to find its level.
 */
import { fstatSync } from "node:fs";
import { type DestinationStream, type Level, type LevelWithSilent, type Logger, type LoggerOptions, pino } from "pino";

export type { Logger };

/** pino's level names, in the order of their numbers. */
export const LOG_LEVELS: readonly LevelWithSilent[] = ["trace", "debug", "info", "warn", "error", "fatal", "silent"];

export function isLogLevel(v: unknown): v is LevelWithSilent {
  return typeof v === "string" && (LOG_LEVELS as readonly string[]).includes(v);
}

/** syslog(3) priorities (sd-daemon(3) prefixes) for pino's levels: trace and debug are both LOG_DEBUG. */
export const SYSLOG_PRIORITY: Readonly<Record<Level, number>> = {
  trace: 7,
  debug: 7,
  info: 6,
  warn: 4,
  error: 3,
  fatal: 2,
};

/** pino options shared by every qbackupd logger: the level by name. */
export function loggerOptions(level: LevelWithSilent): LoggerOptions {
  return {
    name: "qbackupd",
    level,
    formatters: { level: (label) => ({ level: label }) },
  };
}

/**
 * A destination writing each line to `out` behind its sd-daemon priority
 * prefix. pino.multistream with dedupe gives a line to the stream of the
 * highest level not above the line's own, so one stream per level suffices.
 */
export function journaldDestination(out: { write(s: string): unknown }): DestinationStream {
  const levels = Object.keys(SYSLOG_PRIORITY) as Level[];
  return pino.multistream(
    levels.map((level) => ({
      level,
      stream: { write: (line: string) => out.write(`<${SYSLOG_PRIORITY[level]}>${line}`) },
    })),
    { dedupe: true },
  );
}

/** QBACKUPD_LOG_LEVEL when it names a level (else undefined: the configuration's, or info). */
export function envLogLevel(env: NodeJS.ProcessEnv = process.env): LevelWithSilent | undefined {
  const v = env.QBACKUPD_LOG_LEVEL;
  return isLogLevel(v) ? v : undefined;
}

/** Whether `fd` is the journal stream systemd named in JOURNAL_STREAM ("device:inode", decimal). */
export function isJournalStream(env: NodeJS.ProcessEnv = process.env, fd = 1): boolean {
  const m = /^(\d+):(\d+)$/.exec(env.JOURNAL_STREAM ?? "");
  if (m === null) return false;
  try {
    const st = fstatSync(fd, { bigint: true });
    return st.dev === BigInt(m[1]!) && st.ino === BigInt(m[2]!);
  } catch {
    return false;
  }
}

function makeRoot(): Logger {
  const opts = loggerOptions(envLogLevel() ?? "info");
  if (isJournalStream()) {
    // multistream filters by its streams' levels too: open them all, the logger's level decides
    return pino(opts, journaldDestination(pino.destination({ dest: 1, sync: true })));
  }
  return pino(opts);
}

export const rootLogger: Logger = makeRoot();
