"""Registries that turn a config string (``mixer="attention"``, ``ffn="dense"``) into a module.

Every layer file registers itself with a decorator; ``routemem.models`` only ever looks names up
here, so a new mechanism is one new file plus its registration and nothing in models/ changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from routemem.errors import ConfigError
from routemem.layers.options import check_options


@dataclass(frozen=True)
class LayerSpec:
    """What every mixer and FFN is told about its place in the model."""

    d_model: int
    n_head: int
    max_seq_len: int
    dropout: float = 0.0
    pos: str = "learned"  # learned | rope | none: mixers that use RoPE read this
    layer_idx: int = 0
    n_layer: int = 1


MIXERS: dict[str, type[nn.Module]] = {}
FFNS: dict[str, type[nn.Module]] = {}


def _register(table: dict, kind: str, name: str) -> Callable:
    def decorator(cls):
        if name in table and table[name] is not cls:
            raise ValueError(f"{kind} '{name}' is already registered by {table[name].__qualname__}")
        table[name] = cls
        return cls

    return decorator


def register_mixer(name: str) -> Callable:
    """Class decorator: ``cls(spec: LayerSpec, **mixer_kwargs)`` maps [B,T,D] -> [B,T,D] causally,
    and has ``step(x_t [B,D], state) -> (y_t, state)`` and ``state_size()``. (The ``attention``
    mixer with ``causal=False`` is the one exception: the ViT's bidirectional blocks, no ``step``.)"""
    return _register(MIXERS, "mixer", name)


def register_ffn(name: str) -> Callable:
    """Class decorator: ``cls(spec: LayerSpec, **ffn_kwargs)`` maps [B,T,D] -> [B,T,D] per token."""
    return _register(FFNS, "ffn", name)


def _build(table: dict, kind: str, name: str, spec: LayerSpec, kwargs: dict) -> nn.Module:
    if name not in table:
        raise ConfigError(f"unknown {kind} '{name}' (registered: {', '.join(sorted(table))})")
    check_options(f"{kind} '{name}'", table[name], kwargs)
    try:
        return table[name](spec, **kwargs)
    except TypeError as err:
        raise ConfigError(f"{kind} '{name}': bad {kind}_kwargs {kwargs}: {err}") from None


def build_mixer(name: str, spec: LayerSpec, kwargs: dict | None = None) -> nn.Module:
    return _build(MIXERS, "mixer", name, spec, kwargs or {})


def build_ffn(name: str, spec: LayerSpec, kwargs: dict | None = None) -> nn.Module:
    return _build(FFNS, "ffn", name, spec, kwargs or {})


def registered_names() -> tuple[list[str], list[str]]:
    """The sorted names of every mixer and every FFN, for help texts. Importing ``routemem.layers``
    is what registers them (each layer file registers itself), so this loads torch."""
    import routemem.layers  # noqa: F401  (registration side effect)

    return sorted(MIXERS), sorted(FFNS)
