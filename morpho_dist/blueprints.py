"""Blueprint kinds and their parameter banks, with deterministic per-(layer, seed, generation) init.

A bank holds the parameters of every seed of one layer (its local shard) as two stacked tensors:
- ``lowrank``:  A[N, C, R], B[N, R, C];  u = act(x_c @ A_n) @ B_n
- ``diagonal``: g[N, C],    b[N, C];     u = g_n * x_c + b_n
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from morpho_dist.blends import Blend

KINDS = ("lowrank", "diagonal")
ACTIVATIONS = ("relu", "gelu_tanh")
LOWRANK_MIN_CHUNK = 16  # tl.dot needs every tile dimension >= 16


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not a blueprint kind; allowed values: {list(KINDS)}")


def check_act(act: str) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"act={act!r} is not supported; allowed values: {list(ACTIVATIONS)}")


def param_shapes(kind: str, num_seeds: int, chunk: int, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    check_kind(kind)
    if kind == "lowrank":
        return (num_seeds, chunk, rank), (num_seeds, rank, chunk)
    return (num_seeds, chunk), (num_seeds, chunk)


def init_generator_seed(base_seed: int, layer_key: str, seed_index: int, generation: int) -> int:
    """A 63-bit seed from (run seed, layer, global seed index, generation).

    Hashing a string (not Python's salted hash()) makes every rank and every resume draw the same values.
    """
    text = f"{base_seed}:{layer_key}:{seed_index}:{generation}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def initial_params(
    kind: str,
    chunk: int,
    rank: int,
    blend: int,
    *,
    base_seed: int,
    layer_key: str,
    seed_index: int,
    generation: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh fp32 CPU parameters of one seed, such that grafting it preserves the host function.

    lowrank: A ~ N(0, 1/C) from the (layer, seed, generation) generator, B = 0, so u = 0.
    diagonal: u = 0 (g = b = 0) for additive/multiplicative; identity (g = 1, b = 0) for linear.
    """
    check_kind(kind)
    if kind == "lowrank":
        gen = torch.Generator().manual_seed(init_generator_seed(base_seed, layer_key, seed_index, generation))
        a = torch.randn(chunk, rank, generator=gen, dtype=torch.float32) / chunk**0.5
        return a, torch.zeros(rank, chunk)
    gain = 1.0 if int(blend) == Blend.LINEAR else 0.0
    return torch.full((chunk,), gain), torch.zeros(chunk)


class BlueprintBank(nn.Module):
    """Parameters of every local seed of one layer, stacked along dim 0."""

    def __init__(
        self,
        kind: str,
        num_seeds: int,
        chunk: int,
        rank: int = 8,
        *,
        layer_key: str = "layer",
        base_seed: int = 0,
        seed_offset: int = 0,
    ) -> None:
        super().__init__()
        check_kind(kind)
        if kind == "lowrank" and chunk < LOWRANK_MIN_CHUNK:
            raise ValueError(
                f"kind='lowrank' needs chunk size C = H / N >= {LOWRANK_MIN_CHUNK}, got C={chunk}; "
                "use fewer seeds per layer or kind='diagonal'"
            )
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.kind, self.chunk, self.rank = kind, chunk, rank
        self.layer_key, self.base_seed, self.seed_offset = layer_key, base_seed, seed_offset
        s0, s1 = param_shapes(kind, num_seeds, chunk, rank)
        self.p0 = nn.Parameter(torch.zeros(s0))
        self.p1 = nn.Parameter(torch.zeros(s1))

    @property
    def num_seeds(self) -> int:
        return self.p0.shape[0]

    @torch.no_grad()
    def reinit_(self, local_index: int, generation: int, blend: int) -> None:
        """Re-draw the parameters of one local seed (on germination)."""
        p0, p1 = initial_params(
            self.kind,
            self.chunk,
            self.rank,
            blend,
            base_seed=self.base_seed,
            layer_key=self.layer_key,
            seed_index=self.seed_offset + local_index,
            generation=generation,
        )
        self.p0[local_index].copy_(p0)
        self.p1[local_index].copy_(p1)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, seeds={self.num_seeds}, chunk={self.chunk}, rank={self.rank}"
