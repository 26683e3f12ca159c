/**
 * Attack: a careless script fires everything at once while a backup starts
 * or runs: two aborts, a wait, domjobinfo, a checkpoint-delete of the base
 * and a bandwidth change, at delays of 0-90 ms after the begin, through the
 * daemon's API. Both aborts must give the same answer, "cancelled" only
 * with nothing of the job left; the checkpoint-delete is refused while the
 * backup owns the domain; at each round's end nothing is left and every
 * listed checkpoint has its bitmaps.
 */
import { existsSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import t from "tap";
import { ApiClient, type ApiReply } from "../../src/cli/client.js";
import { addDomain, startDaemon } from "../helpers/daemon.js";
import { leftovers } from "../helpers/domain.js";
import { startVm } from "../helpers/qemu.js";

const MiB = 1024 * 1024;
type Reply = ApiReply | { code: string; message: string };
const answer = (r: Reply): string =>
  "status" in r
    ? r.status < 300
      ? ((r.body as { state?: string }).state ?? String(r.status))
      : ((r.body as { code: string }).code ?? String(r.status))
    : `error ${r.code}`;

t.test("two aborts, wait, domjobinfo, checkpoint-delete and bandwidth at once", async (t) => {
  const vm = await startVm(t, { disks: [{ size: "16M" }, { size: "16M" }] });
  await vm.write(0, 0x51, 0, 4 * MiB);
  const d = await startDaemon(t);
  await addDomain(d, "vm", vm.qmpPath);
  const api = new ApiClient(d.socket);
  await api.request("POST", "/v1/domains/vm/checkpoints", { xml: "<domaincheckpoint><name>base</name></domaincheckpoint>" });
  const backups = join(d.stateDir, "backups", "vm");
  const files = () => (existsSync(backups) ? readdirSync(backups).sort().join() : "");
  const seen: Record<string, number> = {};
  for (let round = 0; round < 16; round++) {
    await vm.write(round % 2, 0x60 + round, (round % 8) * MiB, MiB);
    const before = files();
    const cp = `r${round}`;
    const inc = round % 2 === 1 ? "<incremental>base</incremental>" : "";
    const begin = api.request("POST", "/v1/domains/vm/backup", {
      backupXml: `<domainbackup>${inc}</domainbackup>`,
      checkpointXml: `<domaincheckpoint><name>${cp}</name></domaincheckpoint>`,
      bandwidth: 2 * MiB,
    });
    await sleep((round * 29) % 90);
    const [a1, a2, w, info, del, bw] = (await Promise.all([
      api.request("DELETE", "/v1/domains/vm/backup"),
      api.request("DELETE", "/v1/domains/vm/backup"),
      api.request("GET", "/v1/domains/vm/backup/wait?timeout=30"),
      api.request("GET", "/v1/domains/vm/backup"),
      api.request("DELETE", "/v1/domains/vm/checkpoints/base"),
      api.request("PUT", "/v1/domains/vm/backup/bandwidth", { bandwidth: 0 }),
    ])) as Reply[];
    const x1 = answer(a1!);
    const x2 = answer(a2!);
    const key = `${x1}/${x2} wait ${answer(w!)} info ${answer(info!)} delete ${answer(del!)} bw ${answer(bw!)}`;
    seen[key] = (seen[key] ?? 0) + 1;
    const ends = new Set([x1, x2].filter((x) => x !== "no-job"));
    t.ok(ends.size <= 1, `round ${round}: both aborts agree (${key})`);
    for (const x of ends) t.ok(x === "cancelled" || x === "ready", `round ${round}: abort answered ${x}`);
    t.not(answer(del!), "200", `round ${round}: the base checkpoint is not deleted under the backup`);
    t.not(answer(bw!), "job-failed", `round ${round}: a bandwidth change does not say the backup failed`);
    if (ends.has("cancelled")) {
      t.same(await leftovers(vm.monitor), [], `round ${round}: cancelled with nothing left in QEMU`);
      t.equal(files(), before, `round ${round}: cancelled with no file left`);
    }
    await begin;
    await api.request("GET", "/v1/domains/vm/backup/wait?timeout=30");
    t.same(await leftovers(vm.monitor), [], `round ${round}: nothing left after the round`);
    const list = await api.request("GET", "/v1/domains/vm/checkpoints");
    const names = "status" in list ? (list.body as { name: string; valid: boolean | null }[]) : [];
    t.ok(
      names.some((c) => c.name === "base"),
      `round ${round}: base is still there`,
    );
    if (ends.has("cancelled"))
      t.notOk(
        names.some((c) => c.name === cp),
        `round ${round}: no checkpoint of the cancelled backup`,
      );
    for (const c of names) if (c.name !== "base") await api.request("DELETE", `/v1/domains/vm/checkpoints/${c.name}`);
  }
  t.comment(JSON.stringify(seen, null, 1));
});
