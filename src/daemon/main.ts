/** `qbackupd`: the daemon's entry point: flags, configuration, signals. Runs in the foreground (systemd style). */
import { parseArgs } from "node:util";
import { type ConfigFlags, loadConfig } from "../conf/config.js";
import { envLogLevel, rootLogger } from "../log.js";
import { Daemon } from "./daemon.js";

const USAGE = `usage: qbackupd [--config FILE] [--socket PATH] [--state-dir DIR] [--allow-dir DIR]...
                [--log-level LEVEL]

Runs in the foreground. Defaults: --config /etc/qbackupd/config.json (optional),
--socket /run/qbackupd/qbackupd.sock, --state-dir /var/lib/qbackupd,
--allow-dir <state-dir>/backups, --log-level info (trace, debug, info, warn,
error, fatal or silent; debug adds a line per API request). Flags override
the environment (QBACKUPD_LOG_LEVEL), which overrides the configuration file.
Signals: SIGHUP reloads the configuration; SIGTERM/SIGINT stop the daemon
(backup jobs keep running inside QEMU).`;

export async function main(argv: readonly string[]): Promise<number> {
  let values: { config?: string; socket?: string; "state-dir"?: string; "allow-dir"?: string[]; "log-level"?: string; help?: boolean };
  try {
    values = parseArgs({
      args: [...argv],
      options: {
        config: { type: "string" },
        socket: { type: "string" },
        "state-dir": { type: "string" },
        "allow-dir": { type: "string", multiple: true },
        "log-level": { type: "string" },
        help: { type: "boolean", short: "h" },
      },
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
  const envLevel = process.env.QBACKUPD_LOG_LEVEL;
  if (envLevel !== undefined && envLevel !== "" && envLogLevel() === undefined)
    process.stderr.write(`qbackupd: QBACKUPD_LOG_LEVEL=${JSON.stringify(envLevel)} is no level name; ignored\n`);
  const flags: ConfigFlags = {
    config: values.config,
    socket: values.socket,
    stateDir: values["state-dir"],
    allowDir: values["allow-dir"],
    logLevel: values["log-level"] ?? envLogLevel(),
  };
  const cfg = loadConfig(flags);
  if (cfg.isErr()) {
    process.stderr.write(`qbackupd: ${cfg.error.message}\n`);
    return 2;
  }
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
        // the level applies at once (a flag or the environment still wins over the file)
        rootLogger.level = next.value.logLevel ?? "info";
        void daemon.reload(next.value);
      }
    });
  });
}
