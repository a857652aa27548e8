"""Parts shared by the recurrent mixers (palimpsa, gla, mamba2, meta_mamba2, gated_deltanet).

- ``ShortConv``: the depthwise causal convolution every one of them puts before q/k/v.
- ``GatedRMSNorm``: the per-head output norm with a SiLU gate (in either of the two orders in use).
- ``init_dt_bias`` / ``init_A_log``: the decay-rate initialisation of Mamba2 and its descendants.
- ``RecurrentMixer``: forward / step around one ``_run`` method, so the parallel and the
  token-by-token paths share every line except the convolution and the op call.
- The precision guard: the trainer runs bf16 autocast, but a recurrence multiplies and adds
  over the whole sequence, so ops run with autocast off on inputs of at least float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from routemem.errors import ConfigError
from routemem.layers.options import check_int
from routemem.layers.registry import LayerSpec


# --- precision guard -------------------------------------------------------------------------


def op_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the recurrence runs in: float32 for bf16/fp16/fp32 inputs, float64 stays float64
    (so double-precision tests keep their precision)."""
    return torch.promote_types(dtype, torch.float32)


def full_precision(x: torch.Tensor):
    """Autocast off for the block that prepares the op inputs, runs the op and normalises."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def l2norm(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, p=2.0, dim=-1, eps=1e-6)


def inverse_softplus(y: torch.Tensor | float) -> torch.Tensor:
    """x with softplus(x) = y (y > 0): y + log(1 - exp(-y)), stable for small y."""
    y = torch.as_tensor(y, dtype=torch.float64)
    return y + torch.log(-torch.expm1(-y))


def head_dim(owner: str, spec: LayerSpec) -> int:
    if spec.d_model % spec.n_head:
        raise ConfigError(f"{owner}: d_model={spec.d_model} is not divisible by n_head={spec.n_head}")
    return spec.d_model // spec.n_head


# --- initialisers ----------------------------------------------------------------------------


@torch.no_grad()
def init_dt_bias(param: torch.Tensor, dt_min: float = 1e-3, dt_max: float = 0.1) -> torch.Tensor:
    """dt log-uniform in [dt_min, dt_max], stored as its inverse softplus: softplus(param) = dt.
    Slow and fast heads from the start: decay per step exp(-dt * A) spans a wide range."""
    if not 0 < dt_min <= dt_max:
        raise ConfigError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
    u = torch.rand(param.shape, dtype=torch.float64, device=param.device)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    return param.copy_(inverse_softplus(dt).to(param.dtype))


@torch.no_grad()
def init_A_log(param: torch.Tensor, low: float = 1.0, high: float = 16.0) -> torch.Tensor:
    """A ~ U(low, high), stored as log A (A = exp(A_log) stays positive whatever training does).
    low = 0 is allowed (Palimpsa's official range): a draw of exactly 0 becomes the smallest float."""
    if not 0 <= low <= high or high <= 0:
        raise ConfigError(f"need 0 <= low <= high and high > 0 for A, got low={low}, high={high}")
    A = torch.empty(param.shape, dtype=torch.float64, device=param.device).uniform_(low, high)
    return param.copy_(A.clamp_min(torch.finfo(param.dtype).tiny).log().to(param.dtype))


# --- modules ---------------------------------------------------------------------------------


class ShortConv(nn.Module):
    """Depthwise causal convolution over time: [B, T, C] -> [B, T, C], output t sees inputs
    t-width+1 .. t (left zero padding). No activation inside: callers apply SiLU."""

    def __init__(self, channels: int, width: int = 4, bias: bool = False):
        super().__init__()
        self.channels = check_int("ShortConv", "channels", channels)
        self.width = check_int("ShortConv", "conv_width", width)
        self.weight = nn.Parameter(torch.empty(channels, 1, width))  # nn.Conv1d's depthwise layout
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.width)  # as nn.Conv1d: fan_in = width
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x.transpose(1, 2), (self.width - 1, 0))
        return F.conv1d(padded, self.weight, self.bias, groups=self.channels).transpose(1, 2)

    def init_buffer(self, batch_size: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """The last width-1 inputs, oldest first: zeros, as the parallel form's padding."""
        return torch.zeros(batch_size, self.width - 1, self.channels, device=device, dtype=dtype)

    def step(self, x_t: torch.Tensor, buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t [B, C], buffer [B, width-1, C] -> (y_t [B, C], new buffer)."""
        window = torch.cat([buffer.to(x_t.dtype), x_t[:, None]], dim=1)  # [B, width, C]
        y = torch.einsum("bwc,cw->bc", window, self.weight[:, 0])  # conv1d is a cross-correlation
        if self.bias is not None:
            y = y + self.bias
        return y, window[:, 1:]

    def state_size(self) -> int:
        return (self.width - 1) * self.channels


class GatedRMSNorm(nn.Module):
    """RMSNorm over the last dim (one head's channels; the weight is shared by the heads) with a
    SiLU gate. ``norm_before_gate=True``: rmsnorm(y) * silu(gate) (GLA, Gated DeltaNet, Palimpsa);
    ``False``: rmsnorm(y * silu(gate)) (Mamba2: gate first, so the gate cannot be undone by the
    norm's rescaling). Computed in at least float32, returned in y's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, norm_before_gate: bool = True):
        super().__init__()
        self.eps, self.norm_before_gate = eps, norm_before_gate
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = op_dtype(y.dtype)
        h, g = y.to(dtype), F.silu(gate.to(dtype))
        if not self.norm_before_gate:
            h = h * g
        h = F.rms_norm(h, (h.shape[-1],), self.weight.to(dtype), self.eps)
        if self.norm_before_gate:
            h = h * g
        return h.to(y.dtype)


class RecurrentMixer(nn.Module):
    """forward and step around ``_run(x [B, T, D], state | None, mode) -> (y, new state | None)``.

    Subclasses set ``mode``, ``chunk_size``, ``conv``, ``n_head``, ``state_dims`` (the per-head
    state's (rows, cols)), ``metaplastic`` (state is (mu, importance) rather than one matrix S;
    then also ``i_prior``) and ``flops_per_cell``, and implement ``_run``, which calls its op
    through ``_recurrence``. ``step`` runs ``_run`` on one token with the state (reference mode)."""

    metaplastic = False

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Mamba2's decay init (``A_log`` from the mixer's ``a_init_range``, default U(1, 16);
        ``dt_bias``); the ``D`` skip at 1 and ``b_scale`` at the mixer's ``b_scale_init`` (default:
        softplus(b_scale) = 1) for the mixers that have them."""
        init_A_log(self.A_log, *getattr(self, "a_init_range", (1.0, 16.0)))
        init_dt_bias(self.dt_bias)
        if getattr(self, "D", None) is not None:
            self.D.fill_(1.0)
        if getattr(self, "b_scale", None) is not None:
            self.b_scale.fill_(getattr(self, "b_scale_init", float(inverse_softplus(1.0))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, None, self.mode)[0]

    def step(self, x_t: torch.Tensor, state: dict | None) -> tuple[torch.Tensor, dict]:
        if state is None:
            state = self.init_state(x_t.shape[0], x_t.device, op_dtype(x_t.dtype))
        y, state = self._run(x_t[:, None], state, "reference")
        return y[:, 0], state

    def _short_conv(self, u: torch.Tensor, state: dict | None):
        """The parallel convolution, or one step from the buffer in ``state``; then SiLU."""
        if state is None:
            return F.silu(self.conv(u)), None
        y, buffer = self.conv.step(u[:, 0], state["conv"])
        return F.silu(y[:, None]), buffer

    def _op_kwargs(self, state: dict | None, mode: str) -> dict:
        if state is None:
            return {"mode": mode, "chunk_size": self.chunk_size}
        return {"mode": mode, "chunk_size": self.chunk_size, "output_final_state": True}

    def _recurrence(self, op, *args, state: dict | None, mode: str, dtype: torch.dtype, **kwargs):
        """``op(*args, **kwargs)`` started from ``state``'s matrices; returns (o, the new
        recurrent part of the state, or None when there is no state)."""
        kwargs.update(self._op_kwargs(state, mode))
        if state is None:
            return op(*args, **kwargs), None
        if self.metaplastic:
            kwargs["initial_state"] = (state["mu"].to(dtype), state["importance"].to(dtype))
        else:
            kwargs["initial_state"] = state["S"].to(dtype)
        o, final = op(*args, **kwargs)
        return o, ({"mu": final[0], "importance": final[1]} if self.metaplastic else {"S": final})

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> dict:
        shape = (batch_size, self.n_head, *self.state_dims)
        state = {"conv": self.conv.init_buffer(batch_size, device, dtype)}
        if self.metaplastic:
            state["mu"] = torch.zeros(shape, device=device, dtype=dtype)
            state["importance"] = torch.full(shape, self.i_prior, device=device, dtype=dtype)
        else:
            state["S"] = torch.zeros(shape, device=device, dtype=dtype)
        return state

    def state_size(self, seq_len: int | None = None) -> int:
        """Floats per sequence: conv buffer + the [H, rows, cols] state (mu and importance: two)."""
        matrices = 2 if self.metaplastic else 1
        return self.conv.state_size() + matrices * self.n_head * math.prod(self.state_dims)

    def extra_flops_per_token(self, seq_len: int) -> float:
        """The conv, then ``flops_per_cell`` per state cell (decay, write, readout; more for the
        importance update and division, or the delta rule's recall)."""
        return (2.0 * self.conv.width * self.conv_channels
                + self.flops_per_cell * self.n_head * math.prod(self.state_dims))
