"""swap_layers: routemem mixers and FFNs in place of a transformers decoder's attention and MLP."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from routemem.integrations.hf.padding import check_right_padded
from routemem.layers import LayerSpec, build_ffn, build_mixer
from routemem.models.transformer import init_branch

# model_type -> (the decoder layers' path, the attention's name in a layer, the MLP's name); the
# position scheme our mixers must bring (Llama's rotary embedding lives inside its attention, so a
# replacing mixer applies its own RoPE where it has one; GPT-2 adds learned positions to the input).
LAYOUTS = {
    "llama": ("model.layers", "self_attn", "mlp", "rope"),
    "mistral": ("model.layers", "self_attn", "mlp", "rope"),
    "qwen2": ("model.layers", "self_attn", "mlp", "rope"),
    "gpt2": ("transformer.h", "attn", "mlp", "learned"),
}


class MixerAsAttention(nn.Module):
    """A routemem mixer called as a decoder's self-attention: (hidden_states, **what attention
    gets) -> (output, None). The mixer applies no mask (it is causal by construction) and keeps no
    KV cache, so it refuses one."""

    def __init__(self, mixer: nn.Module, layer_idx: int):
        super().__init__()
        self.mixer = mixer
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, cache=None, past_key_values=None, **kwargs):
        if cache is not None or past_key_values is not None:
            raise ValueError(f"decoder layer {self.layer_idx} runs a routemem mixer, which keeps no KV cache: "
                             "call the model with use_cache=False (swap_layers sets it in the model's configs)")
        return self.mixer(hidden_states), None


class FFNAsMLP(nn.Module):
    """A routemem FFN called as a decoder's MLP: hidden_states -> hidden_states."""

    def __init__(self, ffn: nn.Module):
        super().__init__()
        self.ffn = ffn

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.ffn(hidden_states)


def swap_layers(model: nn.Module, ffn: str | None = None, ffn_kwargs: dict | None = None,
                mixer: str | None = None, mixer_kwargs: dict | None = None,
                layers: Iterable[int] | None = None) -> nn.Module:
    """Replace the MLP (``ffn``) and/or the self-attention (``mixer``) of decoder ``layers``
    (default: all) of a transformers causal LM with routemem layers of the model's width; returns
    ``model``, changed in place.

    Supported: the model types in ``LAYOUTS`` (Llama, Mistral, Qwen2, GPT-2). Norms, embeddings,
    the residual stream and every other weight are kept; the replaced parts start from fresh
    weights (routemem's init: N(0, initializer_range), each layer's own scheme, the residual
    output scaled by 1/sqrt(2 * n_layer)), so a swapped pretrained model needs training.

    With a ``mixer``: our mixers keep no KV cache, so ``use_cache`` is set to False in the model's
    config and generation config (``generate()`` then reruns the whole sequence at each step, our
    step() states unused), and a 0 before a 1 in ``attention_mask`` (left padding) raises
    ValueError, as the mixers read every earlier token. APN's load-balancing loss is not added to
    the model's loss (transformers computes it); ``routemem_aux_loss`` is not provided yet."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in LAYOUTS:
        raise ValueError(f"swap_layers supports model types {', '.join(sorted(LAYOUTS))}; got '{model_type}'")
    if ffn is None and mixer is None:
        raise ValueError("swap_layers: give ffn and/or mixer (a routemem layer name)")
    path, attn_name, mlp_name, pos = LAYOUTS[model_type]
    decoder_layers = model.get_submodule(path)
    config = model.config
    n_layer = len(decoder_layers)
    chosen = range(n_layer) if layers is None else list(layers)
    for i in chosen:
        if not isinstance(i, int) or not 0 <= i < n_layer:
            raise ValueError(f"layers: {i!r} is not a decoder layer index (the model has {n_layer}: 0..{n_layer - 1})")
    std = getattr(config, "initializer_range", 0.02)
    for i in chosen:
        layer = decoder_layers[i]
        spec = LayerSpec(d_model=config.hidden_size, n_head=config.num_attention_heads,
                         max_seq_len=config.max_position_embeddings, pos=pos, layer_idx=i, n_layer=n_layer)
        if ffn is not None:
            new = build_ffn(ffn, spec, ffn_kwargs)
            _replace(layer, mlp_name, FFNAsMLP(init_branch(new, std, n_layer)))
        if mixer is not None:
            new = build_mixer(mixer, spec, mixer_kwargs)
            _replace(layer, attn_name, MixerAsAttention(init_branch(new, std, n_layer), i))
    if mixer is not None:
        config.use_cache = False
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.use_cache = False
        if not getattr(model, "_routemem_padding_hook", False):
            model.register_forward_pre_hook(_refuse_left_padding, with_kwargs=True)
            model._routemem_padding_hook = True
    return model


def _replace(layer: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``layer.<name>`` was, on its device and in its dtype."""
    old = getattr(layer, name)
    like = next(old.parameters(), None)
    if like is not None:
        new = new.to(device=like.device, dtype=like.dtype)
    setattr(layer, name, new)


def _refuse_left_padding(module: nn.Module, args: tuple, kwargs: dict) -> None:
    check_right_padded(kwargs.get("attention_mask", args[1] if len(args) > 1 else None))
