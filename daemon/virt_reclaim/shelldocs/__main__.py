"""``python -m virt_reclaim.shelldocs [DIR]``: write the man page and completions into DIR."""

from __future__ import annotations

import sys

from virt_reclaim.shelldocs import write_all


def main(argv: list[str]) -> int:
    """Write the files into the folder named (default: the current one); print their paths."""
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        print("usage: python -m virt_reclaim.shelldocs [DIR]", file=sys.stderr)
        return 2
    for path in write_all(argv[0] if argv else "."):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
