"""The continual methods by name: ``METHODS``, ``list_methods``, ``method_options``, ``make_method``."""

from __future__ import annotations

import inspect

import torch

from routemem.errors import ConfigError
from routemem.models.vit import VisionTransformer
from routemem.train.continual.methods import Finetune, LinearProbe, Method
from routemem.train.continual.prompted import (
    CodaPromptMethod,
    DualPromptMethod,
    L2PMethod,
)
from routemem.train.continual.replay import ExperienceReplay
from routemem.train.continual.rwf import RwFMethod

# name -> factory(vit, n_classes, n_tasks, **options); each class carries its one-line description
METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (
    LinearProbe, Finetune, ExperienceReplay, L2PMethod, DualPromptMethod, CodaPromptMethod)}
METHODS[RwFMethod.name] = RwFMethod  # issue 14: Routing without Forgetting


def list_methods() -> dict[str, str]:
    """Method name -> one-line description."""
    return {name: cls.description for name, cls in METHODS.items()}


def _factory(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}' (choose from {', '.join(METHODS)})")
    return METHODS[name]


def method_options(name: str) -> dict:
    """The options of method ``name`` and their defaults (None: derived from the stream or model)."""
    params = inspect.signature(_factory(name)).parameters
    return {k: p.default for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def make_method(name: str, vit: VisionTransformer, n_classes: int, n_tasks: int, *, seed: int = 0,
                **options) -> Method:
    """Method ``name`` on a copy of ``vit`` (head re-initialised for ``n_classes``), for a stream of
    ``n_tasks`` tasks. Seeds torch's generator with ``seed`` first, so the fresh head and prompts
    are the same for the same seed. ``method.options`` records every option in force."""
    defaults = method_options(name)
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ConfigError(f"method '{name}' has no option {', '.join(map(repr, unknown))} "
                          f"(options: {', '.join(defaults)})")
    torch.manual_seed(seed)
    method = _factory(name)(vit, n_classes, n_tasks, **options)
    method.options = {**defaults, **options}
    return method
