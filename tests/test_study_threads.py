"""``--threads``: every run of a study trains on the same number of CPU threads, in this process or
in workers, and the process's own count is restored afterwards."""

from __future__ import annotations

import pytest
import torch
from worker_probe import where_am_i

from routemem.cli import main
from routemem.experiments.shared.cache import RunCache
from routemem.experiments.shared.runner import Execution, Unit, run_units


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_runs_in_this_process_use_the_given_threads_and_restore_the_count(tmp_path, two_threads):
    units = [Unit(f"u{i}", where_am_i, (f"u{i}",)) for i in range(2)]
    outcome = run_units(units, RunCache(tmp_path, {}), Execution.make("cpu", 1, threads=1))
    assert {r["threads"] for r in outcome.records.values()} == {1}
    assert torch.get_num_threads() == 2


def test_without_threads_a_run_gets_this_process_share(tmp_path, two_threads):
    outcome = run_units([Unit("u0", where_am_i, ("u0",))], RunCache(tmp_path, {}), Execution.make("cpu", 1))
    assert outcome.records["u0"]["threads"] == 2  # the library's behaviour before --threads existed


@pytest.mark.slow  # spawns worker processes (each imports torch)
def test_workers_get_the_given_threads(tmp_path, two_threads):
    units = [Unit(f"u{i}", where_am_i, (f"u{i}",)) for i in range(2)]
    outcome = run_units(units, RunCache(tmp_path, {}), Execution.make("cpu", 2, threads=2))
    assert {r["threads"] for r in outcome.records.values()} == {2}  # not 2 // 2


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_bad_threads_are_one_line_errors(value, tmp_path, capsys):
    assert main(["reproduce", "palimpsa", "--quick", "--out", str(tmp_path), "--threads", value]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"routemem: error: --threads must be a whole number >= 1, got '{value}'"
    assert not (tmp_path / "palimpsa").exists()
