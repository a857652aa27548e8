"""RwF's prompt generator: prompts retrieved from each prompted block's own tokens by one
modern-Hopfield step, for a frozen VisionTransformer's prompt hook.

At a prompted block l with input tokens X [B, T, D] (all of them, CLS included), per head h:

    K = LN_stored(X) W_K,  V = LN_stored(X) W_V,  q = LN_state(Q_l) W_Q
    A = softmax(beta_h q K^T)                  [B, H, L_p, T]  (routemem.ops.hopfield_retrieve)
    P_l = concat_h(A V) W_O                    [B, L_p, D]

Q_l [L_p, D] are learned state patterns; A is the closed-form minimiser of the free energy
F(p) = -sum_j p_j <q, k_j> + (1/beta) sum_j p_j log p_j, so the routing is one forward pass.
``steps > 1`` first moves q by the classical update q <- softmax(beta q K^T) K (an ablation).
The prompts change with the image (they are read from its tokens): "dynamic" prompts.

Insertion (the ViT's hook kinds, routemem/models/vit.py):
- ``"prompt"`` (default, the third-party reading): ``("prompt", P_l)``, inserted after CLS before
  block l and removed after it.
- ``"prefix"``: ``("prefix", (P_l[:, :L_p/2], P_l[:, L_p/2:]))``: the first half of the prompts
  are extra attention keys, the second half their values (the key/value split of DualPrompt and
  CODA-Prompt); ``length`` must then be even.

Use: ``hook, aux = generator()`` then ``vit(images, prompts=hook)``; ``aux`` is a zero (RwF has no
auxiliary loss). The head reads CLS (``pool = "cls"``).

Defaults (the third-party reading on ViT-B/16, 12 blocks: 3 blocks from layer 0, length 10, 1 head,
one step), scaled as routemem.layers.prompts scales the other prompt methods: blocks by
``scale_layers(0, 3, n_layer)`` (0-1 on 6 blocks, 0 on 3-4); length 10 kept (L2P's and
CODA-Prompt's lengths are kept too; 10 prompts beside 64 patches); head dim D / heads; beta
1/sqrt(head dim) for every head (hopfield-layers' scaling; ``beta`` may be one number or one per
head; fixed, not learned); layer norms on the state and stored patterns (``norms=True``,
hopfield-layers' default). Size: about 4 D (H Dh) + L_p D per prompted block, 4 D^2 with one head
of width D (151k parameters per block on D = 192; L2P's whole pool is 11.5k): ``head_dim`` shrinks it.

Initialisation (the paper states none): state patterns N(0, 0.02) (hopfield-layers' pooling
weights), projections xavier-uniform with zero biases (torch's and hopfield-layers' attention
in-projections), layer norms at (1, 0). Not a zero-effect init: no such init exists for either
insertion (a zero prompt token or a zero prefix key still takes attention mass), and the paper
implies none.

``train`` picks what learns, for the ablations: ``"all"`` (default), ``"queries"`` (the state
patterns Q_l only), ``"output"`` (W_O and its bias only); the rest is frozen (requires_grad off).
``layers=()`` prompts nothing: the ViT's output is then exactly the unprompted one (0 prompted
blocks = a linear probe). ``retrieval=False`` is the no-retrieval ablation: each prompted block gets
a learned static prompt of the same size ([L_p, D], U(-1, 1) as L2P's and DualPrompt's prompt
tables), the same for every image, inserted the same way (``train`` must then be "all").

Diagnostics: each call records, detached, the last retrieval weights and prompts per block
(``last_weights``, ``last_prompts``); ``retrieval_stats()`` summarises the weights' entropy.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from routemem.errors import ConfigError
from routemem.layers.options import check_choice, check_int, check_positive
from routemem.layers.prompts import scale_layers
from routemem.ops.hopfield import default_beta, hopfield_retrieve

INSERTIONS = ("prompt", "prefix")
TRAINS = ("all", "queries", "output")


class HopfieldRetrieval(nn.Module):
    """One prompted block's generator: tokens [B, T, D] -> (prompts [B, L_p, D], weights [B, H, L_p, T])."""

    def __init__(self, d_model: int, length: int, heads: int, head_dim: int, beta, steps: int, norms: bool):
        super().__init__()
        self.heads, self.head_dim, self.steps = heads, head_dim, steps
        inner = heads * head_dim
        self.state_patterns = nn.Parameter(torch.empty(length, d_model))
        self.norm_state = nn.LayerNorm(d_model) if norms else nn.Identity()
        self.norm_stored = nn.LayerNorm(d_model) if norms else nn.Identity()
        self.q_proj = nn.Linear(d_model, inner)
        self.k_proj = nn.Linear(d_model, inner)
        self.v_proj = nn.Linear(d_model, inner)
        self.out_proj = nn.Linear(inner, d_model)
        betas = beta if isinstance(beta, tuple) else (beta,) * heads
        # per head, fixed; float64 so that a float64 module holds it exactly (forward casts to the tokens' dtype)
        self.register_buffer("beta", torch.tensor(betas, dtype=torch.float64).view(heads, 1, 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.state_patterns, std=0.02)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[.., L, H * Dh] -> [.., H, L, Dh]."""
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(-3, -2)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stored = self.norm_stored(tokens)
        keys, values = self._heads(self.k_proj(stored)), self._heads(self.v_proj(stored))  # [B, H, T, Dh]
        queries = self._heads(self.q_proj(self.norm_state(self.state_patterns)))  # [H, L_p, Dh], shared by the batch
        out, weights = hopfield_retrieve(queries, keys, values, self.beta.to(keys.dtype), steps=self.steps,
                                         return_weights=True)  # [B, H, L_p, Dh], [B, H, L_p, T]
        return self.out_proj(out.transpose(-3, -2).flatten(-2)), weights


class StaticPrompt(nn.Module):
    """The no-retrieval ablation: a learned prompt [L_p, D], the same for every image."""

    def __init__(self, d_model: int, length: int):
        super().__init__()
        self.prompt = nn.Parameter(torch.empty(length, d_model).uniform_(-1.0, 1.0))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.prompt.expand(tokens.shape[0], *self.prompt.shape), None


class HopfieldPromptGenerator(nn.Module):
    """Learned state patterns per prompted block retrieve that block's prompts from its tokens
    (module docstring). ``forward()`` -> (the ViT hook, a zero aux loss)."""

    pool = "cls"

    def __init__(self, d_model: int, n_layer: int, *, layers=None, length: int = 10, heads: int = 1,
                 head_dim: int | None = None, beta=None, steps: int = 1,
                 insertion: str = "prompt", norms: bool = True, train: str = "all", retrieval: bool = True):
        super().__init__()
        owner = "HopfieldPromptGenerator"
        check_int(owner, "d_model", d_model)
        check_int(owner, "n_layer", n_layer)
        check_int(owner, "length", length)
        check_int(owner, "heads", heads)
        check_int(owner, "steps", steps)
        self.insertion = check_choice(owner, "insertion", insertion, INSERTIONS)
        self.train_what = check_choice(owner, "train", train, TRAINS)
        for name, value in (("norms", norms), ("retrieval", retrieval)):
            if not isinstance(value, bool):
                raise ConfigError(f"{owner}: {name} must be true or false, got {value!r}")
        if not retrieval and train != "all":
            raise ConfigError(f"{owner}: train={train!r} names parts of the retrieval; a static prompt "
                              "(retrieval=false) trains as a whole: use train='all'")
        if head_dim is None:
            if d_model % heads:
                raise ConfigError(f"{owner}: d_model={d_model} is not divisible by heads={heads} (or give head_dim)")
            head_dim = d_model // heads
        check_int(owner, "head_dim", head_dim)
        if beta is None:
            beta = default_beta(head_dim)
        if isinstance(beta, (list, tuple)):  # one per head
            if len(beta) != heads:
                raise ConfigError(f"{owner}: beta must be one number or one per head ({heads}), got {len(beta)}")
            beta = tuple(check_positive(owner, "beta", b) for b in beta)
        else:
            beta = check_positive(owner, "beta", beta)
        if insertion == "prefix" and length % 2:
            raise ConfigError(f"{owner}: prefix insertion splits the prompts into key and value halves: "
                              f"length must be even, got {length}")
        layers = scale_layers(0, 3, n_layer) if layers is None else tuple(layers)
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layer for i in layers) \
                or len(set(layers)) != len(layers):
            raise ConfigError(f"{owner}: layers must be distinct ints in 0..{n_layer - 1}, got {layers}")
        self.layers, self.length, self.heads, self.head_dim = tuple(sorted(layers)), length, heads, head_dim
        self.beta, self.steps, self.retrieval, self.d_model = beta, steps, retrieval, d_model
        self.blocks = nn.ModuleDict({str(i): HopfieldRetrieval(d_model, length, heads, head_dim, beta, steps, norms)
                                     if retrieval else StaticPrompt(d_model, length) for i in self.layers})
        self.register_buffer("_zero", torch.zeros(()), persistent=False)  # the aux loss, on our device/dtype
        self._freeze(train)
        self.last_weights: dict[int, torch.Tensor] = {}
        self.last_prompts: dict[int, torch.Tensor] = {}

    def _freeze(self, train: str) -> None:
        for block in self.blocks.values():
            for name, p in block.named_parameters():
                p.requires_grad_(train == "all" or (train == "queries" and name == "state_patterns")
                                 or (train == "output" and name.startswith("out_proj.")))

    def generate(self, layer: int, tokens: torch.Tensor) -> torch.Tensor:
        """The prompts P_l [B, L_p, D] of prompted block ``layer`` from its input tokens [B, T, D]."""
        if layer not in self.layers:
            raise ValueError(f"block {layer} is not prompted (prompted: {self.layers})")
        if tokens.dim() != 3 or tokens.shape[-1] != self.d_model:
            raise ValueError(f"tokens must be [batch, length, {self.d_model}], got shape {tuple(tokens.shape)}")
        prompts, weights = self.blocks[str(layer)](tokens)
        if weights is not None:  # a static prompt retrieves nothing
            self.last_weights[layer] = weights.detach()
        self.last_prompts[layer] = prompts.detach()
        return prompts

    def prompt_for(self, layer: int, tokens: torch.Tensor):
        """The ViT's prompt hook: None for blocks that are not prompted."""
        if layer not in self.layers:
            return None
        P = self.generate(layer, tokens)
        if self.insertion == "prompt":
            return "prompt", P
        half = self.length // 2
        return "prefix", (P[:, :half], P[:, half:])

    def forward(self, query: torch.Tensor | None = None):
        """-> (hook, aux): the hook for ``vit(images, prompts=hook)`` and a zero auxiliary loss.
        ``query`` is ignored (accepted for the prompt modules' ``forward(query)`` calling form):
        RwF reads each block's own tokens instead of a frozen CLS query."""
        self.last_weights, self.last_prompts = {}, {}
        return self.prompt_for, self._zero

    @torch.no_grad()
    def retrieval_stats(self) -> dict[int, dict[str, float]]:
        """Per prompted block, from the last forward: the mean entropy of the retrieval weights
        (nats), that entropy over its maximum log T (1 = uniform over the tokens, 0 = one token),
        and the mean largest weight."""
        stats = {}
        for layer, w in self.last_weights.items():
            entropy = -torch.xlogy(w, w).sum(-1)
            stats[layer] = {"entropy": entropy.mean().item(),
                            "normalized_entropy": (entropy / math.log(w.shape[-1])).mean().item()
                            if w.shape[-1] > 1 else 0.0,
                            "max_weight": w.amax(-1).mean().item()}
        return stats
