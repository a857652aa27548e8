"""TransformerLM: a pre-norm decoder assembled from registered mixers and FFNs.

Nothing here knows any particular mechanism: ``config.mixer`` and ``config.ffn`` are looked up in
``routemem.layers``' registries. Two optional hooks let layers talk to the model without it
knowing them: a layer that sets ``self.aux_loss`` (a scalar tensor) in its forward has it added to
the training loss, and a layer with a ``metrics()`` method has its statistics logged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from routemem.layers import LayerSpec, build_ffn, build_mixer, make_norm
from routemem.models.config import LMConfig


def residual_weights(branch: nn.Module) -> list[torch.Tensor]:
    """The weights that write a branch's output into the residual stream: the branch's own
    ``residual_weights()`` if it has one (a layer whose output is not an nn.Linear), else its
    last nn.Linear's weight."""
    if callable(getattr(branch, "residual_weights", None)):
        return list(branch.residual_weights())
    linears = [m for m in branch.modules() if isinstance(m, nn.Linear)]
    return [linears[-1].weight] if linears else []


@torch.no_grad()
def init_linears(root: nn.Module, std: float) -> None:
    """N(0, std) for every linear and embedding weight under ``root``, zero biases."""
    for module in root.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


def init_layers(root: nn.Module, include_root: bool = False) -> None:
    """Each layer's own ``_init_weights()`` (a mechanism's decay rates, gates, prototypes)."""
    for module in root.modules():
        if (include_root or module is not root) and hasattr(module, "_init_weights"):
            module._init_weights()


@torch.no_grad()
def scale_residual(branch: nn.Module, std: float, n_layer: int, zero: bool = False) -> None:
    """The weights that write into the residual stream: N(0, std / sqrt(2 n_layer)), or zero."""
    for weight in residual_weights(branch):
        if zero:
            weight.zero_()
        else:
            weight.normal_(mean=0.0, std=std / math.sqrt(2 * n_layer))


def init_branch(branch: nn.Module, std: float, n_layer: int) -> nn.Module:
    """routemem's initialisation of one residual branch (a mixer or an FFN) placed in another model."""
    init_linears(branch, std)
    init_layers(branch, include_root=True)
    scale_residual(branch, std, n_layer)
    return branch


class Block(nn.Module):
    """x + mixer(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, config: LMConfig, layer_idx: int):
        super().__init__()
        spec = LayerSpec(
            d_model=config.d_model, n_head=config.n_head, max_seq_len=config.max_seq_len,
            dropout=config.dropout, pos=config.pos, layer_idx=layer_idx, n_layer=config.n_layer,
        )
        self.mixer_norm = make_norm(config.norm, config.d_model)
        self.mixer = build_mixer(config.mixer, spec, config.mixer_kwargs)
        self.ffn = build_ffn(config.ffn, spec, config.ffn_kwargs)
        self.has_ffn = not getattr(self.ffn, "is_identity", False)
        self.ffn_norm = make_norm(config.norm, config.d_model) if self.has_ffn else None
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.resid_dropout(self.mixer(self.mixer_norm(x)))
        if self.has_ffn:
            x = x + self.ffn(self.ffn_norm(x))
        return x

    def step(self, x_t: torch.Tensor, state):
        """One token: x_t [B, D] -> (y_t [B, D], new mixer state)."""
        h, state = self.mixer.step(self.mixer_norm(x_t), state)
        x_t = x_t + h
        if self.has_ffn:
            x_t = x_t + self.ffn(self.ffn_norm(x_t)[:, None])[:, 0]
        return x_t, state


def _sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of ``probs`` [B, V], drawn with ``generator`` on the generator's device
    (torch.multinomial refuses a generator of another device), returned on ``probs``' device."""
    if generator is None or generator.device == probs.device:
        return torch.multinomial(probs, 1, generator=generator)
    return torch.multinomial(probs.to(generator.device), 1, generator=generator).to(probs.device)


class TransformerLM(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model) if config.pos == "learned" else None
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.final_norm = make_norm(config.norm, config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    # -- initialisation -------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """GPT-2 style, the three steps of ``init_branch`` applied to the whole model (each step over
        every module before the next, so the random draws keep their order)."""
        init_linears(self, self.config.init_std)
        init_layers(self)
        for block in self.blocks:
            for branch in (block.mixer, block.ffn):
                scale_residual(branch, self.config.init_std, self.config.n_layer, self.config.zero_init_residual)

    # -- forward --------------------------------------------------------------------------------
    def _embed(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            positions = torch.arange(start, start + idx.shape[1], device=idx.device)
            x = x + self.pos_emb(positions)
        return self.emb_dropout(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx [B, T] long -> logits [B, T, V]; with ``targets`` -> (logits, loss).

        The loss is the mean cross-entropy over targets != -100, plus any layer's ``aux_loss``."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be [batch, seq_len], got shape {tuple(idx.shape)}")
        T = idx.shape[1]
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.config.max_seq_len}")
        x = self._embed(idx)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.final_norm(x))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        aux = self.aux_loss()
        return logits, (loss + aux if aux is not None else loss)

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the auxiliary losses the layers set in the last forward (None if none did)."""
        losses = [m.aux_loss for m in self.modules() if m is not self and getattr(m, "aux_loss", None) is not None
                  and isinstance(m.aux_loss, torch.Tensor)]
        return torch.stack(losses).sum() if losses else None

    def layer_metrics(self) -> dict[str, float]:
        """Statistics from layers with a ``metrics()`` method, keyed ``blocks.<i>.<part>.<name>``."""
        out: dict[str, float] = {}
        for name, module in self.named_modules():
            if module is not self and callable(getattr(module, "metrics", None)):
                for key, value in module.metrics().items():
                    out[f"{name}.{key}"] = float(value)
        return out

    # -- decoding -------------------------------------------------------------------------------
    def init_cache(self) -> dict:
        return {"pos": 0, "layers": [None] * len(self.blocks)}

    @torch.no_grad()
    def step(self, token: torch.Tensor, cache: dict | None = None):
        """One token per sequence: token [B] long -> (logits [B, V], cache)."""
        cache = cache if cache is not None else self.init_cache()
        if cache["pos"] >= self.config.max_seq_len:
            raise ValueError(f"decoding position {cache['pos']} exceeds max_seq_len={self.config.max_seq_len}")
        x = self._embed(token[:, None], start=cache["pos"])[:, 0]
        states = []
        for block, state in zip(self.blocks, cache["layers"]):
            x, state = block.step(x, state)
            states.append(state)
        logits = self.lm_head(self.final_norm(x))
        return logits, {"pos": cache["pos"] + 1, "layers": states}

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample ``max_new_tokens`` after prompt ``idx`` [B, T0]; returns [B, T0 + max_new_tokens].

        Decodes with each mixer's ``step``. When the context fills ``max_seq_len``, the cache is
        rebuilt from the last half-window of tokens, so generation can run past the window.
        ``generator`` may live on another device than the model (a seeded CPU generator for a
        model on a GPU): sampling then happens on the generator's device."""
        if idx.shape[1] < 1:
            raise ValueError("generate needs a prompt of at least one token")
        if idx.shape[1] > self.config.max_seq_len:
            raise ValueError(f"prompt of {idx.shape[1]} tokens exceeds max_seq_len={self.config.max_seq_len}")
        out = idx

        def prefill(tokens: torch.Tensor):
            cache = None
            for t in range(tokens.shape[1]):
                logits, cache = self.step(tokens[:, t], cache)
            return logits, cache

        logits, cache = prefill(idx)
        for _ in range(max_new_tokens):
            logits = logits.float() / max(temperature, 1e-6)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            nxt = _sample(probs, generator)
            out = torch.cat([out, nxt], dim=1)
            if cache["pos"] >= self.config.max_seq_len:
                logits, cache = prefill(out[:, -max(1, self.config.max_seq_len // 2):])
            else:
                logits, cache = self.step(nxt[:, 0], cache)
        return out

    # -- accounting -----------------------------------------------------------------------------
    def embedding_parameters(self) -> list[nn.Parameter]:
        params = [self.tok_emb.weight]
        if self.pos_emb is not None:
            params.append(self.pos_emb.weight)
        if not self.config.tie_embeddings:
            params.append(self.lm_head.weight)  # the output embedding
        return params

    def num_params(self, include_embeddings: bool = True) -> int:
        """Distinct parameters; without embeddings excludes token/position (and untied output)
        embeddings, as is usual when comparing model sizes."""
        total = sum(p.numel() for p in self.parameters())
        if not include_embeddings:
            total -= sum(p.numel() for p in self.embedding_parameters())
        return total

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Rough FLOPs per token: 2 per weight multiply-add of every matmul (blocks and the output
        head), plus layer-specific extras (``extra_flops_per_token(seq_len)``, e.g. attention
        scores); training counts forward + backward as 3x forward."""
        seq_len = seq_len or self.config.max_seq_len
        matmul = sum(m.weight.numel() for m in self.blocks.modules() if isinstance(m, nn.Linear))
        forward = 2.0 * (matmul + self.lm_head.weight.numel())
        for module in self.blocks.modules():
            if callable(getattr(module, "extra_flops_per_token", None)):
                forward += module.extra_flops_per_token(seq_len)
        return 3.0 * forward if training else forward
