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
 * line, errors included, lands at the unit's default priority (info). The
 * prefix is chosen by pino's own multistream (one stream per level, dedupe:
 * each line goes to the highest level's stream only), so no line is parsed
 * again to find its level.
 */
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

/** The daemon's starting level: QBACKUPD_LOG_LEVEL when valid, else info (the configuration may change it). */
export function envLogLevel(env: NodeJS.ProcessEnv = process.env): LevelWithSilent | undefined {
  const v = env.QBACKUPD_LOG_LEVEL;
  return isLogLevel(v) ? v : undefined;
}

function makeRoot(): Logger {
  const opts = loggerOptions(envLogLevel() ?? "info");
  // JOURNAL_STREAM: systemd.exec(5) sets it when stdout or stderr is connected to the journal
  if (process.env.JOURNAL_STREAM) {
    // multistream filters by its streams' levels too: open them all, the logger's level decides
    return pino(opts, journaldDestination(process.stdout));
  }
  return pino(opts);
}

export const rootLogger: Logger = makeRoot();
