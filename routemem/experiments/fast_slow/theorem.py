"""Claim 5 of the fast-slow study: the paper's theorem checked numerically, with no neural network.

The system (singularly perturbed, linear in the fast variable x):
    eps dx/dt = Q(y)^T x           x: a distribution over the 3 states of a Markov chain
        dy/dt = c . x - y + F sin(t)
Q(y) is the chain's generator (off-diagonal rates >= 0, rows sum to 0), with rates that depend smoothly
on the slow y. The theorem: as eps -> 0, x(t) stays on the equilibrium manifold x = p_st(y(t)), the
master equation's stationary distribution (Q^T p = 0, sum p = 1); after the initial layer the distance
is O(eps) (first-order Tikhonov correction eps (Q^T)^+ dp_st/dt). We measure it for four eps and fit
the log-log slope; the rule below is fixed before any run.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np

from routemem.experiments.shared.common import NOT_REPRODUCED, REPRODUCED
from routemem.fileio import write_bytes_atomic

EPSILONS = (0.1, 0.03, 0.01, 0.003)
SLOPE_RANGE = (0.8, 1.2)  # reproduced iff the fitted slope of log(error) on log(eps) lies in here

# The chain: rate i -> j is RATE_SCALE[i, j] * exp(RATE_TILT[i, j] * tanh(y)). tanh keeps every rate
# within RATE_SCALE * exp(+-|RATE_TILT|) for any y, so the chain stays irreducible and its spectral gap
# is bounded below (min_spectral_gap checks it over all of tanh's range).
RATE_SCALE = np.array([[0.0, 1.0, 0.5],
                       [0.8, 0.0, 1.2],
                       [0.6, 0.9, 0.0]])
RATE_TILT = np.array([[0.0, 1.0, -0.6],
                      [-0.8, 0.0, 0.7],
                      [0.5, -1.0, 0.0]])
COUPLING = np.array([-2.0, 0.5, 2.0])  # c: how x feeds back into y
FORCING = 1.5  # F: keeps y moving; if y settled, the error would decay to 0 and hide the eps-scaling
Y0 = 0.0

# t0: the initial layer decays like exp(-gap t / eps); the gap is >= 2.0 for every y (min_spectral_gap),
# so at t0 = 1.5 and the largest eps, 0.1, it is down to exp(-30) ~ 1e-13, far below the O(eps)
# error at any eps we fit (the smallest is ~1e-3). The window [t0, T_END] spans one forcing period.
T0 = 1.5
T_END = T0 + 2 * np.pi
STEPS_PER_FAST_TIME = 10  # dt = 1 / (10 * fast rate) = eps / 10: RK4 accurate and stable for Q's spectrum
DT_MAX = 0.01  # and never coarser than this for the slow variable
TRACE_EPS = 0.1  # the eps shown against p_st in the plot: its lag behind p_st is visible


def rate_matrix(y) -> np.ndarray:
    """The generator Q(y): shape (3, 3), or (..., 3, 3) for an array of y (vectorised for the trace)."""
    y = np.asarray(y, dtype=np.float64)[..., None, None]
    rates = RATE_SCALE * np.exp(RATE_TILT * np.tanh(y))  # diagonal of RATE_SCALE is 0
    return rates - np.eye(3) * rates.sum(-1, keepdims=True)


def stationary(Q: np.ndarray) -> np.ndarray:
    """p with Q^T p = 0 and sum p = 1: Q^T is singular (rank n-1 for an irreducible chain), so one of
    its equations is replaced by the normalisation. Works on a stack (..., n, n)."""
    M = np.swapaxes(Q, -1, -2).copy()
    M[..., -1, :] = 1.0
    rhs = np.zeros(Q.shape[:-1])
    rhs[..., -1] = 1.0
    return np.linalg.solve(M, rhs[..., None])[..., 0]


def spectral_gap(Q: np.ndarray) -> float:
    """Slowest nonzero relaxation rate of the master equation: min |Re lambda| over Q's other eigenvalues."""
    real = np.sort(np.abs(np.linalg.eigvals(Q).real))
    return float(real[1])


def min_spectral_gap(points: int = 201) -> float:
    """The gap over every y: rates depend on y only through tanh(y) in [-1, 1], so a grid there covers all."""
    return min(spectral_gap(rate_matrix(np.arctanh(u))) for u in np.linspace(-0.999999, 0.999999, points))


def simulate(eps: float, fast_rate: float | None = None, dt_scale: float = 1.0) -> dict:
    """RK4 on (x, y) from y(0) = Y0 and x(0) = the state least likely under p_st(y(0)) (far from it).

    fast_rate multiplies Q^T x; None means 1/eps (the theorem's system). A number makes the fast
    variable relax at a rate independent of eps: the negative control. dt_scale < 1 refines the step
    (the convergence check). Returns arrays t, y, x (steps, 3), p_st (steps, 3), the per-step error
    ||x - p_st||_1, and error = its max over t >= T0 (the theorem bounds it uniformly there)."""
    rate = 1.0 / eps if fast_rate is None else fast_rate
    steps = int(np.ceil(T_END / (dt_scale * min(DT_MAX, 1.0 / (STEPS_PER_FAST_TIME * rate)))))
    dt = T_END / steps

    def deriv(t, x, y):
        return rate * (rate_matrix(y).T @ x), COUPLING @ x - y + FORCING * np.sin(t)

    p0 = stationary(rate_matrix(Y0))
    x, y = np.eye(3)[np.argmin(p0)], Y0
    xs, ys = np.empty((steps + 1, 3)), np.empty(steps + 1)
    xs[0], ys[0] = x, y
    for n in range(steps):
        t = n * dt
        k1x, k1y = deriv(t, x, y)
        k2x, k2y = deriv(t + dt / 2, x + dt / 2 * k1x, y + dt / 2 * k1y)
        k3x, k3y = deriv(t + dt / 2, x + dt / 2 * k2x, y + dt / 2 * k2y)
        k4x, k4y = deriv(t + dt, x + dt * k3x, y + dt * k3y)
        x = x + dt / 6 * (k1x + 2 * k2x + 2 * k3x + k4x)
        y = y + dt / 6 * (k1y + 2 * k2y + 2 * k3y + k4y)
        xs[n + 1], ys[n + 1] = x, y
    t = np.arange(steps + 1) * dt
    p_st = stationary(rate_matrix(ys))
    distance = np.abs(xs - p_st).sum(-1)
    return {"eps": eps, "t": t, "y": ys, "x": xs, "p_st": p_st, "distance": distance,
            "error": float(distance[t >= T0].max()), "dt": dt}


def fit_slope(epsilons, errors) -> float:
    """Least-squares slope of log(error) against log(eps)."""
    return float(np.polyfit(np.log(epsilons), np.log(errors), 1)[0])


def verdict_for(slope: float) -> str:
    return REPRODUCED if SLOPE_RANGE[0] <= slope <= SLOPE_RANGE[1] else NOT_REPRODUCED


def tracking_study(epsilons=EPSILONS, fast_rate: float | None = None) -> dict:
    """The claim's measurement, JSON-ready (plain floats and lists). fast_rate: see simulate."""
    start = time.perf_counter()
    errors = [simulate(eps, fast_rate)["error"] for eps in epsilons]
    slope = fit_slope(epsilons, errors)
    verdict = verdict_for(slope)
    inside = "inside" if verdict == REPRODUCED else "outside"
    why = (f"max ||x - p_st(y)||_1 over t in [{T0:g}, {T_END:.2f}] is "
           + ", ".join(f"{e:.2e}" for e in errors) + " at eps " + ", ".join(f"{e:g}" for e in epsilons)
           + f": log-log slope {slope:.3f}, {inside} [{SLOPE_RANGE[0]:g}, {SLOPE_RANGE[1]:g}]")
    return {"epsilons": [float(e) for e in epsilons], "errors": errors, "slope": slope,
            "slope_range": list(SLOPE_RANGE), "verdict": verdict, "why": why,
            "seconds": time.perf_counter() - start,
            "setting": {"t0": T0, "t_end": float(T_END), "dt": f"min({DT_MAX:g}, eps/{STEPS_PER_FAST_TIME})",
                        "fast_rate": "1/eps" if fast_rate is None else float(fast_rate),
                        "states": 3, "min_spectral_gap": min_spectral_gap()}}


def plot_tracking(result: dict, path, trace: dict | None = None) -> None:
    """One PNG at ``path`` (written atomically): left, error against eps (log-log) with the fitted line
    and a slope-1 guide; right, x_i(t) against p_st,i(y(t)) for ``trace`` (a simulate() result;
    None simulates eps = TRACE_EPS, a fraction of a second)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trace = simulate(TRACE_EPS) if trace is None else trace
    eps, errors = np.array(result["epsilons"]), np.array(result["errors"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.loglog(eps, errors, "o", label="measured")
    intercept = np.mean(np.log(errors) - result["slope"] * np.log(eps))
    left.loglog(eps, np.exp(intercept) * eps ** result["slope"], "-", label=f"fit: slope {result['slope']:.2f}")
    guide = errors[-1] * eps / eps[-1]
    left.loglog(eps, guide, ":", color="grey", label="slope 1")
    left.set(xlabel="eps", ylabel="max ||x - p_st(y)||_1 after t0", title=f"tracking error ({result['verdict']})")
    left.legend(fontsize=7)
    for i in range(trace["x"].shape[1]):
        line, = right.plot(trace["t"], trace["x"][:, i], label=f"x_{i}")
        right.plot(trace["t"], trace["p_st"][:, i], "--", color=line.get_color(), label=f"p_st,{i}(y(t))")
    right.axvline(T0, color="grey", lw=0.8)
    right.set(xlabel="t", ylabel="probability", title=f"eps = {trace['eps']:g}: x(t) against p_st(y(t)); t0 marked")
    right.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    write_bytes_atomic(Path(path), buffer.getvalue())
