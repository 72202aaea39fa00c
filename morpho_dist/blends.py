"""Blend strategies: blend(x, u, alpha) per seed. Their ids are the kernels' math ids (DESIGN.md section 2), read
by the kernels, the PyTorch reference and the SeededLayer; the alpha schedules live in ``schedules``."""

from __future__ import annotations

import enum


class Blend(enum.IntEnum):
    """blend(x, u, alpha) per seed; ids are stable and read by the kernels."""

    ADDITIVE = 0  # x + alpha * u
    MULTIPLICATIVE = 1  # x * (1 + alpha * tanh(u))
    LINEAR = 2  # (1 - alpha) * x + alpha * u


NUM_BLENDS = len(Blend)
BLEND_NAMES = tuple(b.name.lower() for b in Blend)


def blend_id(name: str) -> int:
    """Map a config name ('additive', 'multiplicative', 'linear') to its kernel id."""
    try:
        return int(Blend[name.upper()])
    except KeyError:
        raise ValueError(f"grafting blend {name!r} is not known; allowed values: {list(BLEND_NAMES)}") from None
