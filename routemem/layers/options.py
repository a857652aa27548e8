"""Checks for layer options (``mixer_kwargs`` / ``ffn_kwargs``): a bad value is a ConfigError
that names the layer, the option and what it should be."""

from __future__ import annotations

import inspect
import math
import types
import typing

from routemem.errors import ConfigError


def check_int(owner: str, name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{owner}: {name} must be an int >= {low}, got {value!r}")
    return value


def check_positive(owner: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ConfigError(f"{owner}: {name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_fraction(owner: str, name: str, value) -> float:
    """A number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"{owner}: {name} must be a number in [0, 1), got {value!r}")
    return float(value)


def check_choice(owner: str, name: str, value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{owner}: {name} must be one of {choices}, got {value!r}")
    return value


def check_range(owner: str, name: str, value) -> tuple[float, float]:
    """A range (low, high) with 0 <= low <= high and 0 < high < inf (e.g. the one A is drawn from)."""
    ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not ok or not 0 <= value[0] <= value[1] or not 0 < value[1] < math.inf:
        raise ConfigError(f"{owner}: {name} must be (low, high) with 0 <= low <= high, 0 < high < inf, got {value!r}")
    return float(value[0]), float(value[1])


def check_mode(owner: str, mode, modes: tuple[str, ...]) -> str:
    return check_choice(owner, "mode", mode, modes)


_TYPE_NAMES = {int: "an int", float: "a number", bool: "true or false", str: "a string", type(None): "null"}


def _matches(value, tp) -> bool:
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in _TYPE_NAMES:
        return isinstance(value, tp)
    return True  # an annotation this check does not know: the layer's own checks decide


def check_options(owner: str, cls: type, options: dict) -> None:
    """Check ``mixer_kwargs`` / ``ffn_kwargs`` against the annotations of ``cls.__init__`` before the
    layer is built, so a typo or a wrong type is named (``window must be an int or null, got 'abc'``)
    instead of surfacing as a Python error from deep inside the constructor."""
    params = inspect.signature(cls.__init__).parameters
    known = [name for name in params if name not in ("self", "spec")]
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable annotations: fall back to the layer's own checks
        hints = {}
    for name, value in options.items():
        if name not in params or name in ("self", "spec"):
            if takes_any:
                continue
            raise ConfigError(f"{owner}: unknown option '{name}' (options: {', '.join(known) or 'none'})")
        tp = hints.get(name)
        if tp is None:
            continue
        allowed = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        if not any(_matches(value, t) for t in allowed):
            expected = " or ".join(_TYPE_NAMES.get(t, getattr(t, "__name__", str(t))) for t in allowed)
            raise ConfigError(f"{owner}: option {name} must be {expected}, got {value!r}")
