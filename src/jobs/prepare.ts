/**
 * Preparation of a backup, before QEMU is touched: parse the XML, discover
 * the disks, align the definition, check every checkpoint an incremental
 * starts from against QEMU now, refuse what this QEMU cannot do safely,
 * check the paths, plan each disk and the NBD server. The result is a plan
 * (PreparedBackup) the registry turns into a job.
 *
 * What this module must never do: change anything in QEMU, the checkpoint
 * store or a job record. The one thing it creates is the domain's directory
 * of generated files.
 */
import { randomBytes } from "node:crypto";
import { chown } from "node:fs/promises";
import { join } from "node:path";
import { errAsync, okAsync, ResultAsync } from "neverthrow";
import { fromQmp } from "../checkpoints/errors.js";
import type { PreparedCheckpoint } from "../checkpoints/manager.js";
import { type BackupDef, type BackupDiskDef, backupDefAlign, backupDefParse } from "../conf/backup.js";
import { type CheckpointDef, checkpointDefParse } from "../conf/checkpoint.js";
import { fileStem } from "../conf/names.js";
import type { Logger } from "../log.js";
import { formatVersion } from "../qmp/capabilities.js";
import type { QmpClient } from "../qmp/client.js";
import { type DiskInfo, discoverDisks } from "../qmp/disks.js";
import type { QmpError } from "../qmp/errors.js";
import { iothreadVerdict } from "../qmp/iothread-hazards.js";
import { disksInIothreads, disksWithFuseExports, type IothreadDisk } from "../qmp/iothreads.js";
import { ensureDir, type IoError, ioError } from "../util/atomic-file.js";
import type { BackupDomain, BeginOptions } from "./domain.js";
import type { BackupError } from "./errors.js";
import type { NbdServerPlan } from "./model.js";
import { checkBackupPath, checkSocketPath } from "./paths.js";
import { type DiskPlan, ownNames, type PlanOptions, planDisk } from "./plan.js";
import { freeTcpPort } from "./ports.js";

export interface PreparerOptions {
  readonly logger: Logger;
  readonly backupDir: string;
  readonly allowedDirs: readonly string[];
  readonly tlsDir?: string | undefined;
  readonly allowPlainTcp?: boolean | undefined;
}

/** Everything a job needs, decided and checked. */
export interface PreparedBackup {
  readonly id: string;
  /** The definition with every default filled in (what backup-dumpxml shows). */
  readonly def: BackupDef;
  readonly plans: DiskPlan[];
  readonly planOpts: PlanOptions;
  readonly checkpoint: PreparedCheckpoint | undefined;
  readonly nbd: NbdServerPlan | undefined;
}

/** The domain's directory of generated files belongs to QEMU's user when that is not ours (it must create nothing there, but reach the files). */
function giveDir(dir: string, owner: BackupDomain["imageOwner"]): ResultAsync<void, IoError> {
  if (owner === undefined) return okAsync(undefined);
  return ResultAsync.fromPromise(chown(dir, owner.uid, owner.gid), (e) =>
    ioError(`cannot give ${dir} to QEMU's user ${owner.uid}:${owner.gid}`, e),
  );
}

function planOptions(mode: BackupDef["mode"], domain: BackupDomain, opts: BeginOptions): PlanOptions {
  return {
    mode,
    reuse: opts.reuseExternal === true,
    bandwidth: opts.bandwidth,
    backupPerf: domain.backupPerf,
    ...(opts.durable === false ? { nonDurable: true } : {}),
    ...(domain.imageOwner !== undefined ? { imageOwner: { ...domain.imageOwner } } : {}),
  };
}

/**
 * Refuse, before QEMU is touched, a backup step that aborts this QEMU
 * version with a disk in an iothread, as tried on that version
 * (qmp/iothread-hazards.ts). A push counts disks a FUSE export serves
 * separately: 7.2 runs the push but the export's next write aborts.
 */
function refuseIothreadHazards(client: QmpClient, mode: BackupDef["mode"], disks: readonly DiskInfo[]): ResultAsync<void, BackupError> {
  const v = client.version.qemu;
  const plain = iothreadVerdict(v, mode);
  const fuse = iothreadVerdict(v, "push-with-fuse-export");
  if (plain.safe && (mode === "pull" || fuse.safe)) return okAsync(undefined);
  const fused = mode === "push" && plain.safe ? disksWithFuseExports(client, disks) : okAsync<DiskInfo[], QmpError>([...disks]);
  const reason = mode === "push" && plain.safe ? fuse.reason : plain.reason;
  return fused
    .andThen((c) => (c.length === 0 ? okAsync<IothreadDisk[], QmpError>([]) : disksInIothreads(client, c)))
    .mapErr((e): BackupError => fromQmp("cannot tell which disks run in iothreads", e))
    .andThen((found) => {
      if (found.length === 0) return okAsync<void, BackupError>(undefined);
      const which = found.map((d) => `'${d.disk}' (${d.iothread ?? "maybe: QEMU has iothreads and this device does not say"})`);
      const advice = mode === "pull" && iothreadVerdict(v, "push").safe ? " Use a push backup." : "";
      return errAsync<void, BackupError>({
        code: "unsupported",
        message: `${mode} backups of disks in an iothread are refused on QEMU ${formatVersion(v)}: ${reason}. In an iothread: ${which.join(", ")}.${advice}`,
      });
    });
}

const LOOPBACK = new Set(["localhost", "127.0.0.1", "::1", "ip6-localhost"]);

export class BackupPreparer {
  private readonly log: Logger;

  constructor(private readonly opts: PreparerOptions) {
    this.log = opts.logger;
  }

  prepare(
    domain: BackupDomain,
    client: QmpClient,
    backupXml: string | undefined,
    checkpointXml: string | undefined,
    opts: BeginOptions,
  ): ResultAsync<PreparedBackup, BackupError> {
    const parsed =
      backupXml === undefined || backupXml.trim() === ""
        ? okAsync<BackupDef, BackupError>({ mode: "push" })
        : backupDefParse(backupXml).asyncAndThen((d) => okAsync(d));
    const cpDef: ResultAsync<CheckpointDef | undefined, BackupError> =
      checkpointXml === undefined || checkpointXml.trim() === ""
        ? okAsync(undefined)
        : checkpointDefParse(checkpointXml).asyncAndThen((d) => okAsync(d));
    const id = randomBytes(4).toString("hex");
    const stamp = new Date().toISOString().replace(/[-:]/g, "").replace(/\..*$/, "");
    const domainDir = join(this.opts.backupDir, fileStem(domain.name));
    return parsed.andThen((def) => {
      const planOpts = planOptions(def.mode, domain, opts);
      return cpDef.andThen((cp) =>
        ensureDir(domainDir)
          .andThen(() => giveDir(domainDir, domain.imageOwner))
          .andThen(() =>
            discoverDisks(client)
              .mapErr((e): BackupError => ({ code: "qmp", message: `cannot list disks of '${domain.name}'`, cause: e }))
              .andThen((disks) => {
                const suffix = def.mode === "push" ? "qcow2" : "scratch.qcow2";
                const aligned = backupDefAlign(
                  def,
                  disks.map((d) => d.name),
                  {
                    defaultFile: (disk) =>
                      def.mode === "push" && opts.defaultTarget !== undefined
                        ? opts.defaultTarget(disk)
                        : join(domainDir, `${fileStem(disk)}.${stamp}.${id}.${suffix}`),
                  },
                );
                if (aligned.isErr()) return errAsync<PreparedBackup, BackupError>(aligned.error);
                return this.validate(domain, client, id, aligned.value, disks, planOpts).andThen((plans) =>
                  (cp === undefined
                    ? okAsync<PreparedCheckpoint | undefined, BackupError>(undefined)
                    : domain.checkpoints.prepare(cp, disks)
                  ).andThen((prepared) =>
                    this.serverPlan(domain, aligned.value).map((nbd) => ({
                      id,
                      def: this.fill(aligned.value, plans, nbd),
                      plans,
                      planOpts,
                      checkpoint: prepared,
                      nbd,
                    })),
                  ),
                );
              }),
          ),
      );
    });
  }

  private validate(
    domain: BackupDomain,
    client: QmpClient,
    jobId: string,
    def: BackupDef,
    disks: readonly DiskInfo[],
    planOpts: PlanOptions,
  ): ResultAsync<DiskPlan[], BackupError> {
    const selected = (def.disks ?? []).filter((d): d is BackupDiskDef => d.backup);
    for (const d of selected) {
      if (d.store?.extra.some((x) => x.name === "encryption"))
        return errAsync({ code: "unsupported", message: `disk '${d.name}': encrypted backup images are not supported` });
      if (d.type === "block")
        return errAsync({ code: "unsupported", message: `disk '${d.name}': block device targets are not supported; use a file` });
    }
    if (def.server?.transport === "fd")
      return errAsync({ code: "unsupported", message: "NBD over a passed file descriptor (transport='fd') is not supported" });
    // every checkpoint an incremental starts from is checked against QEMU now
    const cpNames = [...new Set(selected.map((d) => d.incremental).filter((x): x is string => x !== undefined))];
    // only the disks backed up since a checkpoint need its bitmaps intact
    const checks = cpNames.map((n) =>
      domain.checkpoints.requireValid(client, n, undefined, new Set(selected.filter((d) => d.incremental === n).map((d) => d.name))),
    );
    const sources = selected.map((d) => disks.find((x) => x.name === d.name)!);
    const iothreadsOk = refuseIothreadHazards(client, def.mode, sources);
    return iothreadsOk
      .andThen(() => ResultAsync.combine(checks))
      .andThen((cps) => {
        const checkpoints = new Map(cps.map((c) => [c.name, c]));
        const pathChecks = selected.map((d) =>
          checkBackupPath(
            d.store!.file!,
            this.opts.allowedDirs,
            planOpts.reuse,
            def.mode === "push" ? `target of disk '${d.name}'` : `scratch of disk '${d.name}'`,
            planOpts.imageOwner,
          ),
        );
        return ResultAsync.combine(pathChecks).andThen((paths) => {
          const plans: DiskPlan[] = [];
          const seen = new Set<string>();
          for (const [i, d] of selected.entries()) {
            const p = paths[i]!;
            if (seen.has(p.path))
              return errAsync<never, BackupError>({ code: "path-refused", message: `two disks would write to ${p.path}` });
            seen.add(p.path);
            const source = disks.find((x) => x.name === d.name)!;
            // raw: a volatile bitmap (valid while its QEMU process lives: the checkpoint's validity says)
            if (d.backupmode === "incremental" && source.format !== "qcow2" && source.format !== "raw") {
              return errAsync<never, BackupError>({
                code: "unsupported-disk",
                message: `disk '${d.name}' is ${source.format}: incremental backups need a bitmap, which only qcow2 (persistent) and raw (volatile) disks hold`,
              });
            }
            const withPath: BackupDiskDef = { ...d, store: { ...d.store!, file: p.path } };
            const plan = planDisk(ownNames(i, domain.name, jobId), withPath, source, checkpoints, planOpts, p.exists);
            if (typeof plan === "string") return errAsync<never, BackupError>({ code: "xml-invalid", message: plan });
            plans.push(plan);
          }
          return okAsync(plans);
        });
      });
  }

  private serverPlan(domain: BackupDomain, def: BackupDef): ResultAsync<NbdServerPlan | undefined, BackupError> {
    if (def.mode !== "pull") return okAsync(undefined);
    const s = def.server ?? { transport: "tcp" as const, name: "localhost" };
    const tlsCreds = s.tls ? this.tlsCreds(domain) : undefined;
    if (s.tls && tlsCreds === undefined)
      return errAsync({ code: "unsupported", message: "tls='yes' needs an x509 credentials directory (tlsDir) in the configuration" });
    if (s.transport === "unix") {
      return checkSocketPath(s.socket, this.opts.allowedDirs, domain.imageOwner).map(
        (path): NbdServerPlan => ({ addr: { type: "unix", data: { path } }, tlsCreds, uri: `nbd+unix:///?socket=${path}` }),
      );
    }
    if (s.transport !== "tcp") return errAsync({ code: "unsupported", message: "unsupported NBD transport" });
    if (!LOOPBACK.has(s.name) && !s.tls && !this.opts.allowPlainTcp) {
      return errAsync({
        code: "path-refused",
        message: `NBD on ${s.name} (not loopback) without TLS is refused; use tls='yes' or allow plain TCP in the configuration`,
      });
    }
    if (!LOOPBACK.has(s.name) && !s.tls)
      this.log.warn({ domain: domain.name, host: s.name }, "serving NBD in plain text on a non-loopback address, as configured");
    const port =
      s.port !== undefined
        ? okAsync(s.port)
        : ResultAsync.fromPromise(
            freeTcpPort(s.name),
            (e): BackupError => ({ code: "unsupported", message: `no free TCP port on ${s.name}: ${(e as Error).message}` }),
          );
    return port.map((p) => ({
      addr: { type: "inet" as const, data: { host: s.name, port: String(p) } },
      tlsCreds,
      uri: `nbd://${s.name}:${p}`,
    }));
  }

  private tlsCreds(domain: BackupDomain): NbdServerPlan["tlsCreds"] {
    return this.opts.tlsDir === undefined ? undefined : { id: `qbk-tls-${domain.name}`.slice(0, 60), dir: this.opts.tlsDir };
  }

  /** What backup-dumpxml shows: every default filled in (libvirt fills these at job start). */
  private fill(def: BackupDef, plans: readonly DiskPlan[], nbd: NbdServerPlan | undefined): BackupDef {
    return {
      ...def,
      ...(nbd !== undefined && def.server?.transport !== "unix"
        ? {
            server: {
              transport: "tcp",
              name: (nbd.addr as { data: { host: string } }).data.host,
              port: Number((nbd.addr as { data: { port: string } }).data.port),
              ...(def.server?.tls ? { tls: true } : {}),
            },
          }
        : {}),
      disks: (def.disks ?? []).map((d) => {
        const p = plans.find((x) => x.disk === d.name);
        if (p === undefined) return d;
        return {
          ...d,
          ...(def.mode === "pull" ? { exportname: p.export!.name, ...(p.export!.bitmap ? { exportbitmap: p.export!.bitmap } : {}) } : {}),
          driver: p.format,
          store: { ...d.store!, file: p.file },
        };
      }),
    };
  }
}
