"""What the absorption study reads from attention maps: concentration (claim 5) and post-hoc gate
distillation (claim 3).

Distillation. A frozen LM (the *source*) and a *student*: the same weights with a fresh learned gate
in hard top-k mode. Only the student's gate trains. Its target, per layer and query, is the source's
own dense attention row p_i = softmax(q_i . k_j / sqrt(d)), j <= i, on the inputs that layer sees when
the source runs as it was trained (the dense model densely; the hard model through its own gate);
the loss is KL(p_i || softmax_j(s_ij)) over causal keys, averaged over queries, heads and layers:
the per-query form of SeerAttention's KL (no block pooling). The oracle mask is the top k of p_i.
Deployed, the student attends through the distilled gate's top k; its F1 against the oracle is
measured on that same deployed forward, on validation text.

At block granularity (claim B3) the student's gate is a learned block gate and the target is
SeerAttention's: per layer and query block i >= 1, the source's dense attention mass of block i's
queries on each past key block j < i, normalised; the loss is KL(that || softmax_j(s_ij)). The own
block is always read, so it is no part of the choice. The oracle is the top_k_blocks past blocks by
that mass.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from routemem.experiments.shared.common import use_bf16
from routemem.models import LMConfig, TransformerLM
from routemem.ops.gated_sparse import attention_probs, causal_mask, oracle_mask
from routemem.ops.gated_sparse.block_select import (
    block_attention_mass, past_block_mask, select_past_blocks, selected_block_mask,
)
from routemem.ops.gated_sparse.block_select import block_concentration as block_share
from routemem.train.config import TrainConfig
from routemem.train.supervised import fit_steps


def gated_mixers(model: TransformerLM) -> list[nn.Module]:
    return [b.mixer for b in model.blocks if hasattr(b.mixer, "set_deploy")]


def set_deploy(model: TransformerLM, path: str) -> None:
    """Deploy every gated_sparse mixer of ``model`` with ``path`` (gate | dense | oracle)."""
    for mixer in gated_mixers(model):
        mixer.set_deploy(path)


@torch.no_grad()
def mixer_inputs(model: TransformerLM, inputs: torch.Tensor) -> list[torch.Tensor]:
    """The input of each block's mixer (after its norm) on ``inputs``, the model in eval mode."""
    seen: list[torch.Tensor] = []
    hooks = [b.mixer.register_forward_pre_hook(lambda mod, args: seen.append(args[0])) for b in model.blocks]
    was_training = model.training
    try:
        model.eval()
        model(inputs)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return seen


@torch.no_grad()
def concentration(model: TransformerLM, inputs: torch.Tensor, k: int) -> list[float]:
    """Per layer: the mean share of dense attention mass in each query's k most attended keys,
    over queries with more than k causal keys (those where a top-k mask drops anything; 1.0 when
    no query has more than k keys)."""
    shares = []
    for block, x in zip(model.blocks, mixer_inputs(model, inputs)):
        q, key, _ = block.mixer._heads(x, 0)
        probs = attention_probs(q.float(), key.float())
        kept = (probs * oracle_mask(probs, k)).sum(-1)  # [B, H, T]
        shares.append(float(kept[..., k:].mean()) if kept.shape[-1] > k else 1.0)
    return shares


@torch.no_grad()
def block_concentration(model: TransformerLM, inputs: torch.Tensor, block_size: int) -> list[float]:
    """Per layer: the mean share of each query block's dense attention mass in its top 1/8 of causal
    key blocks (ops/gated_sparse/block_select.py: ``block_concentration``)."""
    shares = []
    for block, x in zip(model.blocks, mixer_inputs(model, inputs)):
        q, key, _ = block.mixer._heads(x, 0)
        shares.append(float(block_share(block_attention_mass(q.float(), key.float(), block_size))))
    return shares


@torch.no_grad()
def selected_blocks(model: TransformerLM, inputs: torch.Tensor) -> list[list[int]]:
    """The key blocks (1) each query block of the first sequence reads in layer 0, head 0, by the
    gate's top_k_blocks (its own block included): the map a block-routed model deploys with."""
    mixer = gated_mixers(model)[0]
    scores, _ = mixer.maps(mixer_inputs(model, inputs[:1])[0])
    chosen = selected_block_mask(*select_past_blocks(scores, mixer.block.top_k_blocks), scores.shape[-1])
    return chosen[0, 0].int().tolist()


def block_distill_loss(scores: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Mean over query blocks i >= 1 of KL(mass_i / sum_{j<i} mass_ij || softmax_{j<i}(scores_i));
    [B, H, n, n] each (the mixer's ``maps`` at block granularity)."""
    past = past_block_mask(scores.shape[-1], scores.device)[1:]  # block 0 has no past block
    dtype = torch.promote_types(scores.dtype, torch.float32)
    log_q = scores[..., 1:, :].to(dtype).masked_fill(~past, float("-inf")).log_softmax(-1)
    p = mass[..., 1:, :].to(dtype).masked_fill(~past, 0.0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
    terms = p * (p.clamp_min(1e-30).log() - torch.where(past, log_q, torch.zeros_like(log_q)))
    return terms.masked_fill(~past, 0.0).sum(-1).mean()


def mixer_distill_loss(mixer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (block_distill_loss if mixer.block is not None else distill_loss)(*mixer.maps(x))


def distill_loss(scores: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Mean over queries of KL(probs_i || softmax(scores_i)) over causal keys; [B, H, T, T] each."""
    causal = causal_mask(scores.shape[-1], scores.device)
    dtype = torch.promote_types(scores.dtype, torch.float32)  # bf16 maps under autocast: at least float32
    log_q = scores.to(dtype).masked_fill(~causal, float("-inf")).log_softmax(-1)
    p = probs.to(dtype)
    terms = p * (p.clamp_min(1e-30).log() - torch.where(causal, log_q, torch.zeros_like(log_q)))
    return terms.masked_fill(~causal, 0.0).sum(-1).mean()


class GateDistillation(nn.Module):
    """``forward(inputs, targets)`` -> (None, distillation loss): the shape ``fit_steps`` trains.
    The source is held outside the module tree, so only the student's parameters are seen."""

    def __init__(self, student: TransformerLM, source: TransformerLM):
        super().__init__()
        self.student = student
        self._source = [source]

    def forward(self, inputs: torch.Tensor, targets=None):
        layers = mixer_inputs(self._source[0], inputs)
        loss = sum(mixer_distill_loss(mixer, x) for mixer, x in zip(gated_mixers(self.student), layers))
        return None, loss / len(layers)


def student_model(config: LMConfig, source: TransformerLM, seed: int) -> TransformerLM:
    """``config`` (a learned hard gate) with every weight of ``source`` except a gate's, the gate
    fresh from ``seed``; everything but the gate frozen."""
    torch.manual_seed(10_000 + seed)
    student = TransformerLM(config).to(next(source.parameters()).device)
    shared = {name: value for name, value in source.state_dict().items() if ".gate_" not in name}
    missing, unexpected = student.load_state_dict(shared, strict=False)
    if unexpected or any(".gate_" not in name for name in missing):
        raise RuntimeError(f"the student does not fit the source: missing {missing}, unexpected {unexpected}")
    student.requires_grad_(False)
    for mixer in gated_mixers(student):
        mixer.gate_q.weight.requires_grad_(True)
        mixer.gate_k.weight.requires_grad_(True)
    return student


@torch.no_grad()
def gate_f1(model: TransformerLM, inputs: torch.Tensor) -> list[float]:
    """Per layer: the F1 (overlap share; both sets have k keys) of the gate's top k with the
    oracle's, on the forward the model is deployed with."""
    mixers = gated_mixers(model)
    for mixer in mixers:
        mixer.track_stats = True
    try:
        model.eval()
        model(inputs)
    finally:
        for mixer in mixers:
            mixer.track_stats = False
    return [mixer.metrics()["gate_oracle_f1"] for mixer in mixers]


def distill(setting, source: TransformerLM, source_arm: str, student_config: LMConfig, task, seed: int) -> dict:
    """Distil a gate onto the frozen ``source``; deploy it. The record has the source's own val
    loss, the student's with the distilled gate and with the oracle mask, the F1 per layer, and
    the distillation loss along the way."""
    start = time.perf_counter()
    device = next(source.parameters()).device
    bf16 = use_bf16(setting.bf16, device)
    source.eval()
    source.requires_grad_(False)
    student = student_model(student_config, source, seed)
    cfg = TrainConfig(batch_size=setting.distill_batch, max_steps=setting.distill_steps, lr=setting.distill_lr,
                      min_lr=setting.distill_lr / 10, warmup_steps=max(1, setting.distill_steps // 20),
                      weight_decay=0.0, seed=seed)

    def batch_at(step: int):
        inputs, targets = task.batch_at(10**6 + step)  # windows the source did not train on at that step
        return inputs[: setting.distill_batch], targets[: setting.distill_batch]

    losses = fit_steps(GateDistillation(student, source), batch_at, cfg, bf16=bf16,
                       progress=f"distill onto {source_arm} seed={seed}")
    probe = task.probe.to(device)
    set_deploy(student, "gate")
    granularity = student_config.mixer_kwargs.get("granularity", "token")
    record = {"kind": "distill", "source": source_arm, "granularity": granularity, "seed": seed,
              "steps": setting.distill_steps,
              "loss_curve": losses[:: max(1, len(losses) // 50)], "final_loss": float(sum(losses[-10:]) / len(losses[-10:])),
              "own_loss": task.val_loss(source, setting.val_tokens, bf16),
              "deployed_loss": task.val_loss(student, setting.val_tokens, bf16),
              "f1": gate_f1(student, probe)}
    if source_arm != "dense":
        record["own_gate_f1"] = gate_f1(source, probe)  # the co-adapted gate it was trained with
    set_deploy(student, "oracle")
    record["oracle_loss"] = task.val_loss(student, setting.val_tokens, bf16)
    record["seconds"] = time.perf_counter() - start
    return record
