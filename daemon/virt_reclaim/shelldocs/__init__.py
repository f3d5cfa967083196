"""The man page and the bash and zsh completions, generated from the argument parser.

``python -m virt_reclaim.shelldocs DIR`` writes ``virt-reclaim.1``, ``virt-reclaim.bash``
and ``_virt-reclaim`` into DIR. They are generated when installing (the README's host
steps run it with the installed package), not kept in the repository: what is installed
then describes exactly the installed command line, and no copy can fall behind it.
"""

from __future__ import annotations

from pathlib import Path

from virt_reclaim.shelldocs import completion, manpage
from virt_reclaim.shelldocs.commands import read_program

MAN_PAGE = "virt-reclaim.1"
BASH_COMPLETION = "virt-reclaim.bash"
ZSH_COMPLETION = "_virt-reclaim"


def write_all(folder: str | Path) -> list[Path]:
    """Write the man page and both completions into ``folder`` (created); return their paths."""
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    program = read_program()
    written = []
    for name, text in (
        (MAN_PAGE, manpage.render(program)),
        (BASH_COMPLETION, completion.bash(program)),
        (ZSH_COMPLETION, completion.zsh(program)),
    ):
        path = target / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
