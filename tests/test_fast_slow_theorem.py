"""Claim 5 (the fast-slow theorem, numerically): the chain, its stationary distribution, the integrator,
the reproduction itself, and a negative control that shows the rule can fail."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from routemem.experiments.fast_slow import theorem as fst
from routemem.experiments.shared.common import NOT_REPRODUCED, REPRODUCED

YS = np.linspace(-4.0, 4.0, 41)


@pytest.fixture(scope="module")
def study():
    return fst.tracking_study()


def test_rate_matrix_is_a_generator():
    Q = fst.rate_matrix(YS)
    assert Q.shape == (len(YS), 3, 3)
    np.testing.assert_allclose(Q.sum(-1), 0.0, atol=1e-12)
    off_diagonal = Q[:, ~np.eye(3, dtype=bool)]
    assert (off_diagonal > 0).all()  # irreducible: the stationary distribution is unique
    np.testing.assert_array_equal(fst.rate_matrix(YS[3]), Q[3])  # a scalar y gives the same (3, 3)


def test_stationary_solves_the_master_equation():
    Q = fst.rate_matrix(YS)
    p = fst.stationary(Q)
    np.testing.assert_allclose(np.einsum("nji,nj->ni", Q, p), 0.0, atol=1e-12)  # Q^T p = 0
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-12)
    assert (p > 0).all()
    # a chain whose answer is known: two states, rates a (0 -> 1) and b (1 -> 0): p = (b, a) / (a + b)
    two = np.array([[-2.0, 2.0], [3.0, -3.0]])
    np.testing.assert_allclose(fst.stationary(two), [0.6, 0.4])


def test_t0_is_past_the_initial_layer():
    # why T0 is long enough: the slowest decay of the initial layer at the largest eps is negligible
    gap = fst.min_spectral_gap()
    assert gap > 1.0
    assert math.exp(-gap * fst.T0 / max(fst.EPSILONS)) < 1e-6


def test_simulate_conserves_mass_and_starts_far_away():
    run = fst.simulate(0.1)
    np.testing.assert_allclose(run["x"].sum(-1), 1.0, atol=1e-12)
    assert run["distance"][0] > 1.0  # x(0) is a vertex far from p_st(y(0))
    after = run["t"] >= fst.T0
    assert run["y"][after].max() - run["y"][after].min() > 1.0  # y keeps moving: the eps-scaling is visible
    assert run["error"] == pytest.approx(run["distance"][after].max())


@pytest.mark.parametrize("eps", [0.1, 0.01])
def test_halving_dt_leaves_the_error_unchanged(eps):
    coarse, fine = fst.simulate(eps), fst.simulate(eps, dt_scale=0.5)
    assert fine["dt"] == pytest.approx(coarse["dt"] / 2, rel=1e-3)
    assert abs(fine["error"] - coarse["error"]) < 1e-4 * coarse["error"]  # measured: 2e-5 (0.1), 1e-7 (0.01)


def test_fit_slope_recovers_a_power_law():
    eps = np.array(fst.EPSILONS)
    for k in (0.5, 1.0, 2.0):
        assert fst.fit_slope(eps, 3.0 * eps**k) == pytest.approx(k)
    assert fst.verdict_for(1.0) == REPRODUCED
    assert fst.verdict_for(0.5) == NOT_REPRODUCED and fst.verdict_for(1.5) == NOT_REPRODUCED


def test_tracking_error_is_linear_in_eps(study):
    # the reproduction itself: a real measurement on the shipped settings
    assert study["slope_range"] == [0.8, 1.2]
    assert 0.8 <= study["slope"] <= 1.2
    assert study["verdict"] == REPRODUCED
    assert all(a > b for a, b in zip(study["errors"], study["errors"][1:]))
    assert json.loads(json.dumps(study)) == study  # JSON-ready: plain types only
    assert f"{study['slope']:.3f}" in study["why"]


def test_negative_control_eps_independent_relaxation_is_not_reproduced():
    # the fast variable relaxes at a fixed rate, whatever eps: the error cannot shrink with eps
    control = fst.tracking_study(fast_rate=10.0)
    assert abs(control["slope"]) < 0.2
    assert control["verdict"] == NOT_REPRODUCED
    assert min(control["errors"]) > 0.01


def test_plot_tracking_writes_one_png(tmp_path, study):
    path = tmp_path / "eps_slope.png"
    fst.plot_tracking(study, path, trace=fst.simulate(0.1))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["eps_slope.png"]  # no temp file left behind
