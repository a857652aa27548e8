"""Input checks shared by the ops: each failure is a ValueError naming the tensor and the shape or
range it should have, so a caller sees what is wrong without reading the op.

Shape and dtype checks read only metadata and run everywhere. Checks that read tensor *values*
(``log_alpha <= 0``, index ranges) run in eager only (``checking_values()``): on a GPU each one is a
device sync, and under ``torch.compile`` a data-dependent branch that would break the graph. Eager
is where a user meets a bad input first; a compiled model runs the same inputs it ran eagerly.
"""

from __future__ import annotations

import torch


def expect_shape(name: str, tensor: torch.Tensor, shape: tuple, layout: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(shape)} ({layout})")


def expect_same_dtype(reference: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    if not reference.is_floating_point():
        raise ValueError(f"q must be a floating-point tensor, got {reference.dtype}")
    for name, tensor in tensors.items():
        if tensor is not None and tensor.dtype != reference.dtype:
            raise ValueError(f"{name} has dtype {tensor.dtype} but q has {reference.dtype}; "
                             "cast all inputs to one dtype")


def checking_values() -> bool:
    """Whether checks that read tensor values run: in eager, not while torch.compile traces."""
    return not torch.compiler.is_compiling()


def expect_log_decay(log_alpha: torch.Tensor) -> None:
    """log_alpha is the log of a decay in (0, 1], so it must be <= 0 (and not NaN). Eager only."""
    if checking_values() and not bool((log_alpha <= 0).all()):
        raise ValueError(f"log_alpha must be <= 0 everywhere (a decay alpha = exp(log_alpha) in (0, 1]); "
                         f"max is {log_alpha.max().item():.4g}")


def expect_range(name: str, tensor: torch.Tensor, low: float, high: float | None = None) -> None:
    """Every value of ``tensor`` >= low (and <= high). Eager only."""
    if not checking_values():
        return
    ok = tensor >= low if high is None else (tensor >= low) & (tensor <= high)
    if not bool(ok.all()):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bounds} everywhere; range is "
                         f"[{tensor.min().item():.4g}, {tensor.max().item():.4g}]")


def check_mode(mode: str, modes: tuple[str, ...]) -> None:
    if mode not in modes:
        raise ValueError(f"mode must be one of {modes}, got {mode!r}")


def check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int]:
    """q, k: [B, T, H, Dk]; v: [B, T, H, Dv]. Returns (B, T, H, Dk, Dv)."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        got = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"q must be [B, T, H, Dk], got {got}")
    B, T, H, Dk = q.shape
    expect_shape("k", k, (B, T, H, Dk), "[B, T, H, Dk] like q")
    if not isinstance(v, torch.Tensor) or v.dim() != 4 or tuple(v.shape[:3]) != (B, T, H):
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"v has shape {got}, expected ({B}, {T}, {H}, Dv) ([B, T, H, Dv])")
    return B, T, H, Dk, v.shape[-1]
