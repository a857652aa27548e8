"""Atomic writes: the whole file or the old one, with the mode any open() would give it."""

from __future__ import annotations

import os
import stat

import pytest

from routemem.fileio import atomic_path, write_bytes_atomic, write_text_atomic


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "a.txt", "caf\u00e9\n")
        write_bytes_atomic(tmp_path / "b.bin", b"\x00\x01")
        plain = tmp_path / "c.txt"
        plain.write_text("x")
    finally:
        os.umask(old)
    for name in ("a.txt", "b.bin", "c.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    assert (tmp_path / "a.txt").read_bytes() == "caf\u00e9\n".encode("utf-8")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(TypeError):
        write_bytes_atomic(target, "not bytes")
    assert target.read_text() == "old" and len(list(tmp_path.iterdir())) == 1


def test_atomic_path_gives_programs_the_executable_mode_and_cleans_up(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "lib.so", executable=True) as tmp:
            tmp.write_bytes(b"\x7fELF")  # what a compiler would write
        with pytest.raises(RuntimeError), atomic_path(tmp_path / "other.so", executable=True) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("the build failed")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "lib.so").stat().st_mode) == 0o755
    assert [p.name for p in tmp_path.iterdir()] == ["lib.so"]  # no temp file, no other.so
