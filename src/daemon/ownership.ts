/**
 * One QEMU, one registration. Each domain leaves a marker object in the QEMU
 * it connects to (a `secret` object named qbk-owner-<domain tag>: the only
 * object type both qemu-system and qemu-storage-daemon have that does
 * nothing), so a second registration of the same QEMU — its second monitor,
 * or the same socket under another name — is recognised by QEMU itself, not
 * by comparing socket paths, and refused: two registrations would clean up,
 * abort and undo each other's backups. A marker whose domain is no longer
 * registered here (removed while QEMU was away, an older registration) is
 * taken over, with a log line. QEMU restarts clear the marker by themselves.
 */
import { errAsync, okAsync, ResultAsync } from "neverthrow";
import { domainTag } from "../jobs/plan.js";
import type { QmpClient } from "../qmp/client.js";
import type { QmpError } from "../qmp/errors.js";

const MARKER_PREFIX = "qbk-owner-";

export function ownerMarkerId(domain: string): string {
  return `${MARKER_PREFIX}${domainTag(domain)}`;
}

export type ClaimError =
  | { readonly code: "registered-twice"; readonly message: string; readonly other: string }
  | { readonly code: "qmp"; readonly message: string; readonly cause: QmpError };

export interface ClaimResult {
  /** Markers of domains not registered here that were removed. */
  readonly takenOver: readonly string[];
}

/**
 * Claim `client`'s QEMU for `domain`. `registeredAs(tag)` names the other
 * domain registered here whose marker tag that is, if any.
 */
export function claimQemu(
  client: QmpClient,
  domain: string,
  registeredAs: (tag: string) => string | undefined,
): ResultAsync<ClaimResult, ClaimError> {
  const mine = ownerMarkerId(domain);
  const markers = (): ResultAsync<string[], ClaimError> =>
    client
      .execute("qom-list", { path: "/objects" })
      .orElse((e) => (e.code === "command" && e.errorClass === "DeviceNotFound" ? okAsync<{ name: string }[], QmpError>([]) : errAsync(e)))
      .mapErr((e): ClaimError => ({ code: "qmp", message: "cannot list QEMU's objects", cause: e }))
      .andThen((objs: unknown) =>
        // a peer that is not QEMU may answer anything: check the shape before using it
        Array.isArray(objs)
          ? okAsync<string[], ClaimError>(
              objs.flatMap((o: unknown) => {
                const n = typeof o === "object" && o !== null ? (o as { name?: unknown }).name : undefined;
                return typeof n === "string" && n.startsWith(MARKER_PREFIX) ? [n] : [];
              }),
            )
          : errAsync<string[], ClaimError>({
              code: "qmp",
              message: "cannot list QEMU's objects",
              cause: { code: "protocol", message: "qom-list answered with something other than a list" },
            }),
      );
  const rival = (found: readonly string[]): ClaimError | undefined => {
    for (const m of found) {
      if (m === mine) continue;
      const other = registeredAs(m.slice(MARKER_PREFIX.length));
      if (other !== undefined)
        return {
          code: "registered-twice",
          other,
          message: `this QEMU is already registered as domain '${other}'; two registrations of one QEMU would undo each other's backups (domain-remove one of them)`,
        };
    }
    return undefined;
  };
  return markers().andThen((before) => {
    const r = rival(before);
    if (r !== undefined) return errAsync<ClaimResult, ClaimError>(r);
    const stale = before.filter((m) => m !== mine);
    const dropStale = ResultAsync.combine(
      stale.map((id) =>
        client
          .execute("object-del", { id })
          .map(() => id)
          .mapErr((e): ClaimError => ({ code: "qmp", message: `cannot remove the stale marker ${id}`, cause: e })),
      ),
    );
    const add = before.includes(mine)
      ? okAsync<unknown, ClaimError>(undefined)
      : client
          .execute("object-add", { "qom-type": "secret", id: mine, data: "qbackupd" })
          .mapErr((e): ClaimError => ({ code: "qmp", message: "cannot leave the ownership marker in QEMU", cause: e }));
    // Two registrations connecting at once both see no marker and both add
    // theirs; QEMU runs commands one at a time, so whichever looks again
    // later sees the other's and steps back. (Both may step back; neither
    // then claims, which is safe, and a retry settles it.)
    return dropStale.andThen((takenOver) =>
      add
        .andThen(() => markers())
        .andThen((after) => {
          const late = rival(after);
          if (late === undefined) return okAsync<ClaimResult, ClaimError>({ takenOver });
          return ResultAsync.fromSafePromise(releaseQemu(client, domain)).andThen(() => errAsync<ClaimResult, ClaimError>(late));
        }),
    );
  });
}

/** Remove our marker (domain-remove): best effort, QEMU may be gone. */
export function releaseQemu(client: QmpClient, domain: string): Promise<void> {
  return client
    .execute("object-del", { id: ownerMarkerId(domain) })
    .map(() => undefined)
    .unwrapOr(undefined);
}
