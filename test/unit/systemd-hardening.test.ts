/**
 * The systemd unit's hardening. `systemd-analyze security --offline=true`
 * scores packaging/qbackupd.service without a running systemd; the test prints
 * the exposure and fails if it rises above the figure the unit reached. It
 * also holds on to what the daemon needs (chown to QEMU's user, QMP and API
 * unix sockets, a TCP bind to find a free NBD port, V8's writable-executable
 * code), so the score cannot be lowered by taking those away. Reads the unit
 * and runs systemd-analyze only; never starts anything.
 */
import { spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";

const ROOT = join(import.meta.dirname, "..", "..");
const UNIT = join(ROOT, "packaging", "qbackupd.service");

/** The exposure the unit reached (systemd 252, Debian bookworm); lower it here when the unit improves. */
const MAX_EXPOSURE = 1.9;

/** Every value of each key, in order (a key may appear more than once, as SystemCallFilter= does). */
function unitSettings(text: string): Map<string, string[]> {
  const out = new Map<string, string[]>();
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (line === "" || line.startsWith("#") || line.startsWith("[")) continue;
    const eq = line.indexOf("=");
    const key = line.slice(0, eq);
    out.set(key, [...(out.get(key) ?? []), line.slice(eq + 1)]);
  }
  return out;
}

const settings = unitSettings(readFileSync(UNIT, "utf8"));
const get = (k: string): string[] => settings.get(k) ?? [];
const words = (k: string): string[] => get(k).flatMap((v) => v.split(/\s+/));

t.test("the unit keeps what the daemon needs", async (t) => {
  // safe-fs chowns targets and scratch files to QEMU's user; the API socket goes to socketGroup
  for (const cap of ["CAP_CHOWN", "CAP_FOWNER", "CAP_DAC_OVERRIDE"]) t.ok(words("CapabilityBoundingSet").includes(cap), cap);
  const filters = get("SystemCallFilter");
  t.equal(filters[0], "@system-service", "an allow list first: the default is to refuse");
  const deny = filters.findIndex((f) => f.startsWith("~"));
  t.ok(deny > 0, "a deny line after the allow list");
  const denied = (filters[deny] ?? "").split(/\s+/);
  t.ok(denied.includes("~@privileged") && denied.includes("@resources"), "~@privileged @resources");
  const chown = filters.findIndex((f) => f.split(/\s+/).includes("@chown"));
  t.ok(chown > deny, "@chown allowed again after ~@privileged (a later line adds to the allow list)");
  t.same(get("SystemCallErrorNumber"), ["EPERM"], "a filtered call fails (Node's setrlimit at start) instead of killing the daemon");
  for (const af of ["AF_UNIX", "AF_INET", "AF_INET6"]) t.ok(words("RestrictAddressFamilies").includes(af), af);
  t.ok(words("IPAddressAllow").includes("localhost"), "QMP at localhost:port still reachable");
  t.notSame(get("MemoryDenyWriteExecute"), ["yes"], "V8's JIT needs writable-executable memory");
  t.same(get("PrivateNetwork"), [], "free NBD ports are looked for in the host's network namespace");
  t.same(get("PrivateUsers"), [], "files are chowned to QEMU's real uid");
  for (const p of ["/var/lib/qbackupd", "/run/qbackupd"]) t.ok(words("ReadWritePaths").includes(p), p);
  t.same(get("ProtectProc"), ["invisible"]);
  t.same(get("ProcSubset"), ["pid"], "safe-fs needs /proc/self/fd only");
  t.same(get("PrivateMounts"), ["yes"]);
});

/** systemd's version, or why the exposure cannot be measured here. */
function analyzer(): { version: number } | { skip: string } {
  const r = spawnSync("systemd-analyze", ["--version"], { encoding: "utf8" });
  if (r.error !== undefined || r.status !== 0)
    return { skip: "systemd-analyze is not installed (apt-get install systemd): exposure not measured" };
  const v = Number(/^systemd (\d+)/.exec(r.stdout)?.[1] ?? 0);
  if (v < 250) return { skip: `systemd ${v} has no 'security --offline' (250 or newer has): exposure not measured` };
  return { version: v };
}
const sa = analyzer();

t.test("systemd-analyze security: exposure", { skip: "skip" in sa ? sa.skip : false }, async (t) => {
  const v = "version" in sa ? sa.version : 0;
  const r = spawnSync("systemd-analyze", ["security", "--offline=true", "--no-pager", UNIT], { encoding: "utf8" });
  const out = `${r.stdout}${r.stderr}`;
  const m = /Overall exposure level for qbackupd\.service: (\d+(?:\.\d+)?)/.exec(out);
  t.ok(m, "systemd-analyze printed an overall exposure");
  if (!m) {
    t.comment(out);
    return;
  }
  const exposure = Number(m[1]);
  t.comment(`systemd ${v}: exposure of packaging/qbackupd.service ${exposure} (goal 2.0, limit ${MAX_EXPOSURE})`);
  // what is still open, for the log
  for (const l of out.split("\n")) if (l.startsWith("✗")) t.comment(l.replace(/\s{2,}/g, "  "));
  t.ok(exposure <= MAX_EXPOSURE, `exposure ${exposure} ≤ ${MAX_EXPOSURE}`);
  // the settings this unit relies on are ones this systemd scores (an older one might ignore them)
  for (const name of ["ProtectProc=", "ProcSubset=", "PrivateMounts=", "SystemCallFilter=~@resources"]) {
    t.ok(
      out.split("\n").some((l) => l.startsWith("✓") && l.slice(1).trim().startsWith(name)),
      `${name} counted as set`,
    );
  }
});
