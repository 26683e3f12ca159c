/**
 * Which disks may run in an iothread rather than QEMU's main loop.
 *
 * It matters because QEMU 7.2 aborts outright on some backup steps with
 * disks in iothreads (measured here, on a qemu-storage-daemon whose disks run
 * in iothreads, as when it serves vhost-user-blk), taking the guest's storage
 * with it:
 *   - pull: blockdev-add of a fleecing image whose backing node is in an
 *     iothread ("qemu_mutex_unlock_impl: Operation not permitted"), and an
 *     NBD client leaving an export that runs in one (assertion in
 *     nbd_blockdev_client_closed), which a pull's export of such a disk would;
 *   - push: none of its own steps, but once any block job has run on a node
 *     that a FUSE export serves from an iothread, the export's next write
 *     aborts (bdrv_poll_co assertion). Without an iothread it does not.
 * Read-only; changes nothing.
 */
import { errAsync, okAsync, ResultAsync } from "neverthrow";
import type { QmpClient } from "./client.js";
import type { DiskInfo } from "./disks.js";
import type { QmpError } from "./errors.js";
import type { VersionTriple } from "./qapi.js";

/** The oldest QEMU not refused for the above: 7.2 is measured broken here; 8.0 and newer are not tested here. */
export const IOTHREAD_SAFE_MIN_VERSION: VersionTriple = { major: 8, minor: 0, micro: 0 };

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
