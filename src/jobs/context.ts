/**
 * The one factory of a job's context: a new begin and a recovered record
 * build their BackupJob through it, so both get the same store, writeback,
 * events and transaction wrapper.
 */
import { withFrozenGuest } from "../agent/quiesce.js";
import { fromAgent } from "../checkpoints/errors.js";
import type { Logger } from "../log.js";
import type { QmpClient } from "../qmp/client.js";
import type { BackupDomain } from "./domain.js";
import type { BackupError } from "./errors.js";
import type { JobContext, JobEvent } from "./model.js";
import type { DiskPlan } from "./plan.js";
import type { PreparedBackup } from "./prepare.js";
import type { JobStore } from "./record.js";
import type { WritebackPump } from "./writeback.js";

export interface JobServices {
  readonly logger: Logger;
  readonly store: JobStore | undefined;
  readonly writeback: WritebackPump;
  readonly emit: (e: JobEvent) => void;
  readonly onDetached: JobContext["onDetached"];
}

export function jobContext(
  services: JobServices,
  domain: BackupDomain,
  client: QmpClient,
  job: Pick<PreparedBackup, "id" | "def" | "planOpts" | "checkpoint" | "nbd"> & { readonly plans: readonly DiskPlan[] },
  opts: { readonly quiesce?: boolean | undefined } = {},
): JobContext {
  const log = services.logger;
  return {
    id: job.id,
    domain: domain.name,
    client,
    checkpoints: domain.checkpoints,
    def: job.def,
    plans: job.plans,
    planOpts: job.planOpts,
    checkpoint: job.checkpoint,
    nbd: job.nbd,
    logger: log,
    emit: services.emit,
    store: services.store,
    onDetached: services.onDetached,
    writeback: services.writeback,
    runTransaction: (tx) =>
      opts.quiesce
        ? withFrozenGuest(domain.agentPath, log, tx).mapErr(
            (e): BackupError => (e.stage === "freeze" ? fromAgent("cannot quiesce the guest", e.error) : e.error),
          )
        : tx(),
  };
}
