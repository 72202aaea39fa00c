"""Launch options of the seeded kernels (the Hydra `kernel` group maps onto this)."""

from __future__ import annotations

from dataclasses import dataclass

DOT_PRECISIONS = ("ieee", "tf32")


def _is_pow2(v: int) -> bool:
    return isinstance(v, int) and v > 0 and (v & (v - 1)) == 0


@dataclass(frozen=True)
class KernelOptions:
    block_rows: int = 32  # rows per tile
    block_cols: int = 64  # features per tile (several seeds when the chunk is narrower)
    num_warps: int = 2  # few warps per program: the per-tile column sums stay inside a warp
    deterministic: bool = False  # True: no float atomics on the result path (bit-identical run to run)
    dot_precision: str = "ieee"  # fp32 tl.dot precision for lowrank
    bwd_num_warps: int = 4  # the backward runs five dots per tile and wants more warps than the forward

    def __post_init__(self) -> None:
        for name in ("block_rows", "block_cols", "num_warps", "bwd_num_warps"):
            v = getattr(self, name)
            if not _is_pow2(v):
                raise ValueError(f"kernel.{name} must be a power of two, got {v!r}")
        if self.block_rows < 16:
            raise ValueError(f"kernel.block_rows must be >= 16 (tl.dot tiles), got {self.block_rows}")
        for name in ("num_warps", "bwd_num_warps"):
            if getattr(self, name) > 32:
                raise ValueError(f"kernel.{name} must be one of [1, 2, 4, 8, 16, 32], got {getattr(self, name)}")
        if self.dot_precision not in DOT_PRECISIONS:
            raise ValueError(f"kernel.dot_precision must be one of {list(DOT_PRECISIONS)}, got {self.dot_precision!r}")
