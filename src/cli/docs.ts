/**
 * Bash completion and the man page, generated from the commander
 * definitions in main.ts so they cannot drift from the verbs and options the
 * CLI accepts. Pure text generation; never talks to the daemon.
 */
import type { Command, Option } from "commander";

const visible = (c: Command) => c.commands.filter((s) => !(s as unknown as { _hidden?: boolean })._hidden);
const optionWords = (opts: readonly Option[]) => opts.flatMap((o) => [o.short, o.long].filter((x): x is string => x !== undefined));
/** Options that take a value: the word after them is not a verb or an argument. */
const valued = (opts: readonly Option[]) =>
  opts.filter((o) => o.required || o.optional).flatMap((o) => [o.short, o.long].filter((x): x is string => x !== undefined));

/**
 * A bash completion script: verbs, each verb's options, and domain names
 * (asked from the daemon with `domain-list --json`) where a verb takes a domain.
 */
export function bashCompletion(program: Command): string {
  const name = program.name();
  const fn = `_${name.replace(/[^A-Za-z0-9_]/g, "_")}`;
  const verbs = visible(program);
  const globalValued = valued(program.options);
  const cases = verbs
    .map((v) => {
      const takesDomain = v.registeredArguments[0]?.name() === "domain";
      return `    ${v.name()})
      opts="${optionWords(v.options).join(" ")} --help"
      valued="${valued(v.options).join(" ")}"
      domain=${takesDomain ? 1 : 0} ;;`;
    })
    .join("\n");
  return `# bash completion for ${name}, generated from its command definitions (${name} completion bash)
${fn}() {
  local cur prev verb i opts valued domain=0
  cur="\${COMP_WORDS[COMP_CWORD]}"
  prev="\${COMP_WORDS[COMP_CWORD-1]}"
  # the verb: the first word that is neither an option nor an option's value
  verb=""
  local argn=0
  for ((i = 1; i < COMP_CWORD; i++)); do
    local w="\${COMP_WORDS[i]}"
    case " ${globalValued.join(" ")} " in *" $w "*) ((i++)); continue ;; esac
    if [[ -z $verb ]]; then
      [[ $w == -* ]] || verb="$w"
    elif [[ $w != -* ]]; then
      ((argn++))
    fi
  done
  if [[ -z $verb ]]; then
    case "$prev" in ${globalValued.length > 0 ? `${globalValued.join("|")}) COMPREPLY=($(compgen -f -- "$cur")); return ;;` : ""} esac
    COMPREPLY=($(compgen -W "${verbs.map((v) => v.name()).join(" ")} ${optionWords(program.options).join(" ")} --help" -- "$cur"))
    return
  fi
  case "$verb" in
${cases}
    *) opts="--help"; valued="" ;;
  esac
  case " $valued " in *" $prev "*) COMPREPLY=($(compgen -f -- "$cur")); return ;; esac
  if [[ $cur == -* ]]; then
    COMPREPLY=($(compgen -W "$opts" -- "$cur"))
  elif [[ $domain == 1 && $argn == 0 ]]; then
    local domains
    domains=$(${name} --json domain-list 2>/dev/null | sed -n 's/^    "name": "\\(.*\\)",\\{0,1\\}$/\\1/p')
    COMPREPLY=($(compgen -W "$domains" -- "$cur"))
  else
    COMPREPLY=($(compgen -f -- "$cur"))
  fi
}
complete -F ${fn} ${name}
`;
}

/** roff text: backslashes and leading dots or quotes must not be read as requests. */
function roff(s: string): string {
  return s
    .replace(/\\/g, "\\e")
    .replace(/^([.'])/gm, "\\&$1")
    .replace(/-/g, "\\-");
}

function optionsRoff(opts: readonly Option[]): string {
  return opts
    .map(
      (o) =>
        `.TP\n.B ${roff(o.flags)}\n${roff(o.description)}${o.defaultValue !== undefined && typeof o.defaultValue !== "boolean" ? ` (default: ${roff(String(o.defaultValue))})` : ""}\n`,
    )
    .join("");
}

/** The man page (section 1): synopsis, global options, each verb with its usage and options, exit status. */
export function manPage(program: Command, version: string, exitStatus: readonly (readonly [number, string])[]): string {
  const name = program.name();
  const parts = [
    `.TH ${name.toUpperCase()} 1 "" "${name} ${version}" "User Commands"\n`,
    `.SH NAME\n${name} \\- ${roff(program.description())}\n`,
    `.SH SYNOPSIS\n.B ${name}\n[\\fIOPTIONS\\fR] \\fIVERB\\fR [\\fIARGS\\fR...]\n`,
    `.SH OPTIONS\n${optionsRoff(program.options)}`,
    `.SH VERBS\n${visible(program)
      .map((v) => `.SS "${name} ${roff(v.name())} ${roff(v.usage())}"\n${roff(v.description())}\n${optionsRoff(v.options)}`)
      .join("")}`,
    `.SH EXIT STATUS\n${exitStatus.map(([code, what]) => `.TP\n.B ${code}\n${roff(what)}\n`).join("")}`,
    `.SH SEE ALSO\n.BR qbackupd (8),\n.BR virsh (1)\n`,
  ];
  return parts.join("");
}
