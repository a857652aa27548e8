"""Tests of routemem.ops.hopfield: one retrieval step is the closed-form minimiser of the free energy
(Lagrangian stationarity, perturbations within the simplex, the minimum value), the classical state
update never raises the state energy and keeps it in [0, 2 M^2], large beta retrieves the nearest
stored pattern, the retrieval written out by hand, float64 gradcheck, and input validation."""

import math

import pytest
import torch

from routemem.ops import (
    default_beta,
    hopfield_energy,
    hopfield_retrieve,
    hopfield_state_energy,
)

H, LQ, N, D, DV = 2, 3, 7, 5, 4


def rand(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def optimal_weights(q, k, beta):
    return hopfield_retrieve(q, k, k, beta, return_weights=True)[1]


# --- the free energy and its minimiser --------------------------------------------------------


@pytest.mark.parametrize("beta", [0.1, 1.0, 4.0])
def test_one_step_weights_satisfy_the_lagrangian_condition(beta):
    # minimising F over the simplex: grad_p F + lambda * 1 = 0, i.e. grad_p F is the same for every j
    q, k = rand(H, LQ, D), rand(H, N, D)
    p = optimal_weights(q, k, beta).detach().requires_grad_()
    hopfield_energy(p, q, k, beta).sum().backward()
    g = p.grad
    spread = (g - g.mean(-1, keepdim=True)).abs().max()
    assert spread < 1e-12 * max(1.0, g.abs().max().item())
    # ... and a point that is not the minimiser fails the same check (the test can fail)
    other = torch.softmax(0.5 * beta * (q @ k.transpose(-2, -1)), -1).requires_grad_()
    hopfield_energy(other, q, k, beta).sum().backward()
    assert (other.grad - other.grad.mean(-1, keepdim=True)).abs().max() > 1e-3


@pytest.mark.parametrize("beta", [0.1, 1.0, 4.0])
def test_perturbations_within_the_simplex_only_raise_the_free_energy(beta):
    q, k = rand(H, LQ, D), rand(H, N, D)
    p = optimal_weights(q, k, beta)
    best = hopfield_energy(p, q, k, beta)
    dirichlet = torch.distributions.Dirichlet(torch.ones(N, dtype=torch.float64))
    for t in (1e-3, 0.1, 0.5, 1.0):  # small and large moves toward random points of the simplex
        r = dirichlet.sample((200, H, LQ))
        moved = (1 - t) * p + t * r
        assert torch.allclose(moved.sum(-1), torch.ones(()).double())
        assert (hopfield_energy(moved, q, k, beta) > best).all()
    # vertices and the centre of the simplex too
    vertices = torch.eye(N, dtype=torch.float64)[:, None, None].expand(N, H, LQ, N)
    assert (hopfield_energy(vertices, q, k, beta) > best).all()
    assert (hopfield_energy(torch.full_like(p, 1 / N), q, k, beta) > best).all()


@pytest.mark.parametrize("beta", [0.3, 2.0])
def test_the_minimum_free_energy_is_minus_lse(beta):
    q, k = rand(H, LQ, D), rand(H, N, D)
    best = hopfield_energy(optimal_weights(q, k, beta), q, k, beta)
    expected = -torch.logsumexp(beta * (q @ k.transpose(-2, -1)), -1) / beta
    torch.testing.assert_close(best, expected, rtol=1e-12, atol=1e-12)


def test_free_energy_written_out():
    q, k, beta = rand(1, D), rand(N, D), 0.7
    p = torch.softmax(rand(1, N), -1)
    by_hand = sum(-p[0, j] * (q[0] @ k[j]) + p[0, j] * math.log(p[0, j]) / beta for j in range(N))
    torch.testing.assert_close(hopfield_energy(p, q, k, beta)[0], by_hand)
    vertex = torch.zeros(1, N, dtype=torch.float64)
    vertex[0, 2] = 1.0  # 0 log 0 counts as 0: at a vertex F is -<q, k_j>
    torch.testing.assert_close(hopfield_energy(vertex, q, k, beta)[0], -(q[0] @ k[2]))


# --- the state update and the state energy ----------------------------------------------------


def states(q, k, beta, max_steps):
    """xi_0 = q, xi_s = the state after s classical updates: retrieving the keys themselves after s
    steps reads the state out (p_s K is the (s+1)-th update, so values=keys with steps=s gives xi_s)."""
    return [q] + [hopfield_retrieve(q, k, k, beta, steps=s) for s in range(1, max_steps + 1)]


@pytest.mark.parametrize("beta", [0.05, 0.5, 2.0, 20.0])
def test_more_update_steps_never_raise_the_state_energy(beta):
    q, k = 2 * rand(8, H, LQ, D), rand(8, H, N, D)
    energies = torch.stack([hopfield_state_energy(x, k, beta) for x in states(q, k, beta, 12)])
    rises = energies[1:] - energies[:-1]
    assert (rises <= 1e-12 * energies.abs().max()).all()
    assert (rises[0] < -1e-6).any()  # the first update does move the energy: not vacuous
    M = k.norm(dim=-1).amax(-1, keepdim=True)
    assert (energies[1:] >= -1e-12).all() and (energies[1:] <= 2 * M ** 2 + 1e-12).all()  # Ramsauer's bounds


def test_state_energy_rises_for_a_step_that_is_not_the_update():
    # the monotonicity is a property of the CCCP update: a step with the values as the new state
    # (a different map) raises the energy for some inputs, so the check above can fail
    q, k, v, beta = rand(64, LQ, D), rand(64, N, D), 3 * rand(64, N, D), 1.0
    e0 = hopfield_state_energy(q, k, beta)
    e1 = hopfield_state_energy(hopfield_retrieve(q, k, v, beta), k, beta)
    assert (e1 > e0).any()


def test_state_energy_written_out():
    q, k, beta = rand(1, D), rand(N, D), 0.8
    M = max(k[j].norm() for j in range(N))
    lse = math.log(sum(math.exp(beta * (k[j] @ q[0])) for j in range(N))) / beta
    by_hand = -lse + 0.5 * (q[0] @ q[0]) + math.log(N) / beta + 0.5 * M ** 2
    torch.testing.assert_close(hopfield_state_energy(q, k, beta)[0], by_hand)


def test_per_head_beta_equals_running_each_head_alone():
    q, k, v = rand(H, LQ, D), rand(H, N, D), rand(H, N, DV)
    betas = torch.tensor([0.3, 3.0], dtype=torch.float64)
    out = hopfield_retrieve(q, k, v, betas.view(H, 1, 1), steps=2)
    energy = hopfield_state_energy(q, k, betas.view(H, 1, 1))
    for h in range(H):
        torch.testing.assert_close(out[h], hopfield_retrieve(q[h], k[h], v[h], betas[h].item(), steps=2))
        torch.testing.assert_close(energy[h], hopfield_state_energy(q[h], k[h], betas[h].item()))


# --- retrieval ----------------------------------------------------------------------------------


def test_retrieval_written_out_by_hand():
    q, k, v, beta = rand(LQ, D), rand(N, D), rand(N, DV), 0.6
    out, p = hopfield_retrieve(q, k, v, beta, return_weights=True)
    for i in range(LQ):
        s = torch.stack([beta * (q[i] @ k[j]) for j in range(N)])
        w = torch.exp(s - s.max()) / torch.exp(s - s.max()).sum()
        torch.testing.assert_close(p[i], w)
        torch.testing.assert_close(out[i], sum(w[j] * v[j] for j in range(N)))
    # two steps: the state moves to p K first, then reads out with that state's weights
    xi = p @ k
    torch.testing.assert_close(hopfield_retrieve(q, k, v, beta, steps=2), torch.softmax(beta * xi @ k.T, -1) @ v)


def test_default_beta_is_one_over_sqrt_d():
    q, k, v = rand(LQ, D), rand(N, D), rand(N, DV)
    assert default_beta(16) == 0.25
    torch.testing.assert_close(hopfield_retrieve(q, k, v), hopfield_retrieve(q, k, v, 1 / math.sqrt(D)))
    assert not torch.allclose(hopfield_retrieve(q, k, v), hopfield_retrieve(q, k, v, 1.0))


@pytest.mark.parametrize("steps", [1, 3])
def test_large_beta_retrieves_the_nearest_stored_pattern(steps):
    k = torch.nn.functional.normalize(rand(N, D), dim=-1)  # equal norms: max <q, k> = nearest in L2
    v = rand(N, DV)
    q = k[torch.randint(N, (50,))] + 0.3 * rand(50, D)
    nearest = torch.cdist(q, k).argmin(-1)
    out, p = hopfield_retrieve(q, k, v, 1e4, steps=steps, return_weights=True)
    torch.testing.assert_close(out, v[nearest], rtol=0, atol=1e-8)
    assert (p.argmax(-1) == nearest).all()
    soft = hopfield_retrieve(q, k, v, 0.1, steps=steps)  # small beta: an average, not one pattern
    assert (soft - v[nearest]).abs().max() > 0.1


def test_leading_dims_broadcast():
    q, k, v = rand(H, LQ, D), rand(4, H, N, D), rand(4, H, N, DV)  # shared queries, a batch of keys
    out = hopfield_retrieve(q, k, v, steps=2)
    assert out.shape == (4, H, LQ, DV)
    torch.testing.assert_close(out[2], hopfield_retrieve(q, k[2], v[2], steps=2))


@pytest.mark.parametrize("steps", [1, 2])
def test_gradcheck_float64(steps):
    q, k, v = (rand(H, LQ, D).requires_grad_(), rand(H, N, D).requires_grad_(), rand(H, N, DV).requires_grad_())
    beta = torch.tensor([0.4, 1.3], dtype=torch.float64).view(H, 1, 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda q, k, v, b: hopfield_retrieve(q, k, v, b, steps=steps), (q, k, v, beta))
    p = torch.softmax(rand(H, LQ, N), -1).requires_grad_()
    assert torch.autograd.gradcheck(lambda p, q, k: hopfield_energy(p, q, k, 0.7), (p, q, k))
    assert torch.autograd.gradcheck(lambda q, k: hopfield_state_energy(q, k, 0.7), (q, k))


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("make, message", [
    (lambda: hopfield_retrieve(rand(LQ, D), rand(N, D + 1), rand(N, DV)), "pattern dimension"),
    (lambda: hopfield_retrieve(rand(LQ, D), rand(N, D), rand(N + 1, DV)), "same number of patterns"),
    (lambda: hopfield_retrieve(rand(D), rand(N, D), rand(N, DV)), "queries must be a tensor"),
    (lambda: hopfield_retrieve(rand(LQ, D), rand(N, D).float(), rand(N, DV)), "dtype"),
    (lambda: hopfield_retrieve(rand(LQ, D).long(), rand(N, D).long(), rand(N, DV).long()), "floating point"),
    (lambda: hopfield_retrieve(rand(LQ, D), rand(N, D), rand(N, DV), steps=0), "steps must be an int >= 1"),
    (lambda: hopfield_retrieve(rand(LQ, D), rand(N, D), rand(N, DV), beta=0.0), "beta must be"),
    (lambda: hopfield_retrieve(rand(LQ, D), rand(N, D), rand(N, DV), beta=math.inf), "beta must be"),
    (lambda: hopfield_retrieve(rand(LQ, D), rand(N, D), rand(N, DV), beta=-torch.ones(1)), "beta must be"),
    (lambda: hopfield_energy(rand(LQ, N + 1), rand(LQ, D), rand(N, D)), "stored patterns"),
    (lambda: hopfield_state_energy(rand(LQ, D), rand(N, D), beta=torch.ones(LQ)), "end in a dim of 1"),
])
def test_bad_input_is_a_value_error_that_says_what_is_wrong(make, message):
    with pytest.raises(ValueError, match=message):
        make()
