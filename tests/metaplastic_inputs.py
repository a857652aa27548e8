"""Inputs and comparisons shared by the metaplastic-attention tests (chunk and fused forms). Inputs
are drawn on the CPU (the same numbers on every device), then moved to ``device``."""

import torch
import torch.nn.functional as F

B, H, DK, DV = 2, 2, 8, 6
PRIOR = torch.tensor([0.5, 2.0])  # one prior per head


def make_inputs(T, *, dtype=torch.float32, seed=0, strong_decay=True, B=B, H=H, Dk=DK, Dv=DV,
                device="cpu"):
    """Unit-norm keys, beta in [0, 1). log_alpha: head 0 mild (>= -0.05, long memory), the other
    heads strong (down to -5 per step, where exp(-cumulative log decay) would overflow float32)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, Dk, generator=g, dtype=dtype)
    k = F.normalize(torch.randn(B, T, H, Dk, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, Dv, generator=g, dtype=dtype)
    beta = torch.rand(B, T, H, Dv, generator=g, dtype=dtype)
    low = torch.full((H,), -5.0 if strong_decay else -0.05, dtype=dtype)
    low[0] = -0.05
    log_alpha = low * torch.rand(B, T, H, generator=g, dtype=dtype)
    return tuple(x.to(device) for x in (q, k, v, beta, log_alpha))


def make_state(*, dtype=torch.float32, seed=1, B=B, H=H, Dk=DK, Dv=DV, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Dv, Dk, generator=g, dtype=dtype).to(device),
            (0.5 + torch.rand(B, H, Dv, Dk, generator=g, dtype=dtype)).to(device))


def assert_close(actual, expected, rtol=1e-5, name=""):
    """Max abs error within rtol of the expected tensor's scale (at least 1: inputs are O(1))."""
    scale = max(expected.abs().max().item(), 1.0)
    err = (actual - expected).abs().max().item()
    assert err <= rtol * scale, f"{name}: max error {err:.3g} > {rtol:g} * {scale:.3g}"


def flat_outputs(result):
    o, unc, (mu, importance) = result
    return [o, unc, mu, importance]


def gradcheck_inputs(device="cpu"):
    q, k, v, beta, log_alpha = make_inputs(5, dtype=torch.float64, B=1, H=2, Dk=3, Dv=2, device=device)
    beta = beta + 0.1  # away from the beta >= 0 boundary the finite differences would cross
    log_alpha = log_alpha - 0.1  # likewise for log_alpha <= 0
    mu0, importance0 = make_state(dtype=torch.float64, B=1, H=2, Dk=3, Dv=2, device=device)
    prior = torch.tensor([0.7, 1.5], dtype=torch.float64, device=device)
    return [x.requires_grad_() for x in (q, k, v, beta, log_alpha, mu0, importance0, prior)]
