"""Checks for layer options (``mixer_kwargs`` / ``ffn_kwargs``): a bad value is a ConfigError
that names the layer, the option and what it should be."""

from __future__ import annotations

import math

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


def check_mode(owner: str, mode, modes: tuple[str, ...]) -> str:
    return check_choice(owner, "mode", mode, modes)
