"""Writing files so that a crash never leaves a half-written one: temp file, then rename.

Files and folders get the permissions any ``open()`` / ``mkdir()`` would give them (0644 / 0755
under the usual umask 022), not the owner-only 0600 / 0700 that ``tempfile`` uses.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_public(path: str | Path, *, folder: bool = False) -> None:
    """Give a file made by ``tempfile`` the mode ``open()`` would have given it (0666 or 0777 less the umask)."""
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one step (the temp file lives beside it, same filesystem)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        make_public(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) in one step."""
    write_bytes_atomic(path, text.encode("utf-8"))
