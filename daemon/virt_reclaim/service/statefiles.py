"""Files the daemon publishes in its state folder for commands to read (status, reload).

Each is replaced whole: a reader sees the old file or the new one, never a half-written
one. Not fsynced: the reader comes seconds later, and a file lost in a crash is lost
with the daemon that wrote it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile


def replace(state_dir: str, name: str, text: str) -> None:
    """Write ``text`` to ``state_dir``/``name`` atomically (temp file, then rename).

    Raises:
        OSError: The folder cannot be made or written.
    """
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    stem, suffix = os.path.splitext(name)
    fd, temp = tempfile.mkstemp(prefix=f".{stem}-", suffix=suffix, dir=state_dir)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(temp, os.path.join(state_dir, name))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
