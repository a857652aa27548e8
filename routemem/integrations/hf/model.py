"""RoutememForCausalLM: TransformerLM as a transformers model (save/load, generate, Trainer).

Two paths through ``forward``:

- without a cache (the default; training, scoring): TransformerLM's parallel forward, with
  gradients. Each mixer runs its chunked/parallel form.
- with a cache (``use_cache=True`` or a ``cache`` passed in; what ``generate()`` does): the tokens
  are read one at a time with ``TransformerLM.step``, no gradients, and the mixers' step states come
  back as ``outputs.cache``, a :class:`RoutememCache`. ``generate()`` passes it to the next call
  with only the new token, so every mixer with ``step()`` decodes from its own state, and decoding
  past ``max_seq_len`` restarts from the last half window as ``TransformerLM.generate`` does.

``use_cache`` defaults to False (whatever transformers' convention of a default-on cache): the
cached path is for decoding, and a training step must not take it silently.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils.generic import can_return_tuple

from routemem.integrations.hf.cache import RoutememCache
from routemem.integrations.hf.config import RoutememConfig
from routemem.integrations.hf.padding import check_right_padded
from routemem.models.transformer import TransformerLM


class RoutememForCausalLM(PreTrainedModel, GenerationMixin):
    """``model.model`` is the TransformerLM; its state dict keys are TransformerLM's, under ``model.``.

    Loss as transformers' causal LMs: ``labels`` are the input ids (shifted inside), -100 ignored,
    plus the layers' auxiliary losses (APN's load balance) when they set one. ``attention_mask``:
    all ones or right padding; a 0 before a 1 raises ValueError (see ``padding.py``)."""

    config_class = RoutememConfig
    base_model_prefix = "model"
    loss_type = "ForCausalLM"
    # Only when config.tie_word_embeddings (our tie_embeddings) is true: transformers saves the
    # head once and ties it again on load.
    _tied_weights_keys = {"model.lm_head.weight": "model.tok_emb.weight"}
    _no_split_modules = ["Block"]
    supports_gradient_checkpointing = False

    def __init__(self, config: RoutememConfig):
        super().__init__(config)
        self.model = TransformerLM(config.to_lm_config())  # initialises its own weights
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing: TransformerLM initialised every weight in its constructor (transformers' generic
        init would overwrite the layers' own schemes), and from_pretrained loads them all."""

    # -- loading: built on a real device ---------------------------------------------------------
    # transformers 5 builds a model on the meta device and then fills in the saved tensors. Our
    # layers compute while they are built (init schemes that read values, RoPE tables kept as
    # non-persistent buffers, which are never saved), so this model is built for real, as in
    # from_config, and the loaded tensors replace the initial ones. Where a key is missing, the
    # layer's own initial value stays.
    @classmethod
    def get_init_context(cls, *args, **kwargs):
        contexts = super().get_init_context(*args, **kwargs)
        return [c for c in contexts if not (isinstance(c, torch.device) and c.type == "meta")]

    def _move_missing_keys_from_meta_to_device(self, *args, **kwargs) -> None:
        """Nothing is on the meta device (see get_init_context); the base class would overwrite the
        non-persistent buffers (RoPE tables) with uninitialised memory."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not hand us a KV cache: our forward makes a RoutememCache

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.tok_emb

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.tok_emb = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.lm_head = value

    @can_return_tuple
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, cache: RoutememCache | None = None,
                use_cache: bool | None = None, past_key_values: RoutememCache | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs) -> CausalLMOutputWithPast:
        """``past_key_values`` is the name transformers 4 used for ``cache``; either is accepted.
        ``kwargs``: ``num_items_in_batch`` (Trainer's gradient accumulation) reaches the loss; the
        other generic flags (``return_dict``, ``output_attentions``...) are accepted and unused."""
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("RoutememForCausalLM takes input_ids (inputs_embeds is not supported)")
        check_right_padded(attention_mask)
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, RoutememCache):
            raise ValueError(f"cache must be a RoutememCache (made by this model's forward), got {type(cache).__name__}")
        if cache is None and use_cache:
            cache = RoutememCache()
        if cache is not None:
            logits = cache.read(self.model, input_ids)
        else:
            logits = self.model(input_ids)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                                      num_items_in_batch=kwargs.get("num_items_in_batch"))
            aux = self.model.aux_loss() if self.training else None
            if aux is not None:
                loss = loss + aux
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)
