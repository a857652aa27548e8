"""The prompt modules of L2P, DualPrompt and CODA-Prompt, for a frozen VisionTransformer.

Each module maps the query, the frozen backbone's CLS feature [B, D] (``vit.features(images)``
without prompts, no gradient needed), to ``(prompts, aux_loss)``: ``prompts`` in the ViT's hook
format (``{layer: ("input" | "prefix", ...)}``, see routemem/models/vit.py) and a scalar auxiliary
loss to add to the cross-entropy. ``module.pool`` names the feature the head should read:
``vit(images, prompts=prompts, pool=module.pool)``.

Defaults are the official configurations (L2P-PyTorch / DualPrompt-PyTorch configs for ViT-B/16,
12 layers; CODA-Prompt's ImageNet-R config), scaled to a small ViT as each class states. Layer
ranges of the 12-layer original are mapped proportionally: ``scale_layers``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from routemem.errors import ConfigError
from routemem.layers.options import check_int

OFFICIAL_N_LAYER = 12  # ViT-B/16, the backbone of the official configs


def scale_layers(start: int, stop: int, n_layer: int, official_n_layer: int = OFFICIAL_N_LAYER) -> tuple[int, ...]:
    """The official layers start .. stop-1 (of ``official_n_layer``) mapped to a ViT of ``n_layer``
    blocks: both ends scaled by n_layer / official_n_layer and rounded half up, at least one layer.
    E.g. layers 0-4 of 12 -> 0-1 of 4, 0 of 3; DualPrompt's 0-1 / 2-4 -> 0 / 1 on 3 or 4 layers."""
    lo = min(math.floor(start * n_layer / official_n_layer + 0.5), n_layer - 1)
    hi = min(max(math.floor(stop * n_layer / official_n_layer + 0.5), lo + 1), n_layer)
    return tuple(range(lo, hi))


def _check_layers(owner: str, layers, n_layer: int) -> tuple[int, ...]:
    layers = tuple(layers)
    if not layers or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layer for i in layers) \
            or len(set(layers)) != len(layers):
        raise ConfigError(f"{owner}: layers must be distinct ints in 0..{n_layer - 1}, got {layers}")
    return layers


def cosine(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each query [B, D] with each key [M, D] -> [B, M]."""
    return F.normalize(query, dim=-1) @ F.normalize(keys, dim=-1).T


def pull_loss(selected: torch.Tensor) -> torch.Tensor:
    """L2P's surrogate loss: sum over the selected keys of 1 - cos(query, key), mean over the batch
    (the official -sum(cos) / B up to a constant: the same gradient)."""
    return (1.0 - selected).sum(dim=1).mean()


def _uniform(*shape: int) -> nn.Parameter:
    """The official 'uniform' initialiser of prompts and keys: U(-1, 1)."""
    return nn.Parameter(torch.empty(*shape).uniform_(-1.0, 1.0))


class L2P(nn.Module):
    """Learning to Prompt: a pool of ``pool_size`` prompts of ``length`` tokens, each with a key;
    the ``top_n`` keys nearest the query (cosine) select their prompts, which are concatenated
    ([B, top_n * length, D]) and inserted at the input of block 0 and kept to the end ("input").
    The head reads the mean of those prompt tokens (``pool="prompt"``, the official head_type
    'prompt'; ``head="cls"`` reads CLS instead). Aux loss: ``pull_coeff`` * pull_loss.

    Official (L2P-PyTorch, Split-CIFAR100, ViT-B/16): pool 10, length 5, top 5, U(-1, 1) init,
    pull coefficient 0.1. These sizes do not depend on the width or depth, so they are kept as
    they are for a small ViT. Not implemented: the train-time batch-wise prompt selection."""

    def __init__(self, d_model: int, pool_size: int = 10, length: int = 5, top_n: int = 5,
                 pull_coeff: float = 0.1, head: str = "prompt"):
        super().__init__()
        check_int("L2P", "pool_size", pool_size)
        check_int("L2P", "length", length, low=0)
        check_int("L2P", "top_n", top_n)
        if top_n > pool_size:
            raise ConfigError(f"L2P: top_n={top_n} exceeds pool_size={pool_size}")
        if head not in ("prompt", "cls"):
            raise ConfigError(f"L2P: head must be 'prompt' or 'cls', got {head!r}")
        if head == "prompt" and length == 0:
            raise ConfigError("L2P: head='prompt' reads the prompt tokens: length must be >= 1")
        self.top_n, self.pull_coeff, self.pool = top_n, float(pull_coeff), head
        self.prompts = _uniform(pool_size, length, d_model)
        self.keys = _uniform(pool_size, d_model)

    def select(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (indices [B, top_n] of the chosen prompts, highest cosine first; their cosines [B, top_n])."""
        top = cosine(query, self.keys).topk(self.top_n, dim=1)
        return top.indices, top.values

    def forward(self, query: torch.Tensor):
        idx, sim = self.select(query)
        B, (_, L, D) = query.shape[0], self.prompts.shape
        prompt = self.prompts[idx].reshape(B, self.top_n * L, D)
        return {0: ("input", prompt)}, self.pull_coeff * pull_loss(sim)


class DualPrompt(nn.Module):
    """DualPrompt: a general (G) prompt shared by all tasks, as prefix keys/values at the early
    layers, and a pool of expert (E) prompts with keys; the ``top_k`` keys nearest the query pick
    the E-prompts, prefixes at the next layers. Each prompt has a key half and a value half of
    ``length`` tokens each. Where G and E layers coincide (ViTs of <= 2 blocks) the prefixes are
    concatenated. Aux loss: ``pull_coeff`` * pull_loss on the chosen keys. The head reads CLS.

    ``forward(query, task=t)`` uses expert t for the whole batch instead of the key match (the
    official train-time prompt mask, where task ids are known while training); the pull loss then
    pulls key t.

    Official (DualPrompt-PyTorch, Split-ImageNet-R, ViT-B/16): G length 5 at layers 0-1, E pool 10,
    length 20, top 1 at layers 2-4, U(-1, 1) init, pull coefficient 1.0. Scaled: E length 5 (20
    prefix tokens against ViT-B's 196 patches is ~10%; against the 64 patches of a 32x32 image
    with 4x4 patches, ~5 is that share); layers by ``scale_layers`` (0-1 -> 0, 2-4 -> 1 on 3-4 blocks)."""

    pool = "cls"

    def __init__(self, d_model: int, n_layer: int, g_length: int = 5, e_length: int = 5, pool_size: int = 10,
                 top_k: int = 1, g_layers=None, e_layers=None, pull_coeff: float = 1.0):
        super().__init__()
        check_int("DualPrompt", "n_layer", n_layer)
        check_int("DualPrompt", "g_length", g_length, low=0)
        check_int("DualPrompt", "e_length", e_length, low=0)
        check_int("DualPrompt", "pool_size", pool_size)
        check_int("DualPrompt", "top_k", top_k)
        if top_k > pool_size:
            raise ConfigError(f"DualPrompt: top_k={top_k} exceeds pool_size={pool_size}")
        self.g_layers = _check_layers("DualPrompt g_layers", scale_layers(0, 2, n_layer) if g_layers is None
                                      else g_layers, n_layer)
        self.e_layers = _check_layers("DualPrompt e_layers", scale_layers(2, 5, n_layer) if e_layers is None
                                      else e_layers, n_layer)
        self.top_k, self.pull_coeff = top_k, float(pull_coeff)
        self.g_prompts = _uniform(len(self.g_layers), 2, g_length, d_model)  # [layer, key|value, length, D]
        self.e_prompts = _uniform(len(self.e_layers), 2, pool_size, e_length, d_model)
        self.keys = _uniform(pool_size, d_model)

    def select(self, query: torch.Tensor, task: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (indices [B, k] of the chosen experts, their cosines [B, k])."""
        sim = cosine(query, self.keys)
        if task is None:
            top = sim.topk(self.top_k, dim=1)
            return top.indices, top.values
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < self.keys.shape[0]:
            raise ValueError(f"DualPrompt: task must be an int in 0..{self.keys.shape[0] - 1}, got {task!r}")
        idx = torch.full((query.shape[0], 1), task, dtype=torch.long, device=query.device)
        return idx, sim.gather(1, idx)

    def forward(self, query: torch.Tensor, task: int | None = None):
        idx, sim = self.select(query, task)
        B, k = idx.shape
        n_e, _, _, L, D = self.e_prompts.shape
        experts = self.e_prompts[:, :, idx].reshape(n_e, 2, B, k * L, D)  # the k experts side by side
        parts: dict[int, list] = {}
        for j, layer in enumerate(self.g_layers):
            parts.setdefault(layer, []).append(self.g_prompts[j].unsqueeze(1).expand(2, B, -1, D))
        for j, layer in enumerate(self.e_layers):
            parts.setdefault(layer, []).append(experts[j])
        prompts = {}
        for layer, kv in parts.items():
            kv = torch.cat(kv, dim=2)  # [2, B, length, D]
            prompts[layer] = ("prefix", (kv[0], kv[1]))
        return prompts, self.pull_coeff * pull_loss(sim)


def orthonormal_rows(count: int, dim: int, against: torch.Tensor | None = None) -> torch.Tensor:
    """``count`` random unit rows [count, dim], orthogonal to each other and to the span of the rows
    of ``against`` (Gram-Schmidt on random vectors, computed as a QR decomposition)."""
    rows = torch.randn(count, dim, dtype=torch.float64)
    if against is not None and against.numel():
        basis = torch.linalg.qr(against.detach().double().reshape(-1, dim).T).Q  # [dim, m]
        for _ in range(2):  # twice: re-orthogonalising removes what rounding left
            rows = rows - (rows @ basis) @ basis.T
    return torch.linalg.qr(rows.T).Q.T.contiguous()


class CodaPrompt(nn.Module):
    """CODA-Prompt: per prompted layer, components P_m [length, D] with keys K_m [D] and attention
    vectors A_m [D]; the prompt is sum_m alpha_m P_m with alpha_m = cos(query * A_m, K_m), split
    into a key half (first length/2 tokens) and a value half: prefix keys/values. The head reads CLS.

    Components belong to tasks: ``n_components / n_tasks`` each. ``start_task(t)`` (t = 0 is
    started at construction) initialises task t's components orthonormal (Gram-Schmidt) to all
    earlier ones, per layer and separately for P (flattened), K and A, as the paper does; the
    earlier tasks' components are frozen (``requires_grad=False``: no gradient, so no optimizer
    moves them), later tasks' stay zero and unused. The forward uses the components of tasks
    0..t. Build the optimizer over all ``parameters()`` (frozen ones are skipped) or rebuild it
    after each ``start_task`` as the official code does. Aux loss: ``ortho_mu`` * the orthogonality
    penalty mean((X X^T - I)^2) of K, A and flattened P (official default 0: zero).

    Official (CODA-Prompt, ImageNet-R, ViT-B/16): 100 components, length 8, layers 0-4, ortho_mu 0.
    Scaled: layers by ``scale_layers`` (0-4 -> 0-1 on 4 blocks); components min(100, d_model)
    rounded down to a multiple of n_tasks (orthonormal keys of dimension D allow at most D)."""

    pool = "cls"

    def __init__(self, d_model: int, n_layer: int, n_tasks: int, n_components: int | None = None,
                 length: int = 8, layers=None, ortho_mu: float = 0.0):
        super().__init__()
        check_int("CodaPrompt", "n_layer", n_layer)
        check_int("CodaPrompt", "n_tasks", n_tasks)
        check_int("CodaPrompt", "length", length, low=2)
        if length % 2:
            raise ConfigError(f"CodaPrompt: length must be even (key and value halves), got {length}")
        if n_components is None:
            n_components = n_tasks * max(1, min(100, d_model) // n_tasks)
        check_int("CodaPrompt", "n_components", n_components)
        if n_components % n_tasks:
            raise ConfigError(f"CodaPrompt: n_components={n_components} is not a multiple of n_tasks={n_tasks}")
        if n_components > d_model:
            raise ConfigError(f"CodaPrompt: n_components={n_components} exceeds d_model={d_model} "
                              "(orthogonal keys need n_components <= d_model)")
        if ortho_mu < 0:
            raise ConfigError(f"CodaPrompt: ortho_mu must be >= 0, got {ortho_mu}")
        self.layers = _check_layers("CodaPrompt layers", scale_layers(0, 5, n_layer) if layers is None else layers,
                                    n_layer)
        self.n_tasks, self.length, self.ortho_mu = n_tasks, length, float(ortho_mu)
        per_task, n_l = n_components // n_tasks, len(self.layers)
        # one parameter per task, so freezing a finished task is requires_grad=False
        self.components = nn.ParameterList(nn.Parameter(torch.zeros(n_l, per_task, length, d_model), requires_grad=False)
                                           for _ in range(n_tasks))
        self.keys = nn.ParameterList(nn.Parameter(torch.zeros(n_l, per_task, d_model), requires_grad=False)
                                     for _ in range(n_tasks))
        self.attention = nn.ParameterList(nn.Parameter(torch.zeros(n_l, per_task, d_model), requires_grad=False)
                                          for _ in range(n_tasks))
        self.task = -1
        self.start_task(0)

    @torch.no_grad()
    def start_task(self, task: int) -> None:
        """Freeze tasks < ``task``; initialise ``task``'s components (and any skipped ones)
        orthonormal to the earlier ones and make them trainable. The same task again: nothing."""
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < self.n_tasks:
            raise ValueError(f"CodaPrompt: task must be an int in 0..{self.n_tasks - 1}, got {task!r}")
        if task < self.task:
            raise ValueError(f"CodaPrompt: task {task} is before the current task {self.task}")
        for t in range(self.task + 1, task + 1):
            for group in (self.components, self.keys, self.attention):
                for layer in range(len(self.layers)):
                    earlier = torch.cat([g[layer].flatten(1) for g in group[:t]]) if t else None
                    shape = group[t][layer].shape
                    new = orthonormal_rows(shape[0], math.prod(shape[1:]), earlier)
                    group[t][layer] = new.reshape(shape).to(device=group[t].device, dtype=group[t].dtype)
        for t in range(self.n_tasks):
            for group in (self.components, self.keys, self.attention):
                group[t].requires_grad_(t == task)
        self.task = task

    def _used(self, group: nn.ParameterList) -> torch.Tensor:
        return torch.cat(list(group[: self.task + 1]), dim=1)  # [n_layers, used components, ...]

    def forward(self, query: torch.Tensor):
        P, K, A = self._used(self.components), self._used(self.keys), self._used(self.attention)
        attended = F.normalize(query[None, :, None, :] * A[:, None], dim=-1)  # [layers, B, M, D]
        alpha = (attended * F.normalize(K, dim=-1)[:, None]).sum(-1)  # [layers, B, M]
        prompt = torch.einsum("nbm,nmld->nbld", alpha, P)  # [layers, B, length, D]
        half = self.length // 2
        prompts = {layer: ("prefix", (prompt[j, :, :half], prompt[j, :, half:])) for j, layer in enumerate(self.layers)}
        aux = self.ortho_mu * self.ortho_penalty() if self.ortho_mu else query.new_zeros(())
        return prompts, aux

    def ortho_penalty(self) -> torch.Tensor:
        """Sum over layers of mean((X X^T - I)^2) for K, A and flattened P (components in use)."""
        total = 0.0
        for group in (self.components, self.keys, self.attention):
            X = self._used(group).flatten(2)  # [layers, M, n]
            eye = torch.eye(X.shape[1], dtype=X.dtype, device=X.device)
            total = total + ((X @ X.transpose(1, 2) - eye) ** 2).mean(dim=(1, 2)).sum()
        return total
