"""Blueprints: function-preserving init, deterministic draws, bank checks."""

import os
import subprocess
import sys

import pytest
import torch

from morpho_dist.blends import Blend, blend_id
from morpho_dist.blueprints import (
    BlueprintBank,
    init_generator_seed,
    initial_params,
    param_shapes,
)
from morpho_dist.layer import SeededLayer
from morpho_dist.lifecycle import Stage
from morpho_dist.ops.reference import blueprint_output


def _u(kind, p0, p1, xc, act="relu"):
    return blueprint_output(kind, xc, p0[None], p1[None], act)


@pytest.mark.parametrize("blend", list(Blend))
def test_lowrank_init_is_zero_output(blend):
    a, b = initial_params("lowrank", 16, 4, blend, base_seed=0, layer_key="l", seed_index=3, generation=1)
    assert a.shape == (16, 4) and b.shape == (4, 16)
    assert a.dtype == torch.float32 and b.dtype == torch.float32
    assert torch.equal(b, torch.zeros(4, 16))
    assert a.abs().sum() > 0  # A is a real random draw
    # A ~ N(0, 1/C): a loose check that the scale is right.
    assert 0.02 < a.var().item() < 0.2
    xc = torch.randn(5, 1, 16)
    for act in ("relu", "gelu_tanh"):
        assert torch.equal(_u("lowrank", a, b, xc, act), torch.zeros(5, 1, 16))


@pytest.mark.parametrize("blend", [Blend.ADDITIVE, Blend.MULTIPLICATIVE])
def test_diagonal_init_additive_multiplicative_is_zero(blend):
    g, b = initial_params("diagonal", 8, 0, blend, base_seed=0, layer_key="l", seed_index=0, generation=1)
    assert torch.equal(g, torch.zeros(8)) and torch.equal(b, torch.zeros(8))


def test_diagonal_init_linear_is_identity():
    g, b = initial_params("diagonal", 8, 0, Blend.LINEAR, base_seed=0, layer_key="l", seed_index=0, generation=1)
    assert torch.equal(g, torch.ones(8)) and torch.equal(b, torch.zeros(8))
    xc = torch.randn(5, 1, 8)
    assert torch.equal(_u("diagonal", g, b, xc), xc)


@pytest.mark.parametrize(
    ("kind", "blend"),
    [
        ("lowrank", "additive"),
        ("lowrank", "multiplicative"),
        ("diagonal", "additive"),
        ("diagonal", "multiplicative"),
        ("diagonal", "linear"),
    ],
)
@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_germinated_seed_grafts_without_changing_the_function(kind, blend, alpha):
    torch.manual_seed(0)
    layer = SeededLayer(64, 4, kind=kind, rank=4, blend=blend, backend="reference", base_seed=5)
    x = torch.randn(3, 7, 64)
    for i in range(4):
        layer.germinate(i, step=0)
        layer.apply_stage_changes([(i, Stage.TRAINING)], step=1)
        layer.apply_stage_changes([(i, Stage.GRAFTING)], step=2)
    layer.alpha.fill_(alpha)
    y = layer(x)
    if blend == "linear" and alpha != 1.0:
        torch.testing.assert_close(y, x)  # (1 - a) x + a x: equal up to rounding
    else:
        assert torch.equal(y, x)


def test_init_is_deterministic_and_keyed():
    kw = dict(base_seed=7, layer_key="enc.3", seed_index=11, generation=2)
    a1, _ = initial_params("lowrank", 32, 8, 0, **kw)
    a2, _ = initial_params("lowrank", 32, 8, 0, **kw)
    assert torch.equal(a1, a2)
    for change in ({"base_seed": 8}, {"layer_key": "enc.4"}, {"seed_index": 12}, {"generation": 3}):
        a3, _ = initial_params("lowrank", 32, 8, 0, **{**kw, **change})
        assert not torch.equal(a1, a3), change
    # The draw does not depend on (or disturb) the global RNG.
    torch.manual_seed(1)
    a4, _ = initial_params("lowrank", 32, 8, 0, **kw)
    r1 = torch.rand(3)
    torch.manual_seed(1)
    r2 = torch.rand(3)
    assert torch.equal(a1, a4) and torch.equal(r1, r2)


def test_init_generator_seed_range():
    s = init_generator_seed(0, "layer", 0, 0)
    assert isinstance(s, int) and 0 <= s < 2**63


_CHILD = """
import sys, torch
from morpho_dist.blueprints import init_generator_seed, initial_params
a, _ = initial_params("lowrank", 16, 4, 0, base_seed=3, layer_key="blocks.2.attn", seed_index=5, generation=4)
print(init_generator_seed(3, "blocks.2.attn", 5, 4))
print(repr(a.flatten().tolist()))
"""


def test_init_is_identical_across_processes():
    """Hash-based seeds (not Python's salted hash()): two processes with different hash seeds agree."""
    outs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        res = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True)
        outs.append(res.stdout)
    assert outs[0] == outs[1]
    a, _ = initial_params("lowrank", 16, 4, 0, base_seed=3, layer_key="blocks.2.attn", seed_index=5, generation=4)
    seed_line, values_line = outs[0].splitlines()
    assert int(seed_line) == init_generator_seed(3, "blocks.2.attn", 5, 4)
    assert values_line == repr(a.flatten().tolist())


def test_bank_shapes_and_reinit():
    bank = BlueprintBank("lowrank", 3, 16, 4, layer_key="k", base_seed=1, seed_offset=6)
    assert bank.p0.shape == (3, 16, 4) and bank.p1.shape == (3, 4, 16)
    assert param_shapes("diagonal", 3, 5, 99) == ((3, 5), (3, 5))
    bank.reinit_(1, generation=1, blend=0)
    expect, _ = initial_params("lowrank", 16, 4, 0, base_seed=1, layer_key="k", seed_index=7, generation=1)
    assert torch.equal(bank.p0[1].detach(), expect)  # global seed index = seed_offset + local index
    assert torch.equal(bank.p0[0].detach(), torch.zeros(16, 4))


@pytest.mark.parametrize("chunk", [1, 8, 15])
def test_bank_refuses_lowrank_small_chunk(chunk):
    with pytest.raises(ValueError, match=r"C >= 16|>= 16") as info:
        BlueprintBank("lowrank", 4, chunk, 4)
    assert f"C={chunk}" in str(info.value)
    BlueprintBank("diagonal", 4, chunk)  # diagonal works with any chunk, also 1


def test_bank_refuses_bad_kind_and_rank():
    with pytest.raises(ValueError, match=r"allowed values: \['lowrank', 'diagonal'\]"):
        BlueprintBank("dense", 4, 16)
    with pytest.raises(ValueError, match="rank"):
        BlueprintBank("lowrank", 4, 16, 0)


def test_blend_ids():
    assert [int(b) for b in Blend] == [0, 1, 2]
    assert blend_id("additive") == 0 and blend_id("multiplicative") == 1 and blend_id("linear") == 2
    assert blend_id("Linear") == 2
    with pytest.raises(ValueError, match=r"allowed values: \['additive', 'multiplicative', 'linear'\]"):
        blend_id("concat")
