/** `qbackupd`: the daemon's entry point: flags, configuration, signals. Runs in the foreground (systemd style). */
import { parseArgs } from "node:util";
import { type ConfigFlags, configWarnings, loadConfig } from "../conf/config.js";
import { envLogLevel, rootLogger } from "../log.js";
import { packageVersion } from "../version.js";
import { Daemon } from "./daemon.js";
import { daemonManPage, daemonParseOptions, daemonUsage } from "./flags.js";

const USAGE = daemonUsage();

export async function main(argv: readonly string[]): Promise<number> {
  let values: {
    config?: string;
    socket?: string;
    "state-dir"?: string;
    "backup-dir"?: string;
    "allow-dir"?: string[];
    "check-config"?: string;
    "log-level"?: string;
    manpage?: boolean;
    help?: boolean;
    version?: boolean;
  };
  try {
    values = parseArgs({
      args: [...argv],
      options: daemonParseOptions(),
      strict: true,
    }).values;
  } catch (e) {
    process.stderr.write(`qbackupd: ${(e as Error).message}\n${USAGE}\n`);
    return 2;
  }
  if (values.help) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  if (values.manpage) {
    process.stdout.write(daemonManPage(packageVersion()));
    return 0;
  }
  if (values.version) {
    process.stdout.write(`${packageVersion()}\n`);
    return 0;
  }
  const checkOnly = values["check-config"];
  if (checkOnly !== undefined && values.config !== undefined && values.config !== checkOnly) {
    process.stderr.write("qbackupd: --check-config names the file to check; leave out --config\n");
    return 2;
  }
  const envLevel = process.env.QBACKUPD_LOG_LEVEL;
  if (envLevel !== undefined && envLevel !== "" && envLogLevel() === undefined)
    process.stderr.write(`qbackupd: QBACKUPD_LOG_LEVEL=${JSON.stringify(envLevel)} is no level name; ignored\n`);
  const flags: ConfigFlags = {
    config: checkOnly ?? values.config,
    socket: values.socket,
    stateDir: values["state-dir"],
    backupDir: values["backup-dir"],
    allowDir: values["allow-dir"],
    logLevel: values["log-level"] ?? envLogLevel(),
  };
  const cfg = loadConfig(flags);
  if (cfg.isErr()) {
    process.stderr.write(`qbackupd: ${cfg.error.message}\n`);
    return 2;
  }
  const warnings = configWarnings(cfg.value);
  if (checkOnly !== undefined) {
    for (const w of warnings) process.stderr.write(`qbackupd: warning: ${w}\n`);
    process.stdout.write(`${checkOnly}: configuration OK\n`);
    return 0;
  }
  for (const w of warnings) rootLogger.warn({ backupDir: cfg.value.backupDir, allowDirs: cfg.value.allowDirs }, w);
  rootLogger.level = cfg.value.logLevel ?? "info";
  let daemon: Daemon;
  try {
    daemon = await Daemon.start(cfg.value, rootLogger);
  } catch (e) {
    process.stderr.write(`qbackupd: cannot start: ${(e as Error).message}\n`);
    return 1;
  }
  return new Promise<number>((resolve) => {
    let stopping = false;
    const stop = (sig: string) => {
      if (stopping) return;
      stopping = true;
      rootLogger.info({ signal: sig }, "stopping");
      daemon.stop().then(
        () => resolve(0),
        () => resolve(1),
      );
    };
    process.on("SIGTERM", () => stop("SIGTERM"));
    process.on("SIGINT", () => stop("SIGINT"));
    process.on("SIGHUP", () => {
      const next = loadConfig(flags);
      if (next.isErr()) rootLogger.error({ error: next.error.message }, "reload refused: configuration invalid");
      else {
        for (const w of configWarnings(next.value))
          rootLogger.warn({ backupDir: next.value.backupDir, allowDirs: next.value.allowDirs }, w);
        // the level applies at once (a flag or the environment still wins over the file)
        rootLogger.level = next.value.logLevel ?? "info";
        void daemon.reload(next.value);
      }
    });
  });
}
