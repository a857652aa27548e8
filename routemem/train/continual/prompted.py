"""The prompt methods: ``l2p``, ``dualprompt``, ``coda-prompt`` on a frozen VisionTransformer.

Shared by all three, as in the official code: the backbone is frozen (the head and the prompt
module train); the query is the frozen backbone's CLS feature without prompts
(``vit.features(images)``, eval mode, no gradient); the prompt module maps it to prompts and an
auxiliary loss (``routemem.layers.prompts``), added to the cross-entropy while training; the head
reads the feature the module names (``module.pool``). Loss mask: the classes seen so far in the
current task (``train_mask="task"``, the official ``train_mask``; see continual_methods). Adam, lr
1e-3, rebuilt at each task start as the official code does (L2P / DualPrompt reinit_optimizer,
CODA-Prompt's per-task optimizer). The rate: L2P's 0.03 per 256 samples scaled to a batch of 10
is 1.2e-3; CODA-Prompt uses 1e-3.
"""

from __future__ import annotations

import torch

from routemem.errors import ConfigError
from routemem.layers.options import check_int
from routemem.layers.prompts import L2P, CodaPrompt, DualPrompt
from routemem.models.vit import VisionTransformer
from routemem.train.continual.methods import Method


class PromptMethod(Method):
    """A frozen ViT, its head and a prompt module (``self.prompt``, set by the subclass)."""

    frozen_backbone = True
    rebuild_optimizer_each_task = True

    def _attach(self, prompt: torch.nn.Module) -> None:
        ref = self.vit.head.weight
        self.prompt = prompt.to(device=ref.device, dtype=ref.dtype)

    @torch.no_grad()
    def query(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen backbone's CLS feature without prompts, in eval mode (no dropout)."""
        was_training = self.vit.training
        self.vit.eval()
        try:
            return self.vit.features(images)
        finally:
            self.vit.train(was_training)

    def _prompts(self, query: torch.Tensor, training: bool):
        return self.prompt(query)

    def _logits(self, images, training):
        prompts, aux = self._prompts(self.query(images), training)
        return self.vit(images, prompts=prompts, pool=self.prompt.pool), (aux if training else None)


class L2PMethod(PromptMethod):
    """L2P: the top ``top_n`` of ``pool_size`` prompts (``length`` tokens each) by key-query cosine,
    at the input, kept to the end; the head reads their mean (``head="prompt"``). Aux loss:
    ``pull_coeff`` * the pull constraint. Defaults: the official Split-CIFAR100 configuration
    (pool 10, length 5, top 5, coefficient 0.1), sizes kept as they are for the small ViT."""

    name = "l2p"
    description = "L2P: key-query prompt pool (top-N), prompts at the input, pull constraint"

    def __init__(self, vit: VisionTransformer, n_classes: int, n_tasks: int, *, lr: float = 1e-3,
                 train_mask: str = "task", pool_size: int = 10, length: int = 5, top_n: int = 5,
                 pull_coeff: float = 0.1, head: str = "prompt"):
        super().__init__(vit, n_classes, n_tasks, lr=lr, train_mask=train_mask)
        self._attach(L2P(self.vit.config.d_model, pool_size=pool_size, length=length, top_n=top_n,
                         pull_coeff=pull_coeff, head=head))


class DualPromptMethod(PromptMethod):
    """DualPrompt: a general prompt (prefix, early layers) and one expert prompt per task (prefix,
    the next layers). Training uses the current task's expert for the whole batch (the official
    train-time task forcing; the pull loss pulls that expert's key to the queries); at test the
    expert whose key best matches the query. ``pool_size`` defaults to the stream's task count
    (the official pool is one expert per task: 10 for 10 tasks) and may not be smaller. Other
    defaults: routemem.layers.prompts.DualPrompt (G length 5, E length 5, top 1, layers scaled
    from 0-1 / 2-4 of 12, pull coefficient 1.0)."""

    name = "dualprompt"
    description = "DualPrompt: general + per-task expert prefix prompts, task-forced expert in training"

    def __init__(self, vit: VisionTransformer, n_classes: int, n_tasks: int, *, lr: float = 1e-3,
                 train_mask: str = "task", g_length: int = 5, e_length: int = 5, pool_size: int | None = None,
                 top_k: int = 1, pull_coeff: float = 1.0):
        super().__init__(vit, n_classes, n_tasks, lr=lr, train_mask=train_mask)
        pool_size = n_tasks if pool_size is None else check_int("dualprompt", "pool_size", pool_size)
        if pool_size < n_tasks:
            raise ConfigError(f"dualprompt: pool_size={pool_size} is below the stream's {n_tasks} tasks "
                              "(training uses one expert per task)")
        c = self.vit.config
        self._attach(DualPrompt(c.d_model, c.n_layer, g_length=g_length, e_length=e_length, pool_size=pool_size,
                                top_k=top_k, pull_coeff=pull_coeff))

    def _prompts(self, query, training):
        return self.prompt(query, task=self.task) if training else self.prompt(query)


class CodaPromptMethod(PromptMethod):
    """CODA-Prompt: per prompted layer, a prompt assembled from components weighted by the
    attended query's cosine with their keys; each task adds its own components (orthonormal to
    the earlier ones, which freeze): ``start_task(t)`` at each task start, then Adam is rebuilt
    over the trainable parameters. Defaults: routemem.layers.prompts.CodaPrompt (components
    min(100, d_model) rounded down to a multiple of the task count, length 8, layers scaled from
    0-4 of 12, ortho_mu 0)."""

    name = "coda-prompt"
    description = "CODA-Prompt: attention-weighted prompt components, new components per task"

    def __init__(self, vit: VisionTransformer, n_classes: int, n_tasks: int, *, lr: float = 1e-3,
                 train_mask: str = "task", n_components: int | None = None, length: int = 8,
                 ortho_mu: float = 0.0):
        super().__init__(vit, n_classes, n_tasks, lr=lr, train_mask=train_mask)
        c = self.vit.config
        self._attach(CodaPrompt(c.d_model, c.n_layer, n_tasks, n_components=n_components, length=length,
                                ortho_mu=ortho_mu))

    def _start_task(self, task: int) -> None:
        self.prompt.start_task(task)  # before the optimizer is rebuilt over what now trains
