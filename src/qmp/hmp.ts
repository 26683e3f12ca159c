/**
 * human-monitor-command reports HMP errors as text inside a successful
 * `return`; this turns the ones we recognise into QmpErrors.
 */
import { errAsync, okAsync, type ResultAsync } from "neverthrow";
import type { QmpClient } from "./client.js";
import type { QmpError } from "./errors.js";

const HMP_FAILURE = /^(Error|.*failed)[: ]|Device .* not found|does not have a block device backend|Permission conflict/im;

export function hmp(client: QmpClient, commandLine: string): ResultAsync<string, QmpError> {
  return client.execute("human-monitor-command", { "command-line": commandLine }).andThen((out) =>
    HMP_FAILURE.test(out)
      ? errAsync<never, QmpError>({
          code: "command",
          command: `human-monitor-command ${commandLine}`,
          errorClass: "HmpError",
          desc: out.trim(),
        })
      : okAsync(out),
  );
}

/** Guest-visible I/O through a device (so copy-before-write sees it): `qemu-io -d <qdev> "<cmd>"`. */
export function qemuIoDevice(client: QmpClient, qdev: string, ioCommand: string): ResultAsync<string, QmpError> {
  return hmp(client, `qemu-io -d ${qdev} "${ioCommand.replace(/["\\]/g, "")}"`);
}
