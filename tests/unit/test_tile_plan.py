"""Tile planning of the seeded kernels (no device): grid sizes, amortised per-seed writes, tile caps."""

import pytest
import torch

from morpho_dist.kernels import launch
from morpho_dist.kernels.options import KernelOptions


@pytest.fixture
def h100(monkeypatch):
    """Plan as for a 132-multiprocessor device without needing one."""
    monkeypatch.setattr(launch, "_multiprocessors", lambda device: 132)
    launch.plan_tiles.cache_clear()
    yield torch.device("cuda")
    launch.plan_tiles.cache_clear()


def plan(device, kind, rows, seeds, chunk, rank=16, elem_size=4, **opts):
    return launch.plan_tiles(kind, rows, seeds, chunk, rank, KernelOptions(**opts), device, 2, elem_size)


@pytest.mark.parametrize("elem_size", [4, 2])
def test_wide_chunks_keep_the_configured_tile(h100, elem_size):
    cols = plan(h100, "lowrank", 8192, 256, 16, elem_size=elem_size).columns
    assert cols.block_t == 8 and cols.chunk_tile * cols.seeds_per_prog == 2 * 512 // elem_size
    assert cols.splits * cols.groups >= KernelOptions().programs_per_sm * 132 * 0.9  # about programs_per_sm per SM


@pytest.mark.parametrize("elem_size", [4, 2])
def test_narrow_chunks_trade_width_for_rows(h100, elem_size):
    """per-node (chunk 1): every program covers >= 256 rows of each of its seeds, with a tile of the same size."""
    cols = plan(h100, "diagonal", 1024, 4096, 1, elem_size=elem_size).columns
    default_tile = 8 * 2 * 512 // elem_size
    assert cols.rows_per_split >= 256
    assert cols.seeds_per_prog * cols.chunk_tile >= 64
    assert cols.block_t * cols.seeds_per_prog * cols.chunk_tile == default_tile
    assert cols.splits * cols.rows_per_split >= 1024 and cols.groups * cols.seeds_per_prog >= 4096


def test_explicit_width_is_kept_and_splits_are_still_capped(h100):
    cols = plan(h100, "diagonal", 1024, 4096, 1, block_cols=128, block_rows=4).columns
    assert (cols.block_t, cols.seeds_per_prog) == (4, 128)
    assert cols.rows_per_split >= 256


def test_lowrank_programs_cover_enough_rows_for_their_gradient_adds(h100):
    """coarse (chunk 256): the backward adds [C, R] + [R, C] per program; a program covers >= 16 R rows."""
    low = plan(h100, "lowrank", 8192, 16, 256).lowrank
    assert low.rows_per_split >= 16 * 16
    assert low.block_t * low.chunk_tile <= launch._MAX_LOWRANK_TILE_ELEMS


def test_lowrank_tile_rows_are_capped_by_the_rows(h100):
    low = plan(h100, "lowrank", 32, 1000, 64).lowrank
    assert (low.block_t, low.splits, low.rows_per_split) == (32, 1, 32)


@pytest.mark.parametrize(
    "chunk, precision, math, rank1",
    [
        (16, "ieee", "auto", True),  # exact fp32 either way: rank-1 updates are the faster
        (32, "ieee", "auto", True),
        (64, "ieee", "auto", False),  # wide chunks: the dots
        (16, "tf32", "auto", False),  # tf32 dots beat fp32 rank-1 updates
        (256, "tf32", "rank1", True),  # an explicit choice is kept
        (16, "ieee", "dots", False),
    ],
)
def test_lowrank_math_auto_picks_rank1_updates_for_narrow_exact_chunks(h100, chunk, precision, math, rank1):
    p = plan(h100, "lowrank", 4096, 64, chunk, dot_precision=precision, lowrank_math=math)
    assert p.rank1 is rank1
    assert plan(h100, "diagonal", 4096, 64, chunk, lowrank_math=math).rank1 is False
