"""Named text corpora.

The project ships no data: ``pydocs`` and ``pycode`` come from the running interpreter's
own standard library, the others from files in ``$ROUTEMEM_DATA`` (or ``data_dir``), and
``file:PATH`` reads any UTF-8 text file.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass

from routemem.errors import DataError

DATA_ENV = "ROUTEMEM_DATA"
PYCODE_CAP_CHARS = 8_000_000

# Named corpora kept as files in the data dir: name -> (file name, description).
FILE_CORPORA = {
    "shakespeare": ("tinyshakespeare.txt", "Tiny Shakespeare: ~1.1M characters of plays"),
    "warandpeace": ("warandpeace.txt", "Tolstoy's War and Peace (English), ~3.2M characters"),
}
BUILTIN_CORPORA = {
    "pydocs": "Python language reference text (pydoc_data.topics) of the running interpreter",
    "pycode": f"standard library .py source, tests excluded, capped at {PYCODE_CAP_CHARS:,} characters",
}
NAMED_CORPORA = (*BUILTIN_CORPORA, *FILE_CORPORA)

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass(frozen=True)
class Corpus:
    """A corpus's whole text, with the hash that keys token caches and results."""

    name: str
    text: str
    sha256: str  # hex digest of the text's UTF-8 bytes
    source: str  # the path read, or where the text came from

    def __repr__(self) -> str:  # the text is megabytes: keep it out of reprs and tracebacks
        return f"Corpus(name={self.name!r}, chars={len(self.text)}, sha256={self.sha256[:12]}..., source={self.source!r})"


def make_corpus(name: str, text: str, source: str) -> Corpus:
    """A Corpus from text already in memory (hashes it; DataError if blank)."""
    if not text.strip():
        raise DataError(f"corpus {name!r} is empty ({source})")
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return Corpus(name=name, text=text, sha256=digest, source=source)


def read_text_file(path: str) -> str:
    """A file's text, strictly UTF-8; every failure is a DataError naming the path."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"corpus file not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"corpus path is a directory, not a text file: {path}") from None
    except OSError as e:
        raise DataError(f"cannot read corpus file {path}: {e.strerror}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8: bad byte 0x{raw[e.start]:02x} at byte offset {e.start}") from None


def _pydocs() -> Corpus:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise DataError("corpus 'pydocs' needs pydoc_data, which this Python install lacks") from None
    text = "\n\n".join(topics[key] for key in sorted(topics))
    return make_corpus("pydocs", text, "pydoc_data.topics")


def pycode_files(stdlib: str) -> list[str]:
    """Relative paths of the stdlib's non-test ``.py`` files, in sorted order."""
    found = []
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
        for fname in files:
            if fname.endswith(".py") and not fname.startswith("test_"):
                rel = os.path.relpath(os.path.join(root, fname), stdlib)
                found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def _pycode() -> Corpus:
    stdlib = sysconfig.get_paths()["stdlib"]
    parts, size = [], 0
    for rel in pycode_files(stdlib):
        try:
            with open(os.path.join(stdlib, rel), "rb") as f:
                body = f.read().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # unreadable or legacy-encoded source: skipping it keeps the result deterministic
        piece = f"# file: {rel}\n{body}"
        if not piece.endswith("\n"):
            piece += "\n"
        if size + len(piece) > PYCODE_CAP_CHARS:
            break  # stop (not skip) so the corpus is a prefix of the sorted file list
        parts.append(piece)
        size += len(piece)
    return make_corpus("pycode", "".join(parts), f"{stdlib} (.py, tests excluded)")


def check_data_dir(data_dir: str | os.PathLike | None, what: str = "--data-dir") -> None:
    """A data folder the user named must exist, even when the corpus at hand does not read it
    (pydocs): a typo is reported, not silently ignored. ``what`` names the flag or config key."""
    if data_dir is None:
        return
    folder = os.path.expanduser(os.fspath(data_dir))
    if not os.path.isdir(folder):
        problem = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise DataError(f"{what} {data_dir} {problem}; give the folder that holds the corpus files "
                        f"({', '.join(name for name, _ in FILE_CORPORA.values())})")


def _data_file(name: str, data_dir: str | None) -> str:
    """Full path of a named file corpus; DataError if no data dir is configured."""
    fname = FILE_CORPORA[name][0]
    folder = data_dir or os.environ.get(DATA_ENV) or None
    if folder is None:
        raise DataError(
            f"corpus {name!r} needs {fname}: set {DATA_ENV} or pass --data-dir to the folder that holds it"
        )
    return os.path.abspath(os.path.join(os.path.expanduser(folder), fname))


def load_corpus(name: str, data_dir: str | None = None) -> Corpus:
    """Load a corpus by name: a named one (see ``NAMED_CORPORA``) or ``file:PATH``."""
    if name.startswith("file:"):
        path = name[len("file:"):]
        if not path:
            raise DataError("corpus 'file:' needs a path, e.g. file:notes.txt")
        full = os.path.abspath(os.path.expanduser(path))
        return make_corpus(name, read_text_file(full), full)
    if name == "pydocs":
        return _pydocs()
    if name == "pycode":
        return _pycode()
    if name in FILE_CORPORA:
        path = _data_file(name, data_dir)
        return make_corpus(name, read_text_file(path), path)
    known = ", ".join(NAMED_CORPORA)
    raise DataError(f"unknown corpus {name!r}; known: {known}, or file:PATH")


def list_corpora(data_dir: str | None = None) -> list[dict]:
    """Every named corpus with its availability and size; unavailable ones carry a ``reason``."""
    rows = []
    for name in NAMED_CORPORA:
        description = BUILTIN_CORPORA.get(name) or FILE_CORPORA[name][1]
        row = {"name": name, "available": False, "chars": None, "bytes": None,
               "source": "", "description": description}
        try:
            corpus = load_corpus(name, data_dir)
        except DataError as e:
            row["reason"] = str(e)
            if name in FILE_CORPORA:
                row["source"] = f"${DATA_ENV}/{FILE_CORPORA[name][0]}"
                try:
                    row["source"] = _data_file(name, data_dir)
                except DataError:
                    pass
        else:
            row.update(available=True, chars=len(corpus.text), source=corpus.source,
                       bytes=len(corpus.text.encode("utf-8", "surrogatepass")))
        rows.append(row)
    return rows
