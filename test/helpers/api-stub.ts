/**
 * buildApi over stub domains and a stub job manager, for tests of the HTTP
 * contract alone (schemas, statuses, bodies) that need no QEMU. Every call
 * that would change state is recorded in `calls`, so a test can check that a
 * refused request changed nothing.
 */

import { errAsync, okAsync } from "neverthrow";
import { pino } from "pino";
import { type ApiDeps, buildApi } from "../../src/api/server.js";
import type { DomainRegistry } from "../../src/daemon/domains.js";
import type { Metrics } from "../../src/daemon/metrics.js";
import type { JobManager } from "../../src/jobs/manager.js";
import { SetService } from "../../src/sets/service.js";

export interface StubApi {
  readonly app: ReturnType<typeof buildApi>;
  /** Every state-changing call the routes made, in order ("begin vm1", "add vm2", …). */
  readonly calls: string[];
}

const jobInfo = (domain: string) => ({
  id: "00000000-0000-0000-0000-000000000000",
  domain,
  mode: "push",
  state: "inprogress",
  active: true,
  incremental: null,
  checkpoint: null,
  startedAt: "2026-01-01T00:00:00.000Z",
  endedAt: null,
  elapsedMs: 0,
  bytesDone: 0,
  bytesTotal: 0,
  rate: 0,
  error: null,
  nbd: null,
  durable: true,
  disks: [],
});

const checkpoint = (name: string) => ({ name, creationTime: 1, disks: [{ name: "vda", checkpoint: "bitmap", bitmap: name }] });

/** Domains `names` exist, each connected, each with one checkpoint "c1"; `running` have an active job. */
export function stubApi(names: string[] = ["vm1"], running: string[] = []): StubApi {
  const calls: string[] = [];
  const domains = new Map<string, unknown>();
  const mk = (name: string) => {
    const cps = new Map<string, unknown>([["c1", checkpoint("c1")]]);
    return {
      name,
      config: { name, qmp: "/run/x.qmp" },
      origin: "api",
      state: "connected",
      error: undefined,
      caps: undefined,
      imageOwner: undefined,
      settled: async () => {},
      client: () => ({}),
      checkpoints: {
        store: { all: cps, get: (n: string) => cps.get(n), current: "c1", size: cps.size },
        problemsOf: () => [],
        reconcile: async () => {},
        create: (_c: unknown, xml: string | undefined) => {
          calls.push(`checkpoint-create ${name} ${xml ?? ""}`);
          return okAsync(checkpoint("c2"));
        },
        redefine: (_c: unknown, xml: string) => {
          calls.push(`checkpoint-redefine ${name} ${xml}`);
          return okAsync(checkpoint("c2"));
        },
        xml: (_c: unknown, cp: string) =>
          cps.has(cp) ? okAsync("<domaincheckpoint/>") : errAsync({ code: "not-found", message: `no checkpoint '${cp}'` }),
        delete: (_c: unknown, cp: string) => {
          if (!cps.has(cp)) return errAsync({ code: "not-found", message: `no checkpoint '${cp}'` });
          calls.push(`checkpoint-delete ${name} ${cp}`);
          return okAsync([cp]);
        },
      },
    };
  };
  for (const n of names) domains.set(n, mk(n));
  const registry = {
    list: () => [...domains.values()],
    get: (n: string) => domains.get(n),
    add: (cfg: { name: string }) => {
      if (domains.has(cfg.name)) return errAsync({ code: "duplicate", message: `domain '${cfg.name}' exists` });
      calls.push(`add ${cfg.name}`);
      const d = mk(cfg.name);
      domains.set(cfg.name, d);
      return okAsync(d);
    },
    remove: (n: string) => {
      calls.push(`remove ${n}`);
      domains.delete(n);
      return okAsync(undefined);
    },
  } as unknown as DomainRegistry;
  const active = new Set(running);
  // cast below: keep this list in step with every JobManager method src/api/server.ts calls
  const jobs = {
    job: (d: string) => (active.has(d) ? { active: true } : undefined),
    busy: (d: string) => active.has(d),
    recovered: async () => {},
    begin: (d: { name: string }, backupXml: unknown, checkpointXml: unknown, opts: unknown) => {
      calls.push(`begin ${d.name} ${JSON.stringify([backupXml, checkpointXml, opts])}`);
      return okAsync(jobInfo(d.name));
    },
    info: (d: string) => (active.has(d) ? okAsync(jobInfo(d)) : errAsync({ code: "no-job", message: "no job" })),
    xml: (d: string) => (active.has(d) ? okAsync("<domainbackup/>") : errAsync({ code: "no-job", message: "no job" })),
    wait: (d: string) => (active.has(d) ? okAsync(jobInfo(d)) : errAsync({ code: "no-job", message: "no job" })),
    setBandwidth: (d: string, bw: number) => {
      if (!active.has(d)) return errAsync({ code: "no-job", message: "no job" });
      calls.push(`bandwidth ${d} ${bw}`);
      return okAsync(undefined);
    },
    end: (d: string) => {
      if (!active.has(d)) return errAsync({ code: "no-job", message: "no job" });
      calls.push(`end ${d}`);
      active.delete(d);
      return okAsync({ ...jobInfo(d), active: false, state: "cancelled" });
    },
    subscribe: () => () => {},
  } as unknown as JobManager;
  const deps: ApiDeps = {
    domains: registry,
    jobs,
    metrics: { onRequest: () => {}, render: () => "# none\n" } as unknown as Metrics,
    logger: pino({ level: "silent" }),
    maxBodyBytes: 1 << 20,
    onDomainEvent: () => () => {},
    version: "test",
    // real sets over no allowed directory: every set path is refused or not found before anything is touched
    sets: new SetService({
      logger: pino({ level: "silent" }),
      stateDir: "/nonexistent/qbackupd-stub",
      allowedDirs: [],
      domain: () => undefined,
      begin: () => errAsync({ code: "not-connected", message: "stub" }),
      activeJob: async () => undefined,
      completedJob: async () => undefined,
      subscribe: () => () => {},
      deleteCheckpoint: () => errAsync({ code: "not-connected", message: "stub" }),
    }),
  };
  return { app: buildApi(deps), calls };
}
