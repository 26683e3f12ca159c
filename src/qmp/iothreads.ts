/**
 * Which disks may run in an iothread rather than QEMU's main loop.
 *
 * It matters because some QEMU versions abort on backup steps with such
 * disks (qmp/iothread-hazards.ts says which, as tried on each version).
 * Read-only; changes nothing.
 */
import { errAsync, okAsync, ResultAsync } from "neverthrow";
import type { QmpClient } from "./client.js";
import type { DiskInfo } from "./disks.js";
import type { QmpError } from "./errors.js";

/** Disks a FUSE export serves (QEMU's own exports, not ours: ours are NBD). */
export function disksWithFuseExports(client: QmpClient, disks: readonly DiskInfo[]): ResultAsync<DiskInfo[], QmpError> {
  return client.execute("query-block-exports").map((exports) => {
    const served = new Set(exports.filter((e) => e.type === "fuse").map((e) => e["node-name"]));
    return disks.filter((d) => served.has(d.nodeName));
  });
}

export interface IothreadDisk {
  readonly disk: string;
  /** The iothread's QOM path when the device names it; undefined when we cannot tell (so: maybe). */
  readonly iothread: string | undefined;
}

/**
 * Disks that run, or may run, in an iothread. None when QEMU has no
 * iothread. A device says which iothread it was given (virtio-blk's own
 * `iothread` link), or its controller does (virtio-scsi's, found through the
 * device's `parent_bus`). A disk whose device says neither, or that no device
 * uses (qemu-storage-daemon, where an export may have moved it), counts as
 * maybe.
 */
export function disksInIothreads(client: QmpClient, disks: readonly DiskInfo[]): ResultAsync<IothreadDisk[], QmpError> {
  // qom-list rather than query-iothreads, which qemu-storage-daemon lacks;
  // a qemu-storage-daemon started without any --object has no /objects at all
  const objects = client
    .execute("qom-list", { path: "/objects" })
    .orElse((e) => (e.code === "command" && e.errorClass === "DeviceNotFound" ? okAsync<{ type: string }[], QmpError>([]) : errAsync(e)));
  return objects.andThen((objects) => {
    if (!objects.some((o) => o.type === "child<iothread>")) return okAsync<IothreadDisk[], QmpError>([]);
    return ResultAsync.combine(
      disks.map((d) =>
        (d.qdev === undefined ? okAsync<string | undefined, QmpError>(undefined) : iothreadOf(client, d.qdev)).map((thread) =>
          thread === "" ? undefined : { disk: d.name, iothread: thread },
        ),
      ),
    ).map((xs) => xs.filter((x): x is IothreadDisk => x !== undefined));
  });
}

/** The iothread a device runs in: its QOM path, "" for the main loop, undefined when neither it nor its controller says. */
function iothreadOf(client: QmpClient, qdev: string): ResultAsync<string | undefined, QmpError> {
  const link = (path: string) =>
    client
      .execute("qom-get", { path, property: "iothread" })
      .map((v) => (typeof v === "string" ? v : undefined))
      .orElse(() => okAsync<string | undefined, QmpError>(undefined));
  return link(qdev).andThen((own) => {
    if (own !== undefined) return okAsync(own);
    return client
      .execute("qom-get", { path: qdev, property: "parent_bus" })
      .andThen((bus) => (typeof bus === "string" && bus.includes("/") ? link(bus.slice(0, bus.lastIndexOf("/"))) : okAsync(undefined)))
      .orElse(() => okAsync<string | undefined, QmpError>(undefined));
  });
}
