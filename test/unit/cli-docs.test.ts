/**
 * Bash completion and the man page are generated from the CLI's commander
 * definitions: every verb and option appears, bash accepts the script and
 * completes with it, groff renders the page without warnings (issue 12).
 */
import { execFileSync } from "node:child_process";
import t from "tap";
import { bashCompletion, manPage } from "../../src/cli/docs.js";
import { EXIT_MEANING } from "../../src/cli/exit-codes.js";
import { buildCli } from "../../src/cli/main.js";
import { DAEMON_FLAGS, daemonManPage, daemonParseOptions, daemonUsage } from "../../src/daemon/flags.js";

const program = buildCli(() => {});
const script = bashCompletion(program);

/** COMPREPLY for the words typed so far (the last one is being completed). */
function complete(...words: string[]): string[] {
  const shell = `${script}
qbackup() { printf '[\\n  {\\n    "name": "web1",\\n    "state": "connected"\\n  },\\n  {\\n    "name": "db2",\\n    "state": "connected"\\n  }\\n]\\n'; }
COMP_WORDS=(${words.map((w) => `'${w}'`).join(" ")}); COMP_CWORD=${words.length - 1}
_qbackup
printf '%s\\n' "\${COMPREPLY[@]}"`;
  const out = execFileSync("bash", ["-c", shell], { encoding: "utf8", cwd: "/" });
  return out.split("\n").filter((l) => l !== "");
}

t.test("bash completion: verbs, options per verb, domain names", async (t) => {
  execFileSync("bash", ["-n", "-c", script]);
  const verbs = program.commands.map((c) => c.name());
  t.same(
    complete("qbackup", "")
      .filter((w) => !w.startsWith("-"))
      .sort(),
    [...verbs].sort(),
    "every verb",
  );
  t.same(complete("qbackup", "checkpoint-l"), ["checkpoint-list"]);
  t.same(complete("qbackup", "--json", "domj").sort(), ["domjobabort", "domjobinfo"]);
  t.same(complete("qbackup", "--socket", "/x", "set-b"), ["set-bandwidth"], "a global option's value is not the verb");
  for (const v of program.commands) {
    const offered = complete("qbackup", v.name(), "-");
    for (const o of v.options) t.ok(offered.includes(o.long!), `${v.name()} ${o.long}`);
  }
  t.same(complete("qbackup", "checkpoint-list", "web1", "--no-l"), ["--no-leaves"]);
  t.same(complete("qbackup", "domjobinfo", "").sort(), ["db2", "web1"], "domains from the daemon");
  t.same(complete("qbackup", "domjobinfo", "w"), ["web1"]);
});

t.test("man page: every verb and option; groff renders it without warnings", async (t) => {
  const page = manPage(program, "9.9.9", EXIT_MEANING);
  t.match(page, /^\.TH QBACKUP 1 "" "qbackup 9\.9\.9"/);
  for (const v of program.commands) {
    t.match(page, `.SS "qbackup ${v.name().replace(/-/g, "\\-")} `, v.name());
    for (const o of v.options) t.ok(page.includes(`.B ${o.flags.replace(/-/g, "\\-")}\n`), `${v.name()} ${o.flags}`);
  }
  for (const [code] of EXIT_MEANING) t.match(page, `.TP\n.B ${code}\n`);
  let groff = true;
  try {
    execFileSync("groff", ["--version"], { stdio: "ignore" });
  } catch {
    groff = false;
  }
  if (!groff) {
    t.comment("groff is not installed: rendering not checked");
    return;
  }
  const warnings = execFileSync("groff", ["-man", "-Tutf8", "-ww", "-z"], {
    input: page,
    encoding: "utf8",
    stdio: ["pipe", "pipe", "pipe"],
  });
  t.equal(warnings, "");
  // -P-c: no overstrike (bold as backspaces) in the text
  const text = execFileSync("groff", ["-man", "-Tascii", "-P-c", "-P-b", "-P-u"], { input: page, encoding: "utf8" });
  t.match(text, /qbackup checkpoint-list \[options\] <domain>/);
});

t.test("qbackupd: parser, usage and man page from one table of flags", async (t) => {
  const opts = daemonParseOptions();
  t.same(Object.keys(opts).sort(), DAEMON_FLAGS.map((f) => f.name).sort());
  t.match(opts, {
    "allow-dir": { type: "string", multiple: true },
    "backup-dir": { type: "string" },
    version: { type: "boolean", short: "V" },
  });
  const usage = daemonUsage();
  const page = daemonManPage("9.9.9");
  for (const f of DAEMON_FLAGS) {
    t.match(usage, `--${f.name}`);
    t.match(page, `\\-\\-${f.name.replace(/-/g, "\\-")}`);
  }
  try {
    execFileSync("groff", ["--version"], { stdio: "ignore" });
  } catch {
    t.comment("groff is not installed: rendering not checked");
    return;
  }
  t.equal(execFileSync("groff", ["-man", "-Tutf8", "-ww", "-z"], { input: page, encoding: "utf8", stdio: ["pipe", "pipe", "pipe"] }), "");
});
