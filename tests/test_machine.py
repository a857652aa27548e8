"""routemem.machine: the device a user asks for, and the provenance header every result records."""

import pytest
import torch

import routemem
from routemem import machine
from routemem.errors import UserError


def test_auto_is_cuda_exactly_when_a_gpu_is_visible():
    assert machine.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert machine.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_without_a_gpu_is_a_one_line_user_error():
    with pytest.raises(UserError, match="no CUDA GPU") as err:
        machine.resolve_device("cuda")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bad", ["gpu", "CUDA", "", "cuda:x"])
def test_unknown_device_names_the_choices(bad):
    with pytest.raises(UserError, match="auto, cpu, cuda"):
        machine.resolve_device(bad)


def test_header_names_where_a_result_was_measured():
    header = machine.machine_header("cpu")
    assert header["device"] == "cpu" and header["gpu"] is None
    assert header["torch"] == torch.__version__ and header["cuda"] == torch.version.cuda
    assert header["routemem"] == routemem.__version__
    assert isinstance(header["cpu"], str) and header["cpu"]
    assert set(header) >= {"git_commit", "threads", "python"}


def test_git_commit_from_the_environment_wins_over_a_stale_checkout(monkeypatch):
    machine.git_commit.cache_clear()
    try:
        monkeypatch.setenv("ROUTEMEM_GIT_COMMIT", "0123abc")
        assert machine.git_commit() == "0123abc"  # this test runs inside a git checkout
    finally:
        machine.git_commit.cache_clear()


def test_git_commit_of_a_copied_tree_comes_from_the_environment(monkeypatch, tmp_path):
    fake_pkg = tmp_path / "routemem" / "__init__.py"  # a tree with no .git beside the package
    fake_pkg.parent.mkdir()
    fake_pkg.write_text("")
    monkeypatch.setattr(machine.routemem, "__file__", str(fake_pkg))
    machine.git_commit.cache_clear()
    try:
        monkeypatch.delenv("ROUTEMEM_GIT_COMMIT", raising=False)
        assert machine.git_commit() is None
        machine.git_commit.cache_clear()
        monkeypatch.setenv("ROUTEMEM_GIT_COMMIT", "abc123")
        assert machine.git_commit() == "abc123"
    finally:
        machine.git_commit.cache_clear()
