"""The ``rwf`` method: Routing without Forgetting on a frozen VisionTransformer.

The prompts of each prompted block are retrieved from that block's own tokens by one modern-Hopfield
step (routemem.layers.hopfield_prompts.HopfieldPromptGenerator), so unlike L2P / DualPrompt /
CODA-Prompt there is no frozen CLS query and no extra forward pass: one prompted forward per batch.
The conventions of the other prompt methods (routemem.train.continual.prompted): backbone frozen,
the generator and the head train, loss mask ``train_mask="task"`` (the classes seen so far in the
current task), Adam lr 1e-3 rebuilt at each task start, the head reads CLS, no auxiliary loss.
The paper gives no rate; 1e-3 is the one the other prompt methods use here.
"""

from __future__ import annotations

from routemem.layers.hopfield_prompts import HopfieldPromptGenerator
from routemem.models.vit import VisionTransformer
from routemem.train.continual.prompted import PromptMethod


class RwFMethod(PromptMethod):
    """RwF: per prompted block, ``length`` prompts retrieved from the block's tokens by learned
    state patterns (``steps`` Hopfield steps, ``heads`` heads of ``head_dim`` (default D / heads),
    beta 1/sqrt(head dim) unless given: one number or one per head), inserted after CLS and removed
    after the block (``insertion="prompt"``) or as prefix keys/values (``"prefix"``). Defaults:
    routemem.layers.hopfield_prompts (blocks scaled from 3 of 12 starting at 0, length 10, 1 head,
    1 step, layer norms on, everything trains). ``train``: "all", "queries" (state patterns only)
    or "output" (output projection only), the head always; ``layers=[]``: no prompted block (a
    linear probe with the task mask); ``retrieval=False``: a learned static prompt of the same size
    per block instead (the no-retrieval ablation)."""

    name = "rwf"
    description = "RwF: per-block prompts retrieved from the block's tokens by one Hopfield step"

    def __init__(self, vit: VisionTransformer, n_classes: int, n_tasks: int, *, lr: float = 1e-3,
                 train_mask: str = "task", layers=None, length: int = 10, heads: int = 1,
                 head_dim: int | None = None, beta=None, steps: int = 1, insertion: str = "prompt",
                 norms: bool = True, train: str = "all", retrieval: bool = True):
        super().__init__(vit, n_classes, n_tasks, lr=lr, train_mask=train_mask)
        c = self.vit.config
        self._attach(HopfieldPromptGenerator(c.d_model, c.n_layer, layers=layers, length=length, heads=heads,
                                             head_dim=head_dim, beta=beta, steps=steps, insertion=insertion,
                                             norms=norms, train=train, retrieval=retrieval))

    def _logits(self, images, training):
        hook, aux = self.prompt()  # no frozen query: the generator reads each block's tokens
        return self.vit(images, prompts=hook, pool=self.prompt.pool), (aux if training else None)
