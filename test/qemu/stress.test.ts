/** The short form of scripts/stress-load: four VMs (one of each kind: full, incremental, raw incremental, offline incremental) backing up at once with a daemon kill -9 and restart. */
import t from "tap";
import { stress } from "../../scripts/lib/stress.js";

t.test("four VMs, daemon restarted mid-backup: every backup byte-exact, no leftovers", async (t) => {
  const r = await stress(t, 4);
  t.same(r.kinds, { full: 1, incremental: 1, "raw-incremental": 1, "offline-incremental": 1 });
  t.same(r.failures, []);
});
