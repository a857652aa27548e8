"""Attractor Patch Network FFN (papers/apn.md): a bank of K low-rank patch experts, a cosine
router against learned prototypes, top-k per token.

    z = the block's normalised input,   u = V^T z   (the shared compact code, rank r)
    s_i = cos(z, p_i) / tau,   keep the top-k,   w = softmax over the kept scores
    y = gamma * sum_{i in topk} w_i U_i (u * sigmoid(a_i u + b_i))   [+ a small dense trunk(z)]

Prototypes are learned by SGD (``prototype_update="sgd"``) or pulled towards the tokens routed to
them (``"ema"``, the "attractor" variant: no gradient, an exponential moving average of the
normalised tokens). During training the layer sets ``aux_loss`` to ``load_balance`` times the
Switch-style load-balance loss; ``metrics()`` reports the router statistics of the last training
batch (the trainer logs them). Setting ``usage`` to a zero [K] tensor makes every forward add its
patch counts to it (how experiments measure patch usage on a domain).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from routemem.errors import ConfigError
from routemem.layers.ffn import DenseFFN
from routemem.layers.options import (
    check_choice,
    check_fraction,
    check_int,
    check_positive,
)
from routemem.layers.registry import LayerSpec, register_ffn
from routemem.ops.apn import (
    MODES,
    load_balance_loss,
    patch_mixture,
    route,
    router_probs,
    routing_stats,
)

PROTOTYPE_UPDATES = ("sgd", "ema", "frozen")  # frozen: a random router, fixed at init


@register_ffn("apn", variants={mode: {"mode": mode} for mode in ("reference", "grouped", "fused", "grouped_mm")})
class AttractorPatchFFN(nn.Module):
    """Options: ``n_patches`` K, ``rank`` r, ``top_k``, ``tau`` (router temperature; ``learn_tau``
    makes it a parameter), ``gamma`` (output scale), ``prototype_update`` (sgd | ema | frozen: the
    unit-norm random prototypes of init stay fixed, a random router) with
    ``ema_decay``, ``load_balance`` (weight of the aux loss; 0 turns it off), ``trunk_hidden``
    (hidden units of an optional dense trunk; 0 = none), ``mode`` (reference | grouped | fused |
    grouped_mm | auto: the compiled kernel on a CPU, else grouped_mm for float32 on a CPU, else
    grouped)."""

    def __init__(self, spec: LayerSpec, n_patches: int = 64, rank: int = 16, top_k: int = 4,
                 tau: float = 0.1, learn_tau: bool = False, gamma: float = 1.0,
                 prototype_update: str = "sgd", ema_decay: float = 0.99, load_balance: float = 0.01,
                 trunk_hidden: int = 0, mode: str = "auto"):
        super().__init__()
        owner = "ffn 'apn'"
        d = spec.d_model
        self.n_patches = check_int(owner, "n_patches", n_patches)
        self.rank = check_int(owner, "rank", rank)
        self.top_k = check_int(owner, "top_k", top_k)
        if self.top_k > self.n_patches:
            raise ConfigError(f"{owner}: top_k={top_k} exceeds n_patches={n_patches}")
        tau = check_positive(owner, "tau", tau)
        self.gamma = float(gamma)
        self.prototype_update = check_choice(owner, "prototype_update", prototype_update, PROTOTYPE_UPDATES)
        self.ema_decay = check_fraction(owner, "ema_decay", ema_decay)
        if isinstance(load_balance, bool) or not isinstance(load_balance, (int, float)) or load_balance < 0:
            raise ConfigError(f"{owner}: load_balance must be a number >= 0, got {load_balance!r}")
        self.load_balance = float(load_balance)
        self.mode = check_choice(owner, "mode", mode, MODES)
        self.init_std = 0.02 / math.sqrt(2 * spec.n_layer)

        K, r = self.n_patches, self.rank
        self.prototypes = nn.Parameter(torch.empty(K, d), requires_grad=self.prototype_update == "sgd")
        self.prototypes._no_weight_decay = True  # cosine routing ignores their norm
        self.code = nn.Parameter(torch.empty(d, r))  # V
        self.up = nn.Parameter(torch.empty(K, d, r))  # U_i: code space -> model width
        self.gate_scale = nn.Parameter(torch.zeros(K, r))  # a_i
        self.gate_bias = nn.Parameter(torch.zeros(K, r))  # b_i
        self.learn_tau = bool(learn_tau)
        if self.learn_tau:
            self.log_tau = nn.Parameter(torch.tensor(math.log(tau)))
        else:
            self.register_buffer("log_tau", torch.tensor(math.log(tau)))  # saved: checkpoints keep their tau
        trunk_hidden = check_int(owner, "trunk_hidden", trunk_hidden, low=0)
        self.trunk = DenseFFN(spec, hidden=trunk_hidden) if trunk_hidden else None
        self.update_prototypes = True  # the ema pull; an adaptation arm that freezes routing turns it off
        self.aux_loss: torch.Tensor | None = None
        self.usage: torch.Tensor | None = None
        self._stats: dict[str, torch.Tensor] = {}
        self._init_weights()

    def _init_weights(self) -> None:
        """Unit-norm random prototypes; V keeps the code at unit scale for a unit-scale input;
        U small (GPT-2's residual scaling); a = b = 0 so every gate starts at sigmoid(0) = 1/2."""
        with torch.no_grad():
            self.prototypes.copy_(F.normalize(torch.randn_like(self.prototypes), dim=-1))
            nn.init.normal_(self.code, std=self.code.shape[0] ** -0.5)
            nn.init.normal_(self.up, std=self.init_std)
            self.gate_scale.zero_()
            self.gate_bias.zero_()

    def residual_weights(self) -> list[nn.Parameter]:
        """What writes into the residual stream (TransformerLM scales or zeroes these at init)."""
        return [self.up] + ([self.trunk.down.weight] if self.trunk is not None else [])

    @property
    def tau(self) -> torch.Tensor:
        return self.log_tau.exp()

    def patch_parameters(self, include_code: bool = False) -> list[nn.Parameter]:
        """The per-patch parameters (U, a, b), plus the shared code V if asked: what the paper's
        continual arm trains."""
        return [self.up, self.gate_scale, self.gate_bias] + ([self.code] if include_code else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.reshape(-1, x.shape[-1])
        # Full precision: bf16 cosines flip near-tied top-k choices, and the op wants one dtype.
        with torch.autocast(device_type=z.device.type, enabled=False):
            routing = route(z, self.prototypes.to(z.dtype), self.top_k, self.tau.to(z.dtype))
            weights = routing.weights
            params = [p.to(z.dtype) for p in (self.code, self.up, self.gate_scale, self.gate_bias)]
            y = patch_mixture(z, routing.indices, weights, *params, mode=self.mode)
        y = self.gamma * y.view_as(x)
        if self.trunk is not None:
            y = y + self.trunk(x)
        self.aux_loss = None
        if self.training:
            probs = router_probs(routing)  # one softmax over all K for the loss and the statistics
            if self.load_balance > 0:
                self.aux_loss = self.load_balance * load_balance_loss(routing, probs)
            self._stats = routing_stats(routing, probs.detach())
            if self.prototype_update == "ema" and self.update_prototypes:
                self._pull_prototypes(z, routing.indices)
        if self.usage is not None:
            self.usage += torch.bincount(routing.indices.flatten(), minlength=self.n_patches).to(self.usage)
        return y

    @torch.no_grad()
    def _pull_prototypes(self, z: torch.Tensor, indices: torch.Tensor) -> None:
        """p_i <- decay * p_i + (1 - decay) * mean of the unit tokens routed to i (used patches only)."""
        unit = F.normalize(z.to(self.prototypes.dtype), dim=-1).repeat_interleave(self.top_k, 0)
        flat = indices.flatten()
        sums = torch.zeros_like(self.prototypes).index_add_(0, flat, unit)
        counts = torch.bincount(flat, minlength=self.n_patches)
        used = counts > 0
        mean = sums[used] / counts[used, None]
        current = F.normalize(self.prototypes[used], dim=-1)
        self.prototypes[used] = self.ema_decay * current + (1 - self.ema_decay) * mean

    def metrics(self) -> dict[str, float]:
        out = {name: float(value) for name, value in self._stats.items()}
        out["tau"] = float(self.tau.detach())
        return out

    def active_params_per_token(self) -> int:
        """Parameters one token touches: the routing (all K prototypes), V, and its top-k patches."""
        K, d = self.prototypes.shape
        per_patch = d * self.rank + 2 * self.rank
        trunk = sum(p.numel() for p in self.trunk.parameters()) if self.trunk is not None else 0
        return K * d + self.code.numel() + self.top_k * per_patch + trunk

    def extra_flops_per_token(self, seq_len: int | None = None) -> float:
        """Matmul FLOPs outside nn.Linear: cosine scores (K d), the code (d r), top-k patches."""
        K, d = self.prototypes.shape
        return 2.0 * (K * d + d * self.rank + self.top_k * (d * self.rank + 2 * self.rank))
