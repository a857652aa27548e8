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
# kind ("mixer" | "ffn") -> name -> {variant name: kwargs}: the configurations of a layer that run
# different code (a mode, a form). Tests that cover every registered layer (torch.compile against
# eager, ...) build each one, so a new layer or mode is covered by registering it.
VARIANTS: dict[str, dict[str, dict[str, dict]]] = {"mixer": {}, "ffn": {}}


def _register(table: dict, kind: str, name: str, variants: dict[str, dict] | None) -> Callable:
    def decorator(cls):
        if name in table and table[name] is not cls:
            raise ValueError(f"{kind} '{name}' is already registered by {table[name].__qualname__}")
        table[name] = cls
        VARIANTS[kind][name] = {"default": {}, **(variants or {})}
        return cls

    return decorator


def register_mixer(name: str, variants: dict[str, dict] | None = None) -> Callable:
    """Class decorator: ``cls(spec: LayerSpec, **mixer_kwargs)`` maps [B,T,D] -> [B,T,D] causally,
    and has ``step(x_t [B,D], state) -> (y_t, state)`` and ``state_size()``. (The ``attention``
    mixer with ``causal=False`` is the one exception: the ViT's bidirectional blocks, no ``step``.)
    ``variants``: {name: mixer_kwargs} for each configuration that runs other code than the
    default (``VARIANTS``); the default configuration is always one."""
    return _register(MIXERS, "mixer", name, variants)


def register_ffn(name: str, variants: dict[str, dict] | None = None) -> Callable:
    """Class decorator: ``cls(spec: LayerSpec, **ffn_kwargs)`` maps [B,T,D] -> [B,T,D] per token.
    ``variants`` as for ``register_mixer``."""
    return _register(FFNS, "ffn", name, variants)


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
