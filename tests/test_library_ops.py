"""The ``routemem::`` torch.library ops (custom_op and triton_op): ``torch.library.opcheck`` on each
(schema, fake tensor shapes and strides, autograd registration, AOT dispatch), float32 and float64,
contiguous and strided inputs; every registered op is covered (a new op without a case here fails
the census). The Triton ops' fake checks need a GPU: under the interpreter only schema and autograd.
And the value checks the ops run in eager: still one clear error for a bad input."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from op_checks import HAS_COMPILER

from routemem.ops import metaplastic_attention, patch_mixture
from routemem.ops.apn import fused as apn_fused
from routemem.ops.apn import grouped_mm as apn_grouped_mm
from routemem.ops.metaplastic import fused as metaplastic_fused
from routemem.ops.metaplastic import recompute

DTYPES = [torch.float32, torch.float64]
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_compiler = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler")


def _apn_args(dtype, strided: bool, grad: bool = True):
    g = torch.Generator().manual_seed(0)
    N, k, K, d, r = 7, 2, 4, 5, 3
    code = torch.randn(N, 2 * r if strided else r, generator=g, dtype=dtype)[:, ::2 if strided else 1]
    indices = torch.randint(0, K, (N, k), generator=g)
    weights = torch.rand(N, k, generator=g, dtype=dtype)
    U = torch.randn(K, r, d, generator=g, dtype=dtype).transpose(1, 2) if strided else \
        torch.randn(K, d, r, generator=g, dtype=dtype)
    a, b = torch.randn(K, r, generator=g, dtype=dtype), torch.randn(K, r, generator=g, dtype=dtype)
    args = [code, indices, weights, U, a, b]
    return [x.requires_grad_(grad and x.is_floating_point()) for x in args]


def _metaplastic_args(dtype, strided: bool, T: int = 10, chunk_size: int = 4, grad: bool = True):
    g = torch.Generator().manual_seed(0)
    B, H, Dk, Dv = 2, 2, 4, 3

    def draw(*shape):  # strided: every other element of a wider tensor along the time axis
        if not strided:
            return torch.randn(*shape, generator=g, dtype=dtype)
        wide = torch.randn(shape[0], 2 * shape[1], *shape[2:], generator=g, dtype=dtype)
        return wide[:, ::2]

    q, v = draw(B, T, H, Dk), draw(B, T, H, Dv)
    k = F.normalize(draw(B, T, H, Dk), dim=-1)
    beta, log_alpha = draw(B, T, H, Dv).abs(), -draw(B, T, H).abs()
    prior = torch.tensor([0.5, 2.0], dtype=dtype)
    M0 = torch.randn(B, H, Dv, Dk, generator=g, dtype=dtype)
    J0 = torch.rand(B, H, Dv, Dk, generator=g, dtype=dtype)
    tensors = [x.requires_grad_(grad) for x in (q, k, v, beta, log_alpha, prior, M0, J0)]
    return tensors + [Dk ** -0.5, True, chunk_size]


def _apn_backward_args(dtype, strided):
    code, indices, weights, U, a, b = (x.detach() for x in _apn_args(dtype, strided, grad=False))
    out, gate, Ut = apn_fused.forward_op(code, indices, weights, U, a, b)
    return [torch.randn_like(out), code, indices, weights, gate, U, Ut, a]


def _metaplastic_backward_args(forward_op, dtype, strided):
    args = _metaplastic_args(dtype, strided, grad=False)
    o, unc, M_T, J_T, starts = forward_op(*args)
    scale, _, chunk_size = args[8:]
    return [torch.randn_like(o), torch.randn_like(unc), torch.randn_like(M_T), None, *args[:6], starts,
            scale, chunk_size]


def _grouped_mm_args(dtype, strided, grad: bool = True):
    """phi [A, r] sorted by group, U^T [K, r, d] (a transposed view of U, as the op is called),
    int32 group ends; widths of 16 bytes (the op's callers pad them), one group left empty."""
    g = torch.Generator().manual_seed(0)
    K, r, d = 3, 4, 8
    phi = torch.randn(10, 2 * r if strided else r, generator=g, dtype=dtype)[:, ::2 if strided else 1]
    Ut = torch.randn(K, d, r, generator=g, dtype=dtype).transpose(1, 2)
    offs = torch.tensor([4, 4, 10], dtype=torch.int32)
    return [phi.requires_grad_(grad), Ut.requires_grad_(grad), offs]


def _grouped_mm_backward_args(dtype, strided):
    phi, Ut, offs = _grouped_mm_args(dtype, strided, grad=False)
    return [torch.randn(phi.shape[0], Ut.shape[2], dtype=dtype), phi, Ut, offs]


def _triton_kernels():
    from routemem.ops.metaplastic import triton as kernels  # registers its ops

    return kernels


def _triton_backward_args(dtype, strided):
    """As _metaplastic_backward_args, with the saved states drawn (float32, [B, H, chunks + 1, 2, Dv,
    Dk] as the Triton forward saves them) rather than computed, so that no kernel runs on the CPU
    tensors here before they are moved to a GPU."""
    args = _metaplastic_args(dtype, strided, grad=False)
    (B, T, H, Dk), Dv, chunk_size = args[0].shape, args[2].shape[-1], args[10]
    g = torch.Generator().manual_seed(1)
    starts = torch.rand(B, H, -(-T // chunk_size) + 1, 2, Dv, Dk, generator=g)
    o_like = torch.randn(args[2].shape, generator=g, dtype=dtype)
    state_like = torch.randn(B, H, Dv, Dk, generator=g, dtype=dtype)
    return [o_like, o_like.clone(), state_like, None, *args[:6], starts, args[8], chunk_size]


# op -> (a function of (dtype, strided) giving its arguments, whether it needs the C++ compiler)
CASES = {
    apn_grouped_mm.grouped_matmul: (_grouped_mm_args, False),
    apn_grouped_mm.grouped_matmul_backward: (_grouped_mm_backward_args, False),
    apn_fused.forward_op: (_apn_args, True),
    apn_fused.backward_op: (_apn_backward_args, True),
    metaplastic_fused.forward_op: (_metaplastic_args, True),
    metaplastic_fused.backward_op: (lambda dtype, strided: _metaplastic_backward_args(
        metaplastic_fused.forward_op, dtype, strided), True),
    recompute.chunk_forward: (_metaplastic_args, False),
    recompute.chunk_backward: (lambda dtype, strided: _metaplastic_backward_args(
        recompute.chunk_forward, dtype, strided), False),
}


if HAS_TRITON:  # the Triton kernels' ops (triton_op): registered when their module is imported
    CASES[_triton_kernels().triton_forward] = (_metaplastic_args, False)
    CASES[_triton_kernels().triton_backward] = (_triton_backward_args, False)


def test_every_registered_op_has_a_case():
    registered = {name for name in dir(torch.ops.routemem) if not name.startswith("_")} - {"name"}
    covered = {op._name for op in CASES}
    assert registered - covered == set(), "a routemem:: op without an opcheck case"
    assert covered <= registered


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", list(CASES), ids=lambda op: op._name)
def test_opcheck(op, dtype, strided):
    make_args, needs_cxx = CASES[op]
    if needs_cxx and not HAS_COMPILER:
        pytest.skip("no C++ compiler")
    if op._name.startswith("apn_grouped_mm") and dtype not in apn_grouped_mm.DTYPES:
        pytest.skip(f"torch's grouped_mm has no {dtype} (patch_mixture runs mode grouped instead)")
    args, checks = make_args(dtype, strided), {}
    if op._name.startswith("metaplastic_triton"):
        if os.environ.get("TRITON_INTERPRET") == "1":
            # the fake-tensor checks trace the Triton kernel, which the interpreter cannot: on CUDA only
            checks = {"test_utils": ("test_schema", "test_autograd_registration")}
        elif torch.cuda.is_available():  # compiled Triton kernels take CUDA tensors
            args = [x.detach().cuda().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x
                    for x in args]
        else:
            pytest.skip("Triton kernels run on CUDA, or on a CPU under TRITON_INTERPRET=1")
    result = torch.library.opcheck(op, args, **checks)
    assert set(result.values()) == {"SUCCESS"}, result


# -- the value checks: eager only, and still one clear message there ----------------------------

def test_eager_value_check_is_one_clear_message():
    q, k, v, beta, log_alpha = (torch.rand(1, 4, 1, 2) for _ in range(5))
    with pytest.raises(ValueError, match=r"^log_alpha must be <= 0 everywhere .* max is [0-9.]+$"):
        metaplastic_attention(q, k, v, beta, log_alpha[..., 0], mode="chunk")


@needs_compiler
def test_fused_kernel_refuses_out_of_range_indices_even_when_compiled():
    """patch_mixture's range check is eager-only; the fused op checks again in its own body, which
    runs on real data under torch.compile too (an index past K would read outside U)."""
    N, d, K, r = 4, 3, 2, 2
    z, V, U, a, b = torch.randn(N, d), torch.randn(d, r), torch.randn(K, d, r), torch.randn(K, r), torch.randn(K, r)
    bad = torch.tensor([[0], [1], [2], [0]])
    weights = torch.ones(N, 1)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 2\)"):
        patch_mixture(z, bad, weights, V, U, a, b, mode="fused")
    torch._dynamo.reset()
    compiled = torch.compile(lambda *t: patch_mixture(*t, mode="fused"), fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 2\)"):
        compiled(z, bad, weights, V, U, a, b)
