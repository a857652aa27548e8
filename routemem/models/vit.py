"""VisionTransformer: a small ViT built from the registered ``attention`` mixer and ``dense`` FFN,
with hooks to insert prompts at chosen blocks and to read a block's tokens.

Architecture (the usual ViT, so that checkpoints in the common key layout load: see vit_weights.py):
patch embedding (a Conv2d with kernel = stride = patch size), a CLS token, learned positions for
CLS + patches, pre-norm blocks ``x + attn(norm1(x))``, ``x + mlp(norm2(x))`` with bidirectional
attention (``attention`` with ``causal=False, bias=True``) and the ``dense`` FFN (Linear -> exact
GELU -> Linear, ``bias=True``), LayerNorms with eps 1e-6, a final LayerNorm and a linear head on
the CLS token.

Prompts. ``prompts`` (in ``forward``, ``features``, ``tokens_at``) is either a mapping
``{layer_idx: Prompt}`` or a callable ``prompt_fn(layer_idx, tokens) -> Prompt | None`` called
before each block with that block's input tokens [B, T, D] (CLS first, then any kept prompt
tokens, then the patches): a method that builds its prompts from the tokens at each layer (RwF)
is such a callable. A ``Prompt`` is a tuple, one of:

- ``("prompt", P)``, P [B, Lp, D] or [Lp, D]: prompt-tuning. P is inserted right after CLS before
  block ``layer_idx`` and removed after it, so every block's output has 1 + n_patches tokens.
- ``("input", P)``: like "prompt" but the tokens are kept through all later blocks (L2P's prompts,
  prepended at the input and read by its head: ``pool="prompt"``).
- ``("prefix", (pk, pv))``, each [B, Lp, D] or [Lp, D]: prefix-tuning. Extra keys and values for
  that block's attention only, used as they are (not projected by W_k / W_v; see
  routemem/layers/attention.py). The sequence length does not change.

No position embedding is added to prompt tokens; after the input embedding the blocks are
equivariant to token order, so "right after CLS" is the same as the official L2P code's "before CLS".
A prompt of length 0 is skipped: the output is then exactly the unprompted one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from routemem.errors import ConfigError
from routemem.layers import LayerSpec, build_ffn, build_mixer

Prompt = tuple  # ("prompt" | "input", P) or ("prefix", (pk, pv)): see the module docstring
PromptFn = Callable[[int, torch.Tensor], Prompt | None]
Prompts = Mapping[int, Prompt] | PromptFn | None
PROMPT_KINDS = ("prompt", "input", "prefix")
POOLS = ("cls", "prompt")


@dataclass
class ViTConfig:
    """Everything that defines a VisionTransformer. The defaults are a small ViT for 32x32
    grayscale images (64 patches of 4x4) with ViT-Tiny's width (192, 3 heads of 64)."""

    image_size: int = 32
    patch_size: int = 4
    in_chans: int = 1
    d_model: int = 192
    n_layer: int = 6
    n_head: int = 3
    mlp_hidden: int = 768  # the dense FFN's hidden units (4 * d_model in the usual ViTs)
    n_classes: int = 10
    dropout: float = 0.0
    norm_eps: float = 1e-6
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("image_size", "patch_size", "in_chans", "d_model", "n_layer", "n_head", "mlp_hidden", "n_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"ViT config: {name} must be an int >= 1, got {value!r}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"ViT config: image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.d_model % self.n_head:
            raise ConfigError(f"ViT config: d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"ViT config: dropout must be in [0, 1), got {self.dropout}")
        if not self.norm_eps > 0:
            raise ConfigError(f"ViT config: norm_eps must be > 0, got {self.norm_eps}")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class PatchEmbed(nn.Module):
    """[B, C, H, W] -> [B, n_patches, D]: one linear map per non-overlapping patch (row-major order)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(config.in_chans, config.d_model, kernel_size=p, stride=p)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class ViTBlock(nn.Module):
    """x + attn(norm1(x), prefix), then x + mlp(norm2(x))."""

    def __init__(self, config: ViTConfig, layer_idx: int):
        super().__init__()
        spec = LayerSpec(d_model=config.d_model, n_head=config.n_head, max_seq_len=1 + config.n_patches,
                         dropout=config.dropout, pos="none", layer_idx=layer_idx, n_layer=config.n_layer)
        self.norm1 = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.attn = build_mixer("attention", spec, {"causal": False, "bias": True})
        self.norm2 = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.mlp = build_ffn("dense", spec, {"hidden": config.mlp_hidden, "bias": True})
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, prefix=None) -> torch.Tensor:
        x = x + self.resid_dropout(self.attn(self.norm1(x), prefix=prefix))
        return x + self.mlp(self.norm2(x))


def _batched(p: torch.Tensor, batch: int, d_model: int, what: str) -> torch.Tensor:
    """[Lp, D] -> [B, Lp, D]; [B, Lp, D] is checked and passed through."""
    if p.dim() == 2:
        p = p.expand(batch, *p.shape)
    if p.dim() != 3 or p.shape[0] != batch or p.shape[2] != d_model:
        raise ValueError(f"{what} must be [batch={batch}, length, {d_model}] or [length, {d_model}], "
                         f"got shape {tuple(p.shape)}")
    return p


def _as_prompt_fn(prompts: Prompts, n_layer: int) -> PromptFn | None:
    # The mapping is tested first: dynamo cannot trace callable() on a dict.
    if isinstance(prompts, Mapping):
        bad = [k for k in prompts if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < n_layer]
        if bad:
            raise ValueError(f"prompt layers must be ints in 0..{n_layer - 1}, got {bad}")
        return lambda layer, tokens: prompts.get(layer)
    if prompts is None or callable(prompts):
        return prompts
    raise TypeError(f"prompts must be a mapping layer -> prompt, a callable or None, got {type(prompts).__name__}")


class VisionTransformer(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        D = config.d_model
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.n_patches, D))
        self.pos_drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(ViTBlock(config, i) for i in range(config.n_layer))
        self.norm = nn.LayerNorm(D, eps=config.norm_eps)
        self.head = nn.Linear(D, config.n_classes)
        self.reset_parameters()

    # -- initialisation -------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """N(0, init_std) for weights, positions and CLS; zero biases; LayerNorms at (1, 0)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.pos_embed, std=std)
        nn.init.normal_(self.cls_token, std=std)

    def reset_head(self, n_classes: int | None = None) -> None:
        """A fresh head (N(0, init_std), zero bias) for ``n_classes`` (default: the current count);
        ``config.n_classes`` follows."""
        n_classes = self.config.n_classes if n_classes is None else n_classes
        if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 1:
            raise ConfigError(f"n_classes must be an int >= 1, got {n_classes!r}")
        ref = self.head.weight
        self.head = nn.Linear(self.config.d_model, n_classes, device=ref.device, dtype=ref.dtype)
        nn.init.normal_(self.head.weight, std=self.config.init_std)
        nn.init.zeros_(self.head.bias)
        self.config.n_classes = n_classes

    # -- forward --------------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> the first block's input [B, 1 + n_patches, D] (CLS, patches, positions)."""
        c = self.config
        if images.dim() != 4 or tuple(images.shape[1:]) != (c.in_chans, c.image_size, c.image_size):
            raise ValueError(f"images must be [batch, {c.in_chans}, {c.image_size}, {c.image_size}], "
                             f"got shape {tuple(images.shape)}")
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def _run(self, images: torch.Tensor, prompts: Prompts, stop: int | None = None):
        """Blocks 0 .. stop-1 (all by default) -> (tokens [B, 1 + kept + n_patches, D], kept)."""
        prompt_fn = _as_prompt_fn(prompts, self.config.n_layer)
        x = self.embed(images)
        kept = 0  # "input" prompt tokens carried along after CLS
        B, D = x.shape[0], self.config.d_model
        for i, block in enumerate(self.blocks[:stop]):
            prompt = prompt_fn(i, x) if prompt_fn is not None else None
            kind, value = prompt if prompt is not None else (None, None)
            if kind is not None and kind not in PROMPT_KINDS:
                raise ValueError(f"prompt at layer {i}: kind must be one of {PROMPT_KINDS}, got {kind!r}")
            if kind == "prefix":
                pk, pv = (_batched(p, B, D, f"prefix at layer {i}") for p in value)
                x = block(x, prefix=(pk, pv) if pk.shape[1] else None)
                continue
            n_new = 0
            if kind is not None:
                p = _batched(value, B, D, f"prompt at layer {i}").to(x.dtype)
                n_new = p.shape[1]
                if n_new:
                    x = torch.cat([x[:, :1], p, x[:, 1:]], dim=1)
            x = block(x)
            if kind == "prompt" and n_new:  # prompt-tuning: the tokens leave after their block
                x = torch.cat([x[:, :1], x[:, 1 + n_new:]], dim=1)
            elif kind == "input":
                kept += n_new
        return x, kept

    def features(self, images: torch.Tensor, prompts: Prompts = None, pool: str = "cls") -> torch.Tensor:
        """The normed final feature [B, D] the head reads: the CLS token (``pool="cls"``, also the
        query of L2P / DualPrompt / CODA-Prompt when run on the frozen backbone without prompts) or
        the mean of the kept ``"input"`` prompt tokens (``pool="prompt"``, L2P's head)."""
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        x, kept = self._run(images, prompts)
        x = self.norm(x)
        if pool == "cls":
            return x[:, 0]
        if not kept:
            raise ValueError('pool="prompt" needs "input" prompt tokens (none were given)')
        return x[:, 1:1 + kept].mean(dim=1)

    def forward(self, images: torch.Tensor, prompts: Prompts = None, pool: str = "cls") -> torch.Tensor:
        """images [B, C, H, W] -> logits [B, n_classes]."""
        return self.head(self.features(images, prompts, pool))

    def tokens_at(self, images: torch.Tensor, layer: int, prompts: Prompts = None) -> torch.Tensor:
        """The input tokens of block ``layer`` [B, T, D] (``layer == n_layer``: the last block's
        output, before the final norm), computed with ``prompts`` on the blocks before it."""
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= self.config.n_layer:
            raise ValueError(f"layer must be an int in 0..{self.config.n_layer}, got {layer!r}")
        return self._run(images, prompts, stop=layer)[0]

    # -- accounting -----------------------------------------------------------------------------
    def backbone_parameters(self) -> list[nn.Parameter]:
        """Everything but the head (what a frozen-backbone method freezes)."""
        head = {id(p) for p in self.head.parameters()}
        return [p for p in self.parameters() if id(p) not in head]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
