"""Shell completion for bash and zsh, from the command line's records.

Both scripts stand alone: the bash one needs none of bash-completion's helpers (it only
must be found under the command's name, ``completions/virt-reclaim``), the zsh one only
compsys. A DOMAIN is completed with ``virsh list --all --name`` when virsh is there.
"""

from __future__ import annotations

import re

from virt_reclaim import __version__
from virt_reclaim.shelldocs.commands import Command, Option, Program, read_program

BASH_FUNCTION = "_virt_reclaim"
# What virsh answers on a TAB: quickly, or nothing (a hung libvirtd must not hang the shell).
_VIRSH_DOMAINS = "timeout 3 virsh -q list --all --name 2>/dev/null"


def bash(program: Program | None = None) -> str:
    """The bash completion script: defines ``_virt_reclaim`` and registers it."""
    program = program or read_program()
    names = " ".join(command.name for command in program.commands)
    top = " ".join(program.top.flags)
    lines = [
        f"# bash completion for {program.prog} {__version__}, generated from its argument parser",
        "# (python -m virt_reclaim.shelldocs). Install as",
        f"# /usr/share/bash-completion/completions/{program.prog}.",
        f"{BASH_FUNCTION}() {{",
        "    local cur=${COMP_WORDS[COMP_CWORD]} prev='' command='' i opts='' domains=''",
        "    ((COMP_CWORD > 0)) && prev=${COMP_WORDS[COMP_CWORD-1]}",
        "    COMPREPLY=()",
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        "        case ${COMP_WORDS[i]} in",
        "            -*) ;;",
        "            *) command=${COMP_WORDS[i]}; break ;;",
        "        esac",
        "    done",
        "    if [[ -z $command ]]; then",
        f'        mapfile -t COMPREPLY < <(compgen -W "{top} {names}" -- "$cur")',
        "        return 0",
        "    fi",
        "    case $command in",
    ]
    for command in program.commands:
        lines += _bash_command(command)
    lines += [
        "        *) return 0 ;;",
        "    esac",
        "    if [[ $cur == -* ]]; then",
        '        mapfile -t COMPREPLY < <(compgen -W "$opts" -- "$cur")',
        "    elif [[ $domains == yes ]] && command -v virsh >/dev/null; then",
        f'        mapfile -t COMPREPLY < <(compgen -W "$({_VIRSH_DOMAINS})" -- "$cur")',
        "    fi",
        "    return 0",
        "}",
        f"complete -F {BASH_FUNCTION} {program.prog}",
    ]
    return "\n".join(lines) + "\n"


def _bash_command(command: Command) -> list[str]:
    lines = [f"        {command.name})", f'            opts="{" ".join(command.flags)}"']
    if any(p.metavar == "DOMAIN" for p in command.positionals):
        lines.append("            domains=yes")
    values = [option for option in command.options if option.value_kind != "none"]
    if values:
        lines.append("            case $prev in")
        for option in values:
            lines.append(f"                {'|'.join(option.flags)}) {_bash_value(option)} ;;")
        lines.append("            esac")
    lines.append("            ;;")
    return lines


def _bash_value(option: Option) -> str:
    compgen = {
        "choice": f'-W "{" ".join(option.choices)}"',
        "folder": "-d",
        "file": "-f",
    }.get(option.value_kind)
    if compgen is None:  # a size, a duration, a URI: nothing to offer, and no option names
        return "return 0"
    return f'mapfile -t COMPREPLY < <(compgen {compgen} -- "$cur"); return 0'


def zsh(program: Program | None = None) -> str:
    """The zsh completion function file ``_virt-reclaim`` (for a folder on $fpath)."""
    program = program or read_program()
    function = f"_{program.prog}"
    lines = [
        f"#compdef {program.prog}",
        f"# zsh completion for {program.prog} {__version__}, generated from its argument parser",
        "# (python -m virt_reclaim.shelldocs). Install into a folder of $fpath, e.g.",
        "# /usr/local/share/zsh/site-functions.",
        "",
        f"{function}_domains() {{",
        "    local -a domains",
        f"    (( $+commands[virsh] )) && domains=(${{(f)\"$({_VIRSH_DOMAINS})\"}})",
        "    _describe -t domains 'libvirt domain' domains",
        "}",
        "",
        f"{function}() {{",
        "    local curcontext=$curcontext state line",
        "    typeset -A opt_args",
        "    _arguments -C \\",
        *(f"        {spec} \\" for spec in _zsh_options(program.top, exclusive=True)),
        "        '1:command:->command' \\",
        "        '*::argument:->argument'",
        "    case $state in",
        "        command)",
        "            local -a commands",
        "            commands=(",
        *(f"                {_quote(f'{c.name}:{_colons(_short(c.summary))}')}"
          for c in program.commands),
        "            )",
        "            _describe -t commands command commands",
        "            ;;",
        "        argument)",
        "            case $words[1] in",
    ]  # fmt: skip
    for command in program.commands:
        specs = [*_zsh_options(command), *_zsh_positionals(command, function)]
        lines += [f"                {command.name})", "                    _arguments \\"]
        lines += [f"                        {spec} \\" for spec in specs[:-1]]
        lines += [f"                        {specs[-1]}", "                    ;;"]
    lines += [
        "            esac",
        "            ;;",
        "    esac",
        "}",
        "",
        f'{function} "$@"',
    ]
    return "\n".join(lines) + "\n"


def _zsh_options(command: Command, *, exclusive: bool = False) -> list[str]:
    specs = []
    for option in command.options:
        flags = option.flags
        description = f"[{_brackets(_short(option.help))}]"
        value = ""
        if option.value_kind != "none":
            action = {
                "choice": f"({' '.join(option.choices)})",
                "folder": "_files -/",
                "file": "_files",
            }.get(option.value_kind, " ")
            value = f":{_colons(str(option.metavar).lower())}:{action}"
        exclude = "(- *)" if exclusive else (f"({' '.join(flags)})" if len(flags) > 1 else "")
        repeat = "*" if option.repeatable else ""
        if len(flags) == 1:
            specs.append(_quote(f"{exclude}{repeat}{flags[0]}{description}{value}"))
        else:
            specs.append(f"{_quote(exclude + repeat)}{{{','.join(flags)}}}"
                         f"{_quote(description + value)}")  # fmt: skip
    return specs


def _zsh_positionals(command: Command, function: str) -> list[str]:
    specs = []
    for position, positional in enumerate(command.positionals, start=1):
        action = f"{function}_domains" if positional.metavar == "DOMAIN" else " "
        optional = ":" if positional.optional else ""
        specs.append(_quote(f"{position}:{optional}{positional.metavar.lower()}:{action}"))
    return specs or ["'*: :'"]  # no positional: nothing to complete, but a spec to end on


def _short(text: str) -> str:
    """A help text's first clause, short enough for a completion menu."""
    first = re.split(r"; |: | \(", text, maxsplit=1)[0].rstrip(".")
    return first if len(first) <= 72 else first[:71].rstrip() + "…"


def _brackets(text: str) -> str:
    return text.replace("[", "\\[").replace("]", "\\]")


def _colons(text: str) -> str:
    return text.replace(":", "\\:")


def _quote(text: str) -> str:
    """Single-quoted for zsh: a quote inside ends, escapes and reopens."""
    return "'" + text.replace("'", "'\\''") + "'"
