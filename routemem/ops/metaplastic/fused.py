"""``mode="fused"``: metaplastic attention as one C++ scan per (batch, head), CPU only.

The chunked PyTorch form is bound by memory traffic: the elementwise M_t / I_t forces every step's
[Dv, Dk] states into memory, and each op is another pass over them. ``fused_kernel.cpp`` keeps the
two states of one head in cache and touches each cell a few times per step; its backward rebuilds
one chunk of states from the saved chunk-start states, as ``recompute.py`` does.

The kernel is compiled on first use with the system C++ compiler (``$CXX``, else ``c++``) into
``$ROUTEMEM_CACHE`` (default ~/.cache/routemem) and loaded with ctypes: no build step at install
time and no torch headers (it compiles in about a second). ``available()`` says whether that
worked; the other modes do not need it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from routemem.ops.metaplastic.chunk import linear_state

SOURCE = Path(__file__).with_name("fused_kernel.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC"]
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_P, _I64 = ctypes.c_void_p, ctypes.c_int64


def _cpu_model() -> str:
    """-march=native code is only valid on the CPU that built it: part of the cache key."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(compiler: str) -> Path:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), _cpu_model().encode(),
                                     compiler.encode()])).hexdigest()[:16]
    folder = Path(os.environ.get("ROUTEMEM_CACHE", Path.home() / ".cache" / "routemem")) / "kernels"
    library = folder / f"metaplastic-{key}.so"
    if library.exists():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".metaplastic-", suffix=".so", dir=folder)
    os.close(fd)
    try:  # compile beside the target, then rename: a concurrent or killed build never leaves half a file
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {SOURCE.name}:\n{done.stderr.strip()}")
        os.replace(tmp, library)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return library


@functools.cache
def _library() -> ctypes.CDLL:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise RuntimeError("no C++ compiler found (set $CXX)")
    lib = ctypes.CDLL(str(_build(compiler)))
    for suffix in _SUFFIX.values():
        fwd = getattr(lib, f"metaplastic_forward_{suffix}")
        fwd.argtypes = [_P] * 8 + [ctypes.c_double] + [_I64] * 6 + [ctypes.c_int] + [_P] * 3 + [_I64] * 2
        fwd.restype = None
        bwd = getattr(lib, f"metaplastic_backward_{suffix}")
        bwd.argtypes = [_P] * 7 + [ctypes.c_double] + [_I64] * 6 + [_P] * 12 + [_I64] * 2
        bwd.restype = None
    return lib


def available() -> bool:
    """Whether the fused kernel compiled and loaded on this machine."""
    try:
        _library()
        return True
    except (RuntimeError, OSError):
        return False


def applies_to(x: torch.Tensor) -> bool:
    """Whether ``mode="auto"`` picks the fused kernel for inputs like ``x``."""
    return x.device.type == "cpu" and x.dtype in _SUFFIX and available()


def _ptr(x: torch.Tensor | None):
    return None if x is None else x.data_ptr()


def _on_threads(call, rows: int) -> None:
    """Run ``call(begin, end)`` on disjoint ranges of the B*H rows, one range per torch thread."""
    workers = max(1, min(torch.get_num_threads(), rows))
    bounds = [rows * w // workers for w in range(workers + 1)]
    if workers == 1:
        call(0, rows)
        return
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(call, bounds[:-1], bounds[1:]))


class MetaplasticFusedFn(torch.autograd.Function):
    """(q, k, v, beta, log_alpha, prior [H], M0, J0, scale, with_uncertainty, chunk_size) ->
    (o, uncertainty or None, M_T, J_T); saves the inputs and the chunk-start states."""

    @staticmethod
    def forward(ctx, q, k, v, beta, log_alpha, prior, M0, J0, scale, with_uncertainty, chunk_size):
        q, k, v, beta, log_alpha, prior, M0, J0 = (
            x.contiguous() for x in (q, k, v, beta, log_alpha, prior, M0, J0))
        B, T, H, Dk = q.shape
        Dv = v.shape[-1]
        N = -(-T // chunk_size)
        o = torch.empty_like(v)
        unc = torch.empty_like(v) if with_uncertainty else None
        starts = q.new_empty(B, H, N + 1, 2, Dv, Dk)
        kernel = getattr(_library(), f"metaplastic_forward_{_SUFFIX[q.dtype]}")
        inputs = [_ptr(x) for x in (q, k, v, beta, log_alpha, prior, M0, J0)]
        _on_threads(lambda lo, hi: kernel(*inputs, scale, B, T, H, Dk, Dv, chunk_size, int(with_uncertainty),
                                          _ptr(o), _ptr(unc), _ptr(starts), lo, hi), B * H)
        ctx.save_for_backward(q, k, v, beta, log_alpha, prior, starts)
        ctx.scale, ctx.chunk_size, ctx.with_uncertainty = scale, chunk_size, with_uncertainty
        return o, unc, starts[:, :, N, 0].clone(), starts[:, :, N, 1].clone()

    @staticmethod
    def backward(ctx, do, du, dM_T, dJ_T):
        q, k, v, beta, log_alpha, prior, starts = ctx.saved_tensors
        B, T, H, Dk = q.shape
        Dv = v.shape[-1]
        do = torch.zeros_like(v) if do is None else do.contiguous()
        du = du.contiguous() if ctx.with_uncertainty and du is not None else None
        dM_T = None if dM_T is None else dM_T.contiguous()
        dJ_T = None if dJ_T is None else dJ_T.contiguous()
        dq, dk, dv, dbeta = (torch.empty_like(x) for x in (q, k, v, beta))
        dlog_alpha = torch.empty_like(log_alpha)
        dM0, dJ0 = q.new_empty(B, H, Dv, Dk), q.new_empty(B, H, Dv, Dk)
        dprior = q.new_empty(B, H)
        kernel = getattr(_library(), f"metaplastic_backward_{_SUFFIX[q.dtype]}")
        inputs = [_ptr(x) for x in (q, k, v, beta, log_alpha, prior, starts)]
        grads = [_ptr(x) for x in (do, du, dM_T, dJ_T, dq, dk, dv, dbeta, dlog_alpha, dM0, dJ0, dprior)]
        _on_threads(lambda lo, hi: kernel(*inputs, ctx.scale, B, T, H, Dk, Dv, ctx.chunk_size,
                                          *grads, lo, hi), B * H)
        return dq, dk, dv, dbeta, dlog_alpha, dprior.sum(0), dM0, dJ0, None, None, None


def metaplastic_fused(q, k, v, beta, log_alpha, i_prior, scale, initial_state, with_uncertainty,
                      chunk_size):
    """Inputs checked by ``metaplastic_attention``; i_prior is a [H] tensor. Same returns as
    ``metaplastic_chunk``: (o, uncertainty or None, (mu, importance))."""
    if q.device.type != "cpu":
        raise ValueError(f"mode='fused' is a CPU kernel; the inputs are on {q.device} (use mode='chunk')")
    if q.dtype not in _SUFFIX:
        raise ValueError(f"mode='fused' takes float32 or float64, got {q.dtype}")
    B, _, H, Dk = q.shape
    Dv = v.shape[-1]
    M0, J0 = linear_state(initial_state, i_prior, q, (B, H, Dv, Dk))
    o, unc, M, J = MetaplasticFusedFn.apply(q, k, v, beta, log_alpha, i_prior, M0, J0, scale,
                                            with_uncertainty, chunk_size)
    importance = J + i_prior.view(1, H, 1, 1)
    return o, unc, (M / importance, importance)
