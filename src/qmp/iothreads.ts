/**
 * Which disks may run in an iothread rather than QEMU's main loop.
 *
 * It matters for pull backups: on QEMU 7.2 (measured here, on a
 * qemu-storage-daemon whose disks run in iothreads, as when it serves
 * vhost-user-blk) two of a pull's steps abort QEMU outright, taking the
 * guest's storage with it:
 *   - blockdev-add of a fleecing image whose backing node is in an iothread
 *     ("qemu_mutex_unlock_impl: Operation not permitted");
 *   - an NBD client leaving an export that runs in an iothread
 *     (assertion in nbd_blockdev_client_closed), which a pull's export of
 *     such a disk would.
 * A push backup of the same disks runs fine. Read-only; changes nothing.
 */
import { okAsync, ResultAsync } from "neverthrow";
import type { QmpClient } from "./client.js";
import type { DiskInfo } from "./disks.js";
import type { QmpError } from "./errors.js";
import type { VersionTriple } from "./qapi.js";

/** The oldest QEMU allowed to pull from disks in iothreads: 7.2 is measured broken here; 8.0 and newer are not tested here. */
export const IOTHREAD_PULL_MIN_VERSION: VersionTriple = { major: 8, minor: 0, micro: 0 };

export interface IothreadDisk {
  readonly disk: string;
  /** The iothread's QOM path when the device names it; undefined when we cannot tell (so: maybe). */
  readonly iothread: string | undefined;
}

/**
 * Disks that run, or may run, in an iothread. None when QEMU has no
 * iothread. A virtio-blk device says which iothread it was given (its
 * `iothread` link); for any other device, and for a node no device uses
 * (qemu-storage-daemon, where an export may have moved it), we cannot tell,
 * and such a disk counts as maybe.
 */
export function disksInIothreads(client: QmpClient, disks: readonly DiskInfo[]): ResultAsync<IothreadDisk[], QmpError> {
  // qom-list rather than query-iothreads, which qemu-storage-daemon lacks
  return client.execute("qom-list", { path: "/objects" }).andThen((objects) => {
    const threads = objects.filter((o) => o.type === "child<iothread>");
    if (threads.length === 0) return okAsync<IothreadDisk[], QmpError>([]);
    return ResultAsync.combine(
      disks.map((d) =>
        d.qdev === undefined
          ? okAsync<IothreadDisk | undefined, QmpError>({ disk: d.name, iothread: undefined })
          : client
              .execute("qom-get", { path: d.qdev, property: "iothread" })
              .map((v): IothreadDisk | undefined => (typeof v === "string" && v !== "" ? { disk: d.name, iothread: v } : undefined))
              // no such property: not a virtio-blk device; its iothread, if any, is its controller's
              .orElse(() => okAsync({ disk: d.name, iothread: undefined })),
      ),
    ).map((xs) => xs.filter((x): x is IothreadDisk => x !== undefined));
  });
}
