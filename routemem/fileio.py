"""Writing files so that a crash never leaves a half-written one: temp file, then rename.

Files and folders get the permissions any ``open()`` / ``mkdir()`` would give them (0644 / 0755
under the usual umask 022; 0755 for a program or shared library), not the owner-only 0600 / 0700
that ``tempfile`` uses: a shared cache or run folder stays readable by the others who share it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from routemem.errors import UserError


def current_umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_public(path: str | Path, *, folder: bool = False, executable: bool = False) -> None:
    """Give a file made by ``tempfile`` the mode ``open()`` would have given it: 0666 less the
    umask, or 0777 less the umask for a folder or an executable (a compiler's output)."""
    os.chmod(path, (0o777 if folder or executable else 0o666) & ~current_umask())


@contextlib.contextmanager
def atomic_path(path: str | Path, *, executable: bool = False) -> Iterator[Path]:
    """A temp path beside ``path`` (same filesystem) for the caller to write; when the block ends
    without an error it gets ``make_public``'s mode and replaces ``path`` in one step, otherwise it
    is removed and ``path`` is left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        make_public(tmp, executable=executable)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one step."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) in one step."""
    write_bytes_atomic(path, text.encode("utf-8"))


def check_output_path(path: str | Path, flag: str, *, folder: bool) -> Path:
    """Refuse, before any work is done, an output ``path`` (a folder if ``folder``, else a file)
    that could not be written once the work is finished: empty, of the other kind, under a file,
    or below a folder this user may not write in. Missing folders on the way are fine (they are
    made). Returns ``path`` as a Path; ``flag`` names it in the message."""
    kind = "folder" if folder else "file"
    if str(path).strip() == "":  # Path("") is ".": it would write into the current folder
        raise UserError(f"{flag} is empty; give a {kind} path")
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise UserError(f"{flag} {path} is an existing {'file' if folder else 'folder'}, not a {kind}; "
                        f"choose another {flag}")
    for parent in (path, *path.parents) if folder else path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {path} is under {parent}, which is a file, not a folder; "
                                f"choose another {flag}")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UserError(f"{flag} {path}: cannot write in {parent} (permission denied)")
            break
    return path
