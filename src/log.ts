/**
 * The process-wide pino logger. Library modules take a `Logger` in their
 * options and fall back to a child of this one; nothing here writes anywhere
 * but stdout (journald-friendly JSON).
 */
import { type Logger, pino } from "pino";

export type { Logger };

export const rootLogger: Logger = pino({
  name: "qbackupd",
  level: process.env.QBACKUPD_LOG_LEVEL ?? "info",
});
