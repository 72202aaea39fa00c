"""Launch options of the seeded kernels (the Hydra `kernel` group maps onto this)."""

from __future__ import annotations

from dataclasses import dataclass

DOT_PRECISIONS = ("ieee", "tf32")
LOWRANK_MATHS = ("auto", "dots", "rank1")


def _is_pow2(v: int) -> bool:
    return isinstance(v, int) and v > 0 and (v & (v - 1)) == 0


@dataclass(frozen=True)
class KernelOptions:
    """Tiles and warps of the seeded kernels.

    The column kernels (every seed of a diagonal layer, the idle seeds of a lowrank one) walk
    [block_rows, block_cols] tiles with num_warps (bwd_num_warps backward); block_cols=0 (the default) sizes the
    tile so that each warp covers 512 contiguous bytes of a row (num_warps * 512 / element size columns), which
    keeps the per-seed row sums of the telemetry inside each thread; for narrow chunks (a program must cover 256
    elements of each of its seeds) it trades width for rows, at the same tile size. The lowrank
    kernels (the TRAINING and blended seeds of a lowrank layer) walk [lowrank_rows, chunk] tiles with
    lowrank_warps, and run the blueprint as tensor-core dots or as fp32 rank-1 updates (lowrank_math; the
    parameter gradients of trainable seeds always run as dots). auto: rank-1 updates for chunks up to 32 with
    dot_precision=ieee (both exact fp32; the rank-1 updates are faster there), dots otherwise. With overlap (on a
    CUDA device) the lowrank kernels run on a side stream, at the same time as the column kernels.
    """

    block_rows: int = 8  # rows per column-kernel tile
    block_cols: int = 0  # features per column-kernel tile (several seeds when the chunk is narrower); 0: auto
    num_warps: int = 2
    deterministic: bool = False  # True: no float atomics on the result path (bit-identical run to run)
    dot_precision: str = "ieee"  # fp32 tl.dot precision for lowrank
    bwd_num_warps: int = 2
    autotune: bool = False  # True: time a few tilings per shape on first use and keep the fastest (per process)
    lowrank_rows: int = 128  # rows per lowrank-kernel tile (>= 16: tl.dot; fewer when the chunk is wide)
    lowrank_warps: int = 4
    programs_per_sm: int = 4  # grid size of the column kernels: about this many programs per multiprocessor
    lowrank_math: str = "auto"  # auto | dots | rank1
    overlap: bool = True  # CUDA: lowrank kernels on a side stream, concurrent with the column kernels

    def __post_init__(self) -> None:
        for name in ("block_rows", "block_cols", "num_warps", "bwd_num_warps", "lowrank_rows", "lowrank_warps"):
            v = getattr(self, name)
            if not (_is_pow2(v) or (name == "block_cols" and v == 0 and isinstance(v, int))):
                extra = " (or 0 for auto)" if name == "block_cols" else ""
                raise ValueError(f"kernel.{name} must be a power of two{extra}, got {v!r}")
        if self.lowrank_rows < 16:
            raise ValueError(f"kernel.lowrank_rows must be >= 16 (tl.dot tiles), got {self.lowrank_rows}")
        for name in ("num_warps", "bwd_num_warps", "lowrank_warps"):
            if getattr(self, name) > 32:
                raise ValueError(f"kernel.{name} must be one of [1, 2, 4, 8, 16, 32], got {getattr(self, name)}")
        if not (isinstance(self.programs_per_sm, int) and 1 <= self.programs_per_sm <= 64):
            raise ValueError(f"kernel.programs_per_sm must be an integer in [1, 64], got {self.programs_per_sm!r}")
        if self.dot_precision not in DOT_PRECISIONS:
            raise ValueError(f"kernel.dot_precision must be one of {list(DOT_PRECISIONS)}, got {self.dot_precision!r}")
        if self.lowrank_math not in LOWRANK_MATHS:
            raise ValueError(f"kernel.lowrank_math must be one of {list(LOWRANK_MATHS)}, got {self.lowrank_math!r}")
        for name in ("deterministic", "autotune", "overlap"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"kernel.{name} must be a boolean (true or false), got {getattr(self, name)!r}")
