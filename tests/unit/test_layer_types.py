"""Every supported layer type: with every seed idle, the wrapped model's outputs and gradients are bit-identical
(torch.equal, same strides) to the unwrapped model's; the registration of another type; folding per type."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import morpho_dist
from morpho_dist.layer_types import LayerType, fold_affine, layer_type_of, register_layer_type
from morpho_dist.lifecycle import Stage
from morpho_dist.wrap import SeededOutput, export, seeded_layers, wrap


def _hf_conv1d(nf: int, nx: int) -> nn.Module:
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    return pytorch_utils.Conv1D(nf, nx)


# name -> (target, follower, input shape, memory format of model and input). The follower is the same kind of
# layer, so that a change of the target output's layout would change what it computes.
TYPES = {
    "linear": (lambda: nn.Linear(12, 32), lambda: nn.Linear(32, 8), (5, 12), None),
    "linear_3d": (lambda: nn.Linear(12, 32), lambda: nn.Linear(32, 8), (2, 5, 12), None),
    "conv1d": (lambda: nn.Conv1d(3, 32, 3, padding=1), lambda: nn.Conv1d(32, 8, 3), (2, 3, 9), None),
    "conv1d_unbatched": (lambda: nn.Conv1d(3, 32, 3, padding=1), lambda: nn.Conv1d(32, 8, 3), (3, 9), None),
    "conv2d": (lambda: nn.Conv2d(3, 32, 3, padding=1), lambda: nn.Conv2d(32, 8, 3), (2, 3, 6, 5), None),
    "conv2d_channels_last": (
        lambda: nn.Conv2d(3, 32, 3, padding=1),
        lambda: nn.Conv2d(32, 8, 3),
        (2, 3, 6, 5),
        torch.channels_last,
    ),
    "conv3d": (lambda: nn.Conv3d(2, 32, 3, padding=1), lambda: nn.Conv3d(32, 4, 3), (2, 2, 4, 3, 5), None),
    "conv3d_channels_last": (
        lambda: nn.Conv3d(2, 32, 3, padding=1),
        lambda: nn.Conv3d(32, 4, 3),
        (2, 2, 4, 3, 5),
        torch.channels_last_3d,
    ),
    "hf_conv1d": (lambda: _hf_conv1d(32, 12), lambda: _hf_conv1d(8, 32), (2, 5, 12), None),
}

IDLE = {
    "dormant": (Stage.DORMANT, Stage.DORMANT),  # the layer knows it is idle (its idle record holds)
    "germinated_culled": (Stage.GERMINATED, Stage.CULLED),  # written directly: the op finds out on the device
    "cancelled_rolled_back": (Stage.CANCELLED, Stage.ROLLED_BACK),
}


def _pair(type_name: str, kind: str, stages, backend: str = "reference"):
    make_target, make_follower, shape, fmt = TYPES[type_name]
    torch.manual_seed(0)
    host = nn.Sequential(make_target(), nn.GELU(), make_follower())
    if fmt is not None:
        host = host.to(memory_format=fmt)
    wrapped = wrap(copy.deepcopy(host), dict(targets=["0"], per_layer=2, kind=kind, rank=4), backend=backend)
    layer = seeded_layers(wrapped)["0"]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # banks far from their init: an idle seed must not use them
        layer.bank.p0.copy_(torch.randn(layer.bank.p0.shape, generator=gen))
        layer.bank.p1.copy_(torch.randn(layer.bank.p1.shape, generator=gen))
        for i, stage in enumerate(stages):
            layer.stage[i] = int(stage)
            layer.alpha[i] = 0.5
    if all(s == Stage.DORMANT for s in stages):
        layer.refresh_idle_record()
    x = torch.randn(shape, generator=gen)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    return host, wrapped, x


def _run(model: nn.Module, x: torch.Tensor, gy_seed: int = 2):
    x = x.detach().clone().requires_grad_()
    y = model(x)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(gy_seed))
    y.backward(gy)
    host_grads = [p.grad for n, p in model.named_parameters() if ".bank." not in n]
    return y, x.grad, host_grads


def _assert_bit_identical(host, wrapped, x):
    y0, dx0, g0 = _run(host, x)
    y1, dx1, g1 = _run(wrapped, x)
    assert torch.equal(y0, y1) and y0.stride() == y1.stride()
    assert torch.equal(dx0, dx1) and dx0.stride() == dx1.stride()
    assert len(g0) == len(g1)
    for a, b in zip(g0, g1):
        assert torch.equal(a, b) and a.stride() == b.stride()


@pytest.mark.parametrize("idle", list(IDLE))
@pytest.mark.parametrize("kind", ["lowrank", "diagonal"])
@pytest.mark.parametrize("type_name", list(TYPES))
def test_idle_seeds_are_bit_identical_per_layer_type(type_name, kind, idle):
    host, wrapped, x = _pair(type_name, kind, IDLE[idle])
    assert isinstance(wrapped[0], SeededOutput)
    _assert_bit_identical(host, wrapped, x)  # training mode: telemetry is gathered on the way
    assert float(seeded_layers(wrapped)["0"].telemetry[:, 0].sum()) > 0
    _assert_bit_identical(host.eval(), wrapped.eval(), x)


@pytest.mark.parametrize("type_name", ["linear_3d", "conv2d_channels_last", "hf_conv1d"])
def test_idle_seeds_are_bit_identical_on_the_triton_backend(type_name):
    host, wrapped, x = _pair(type_name, "lowrank", IDLE["germinated_culled"], backend="triton")
    _assert_bit_identical(host, wrapped, x)


class Scale(nn.Module):
    """A layer type the project does not know: y = x * w + b over the LAST dim but one ([..., F, L] inputs)."""

    def __init__(self, features: int, bias: bool = True) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(features))
        self.b = nn.Parameter(torch.randn(features)) if bias else None

    def forward(self, x):
        y = x * self.w[:, None]
        return y if self.b is None else y + self.b[:, None]


def test_registered_layer_type_is_seeded_idle_exact_and_folded():
    host = nn.Sequential(nn.Linear(4, 4), Scale(16))
    with pytest.raises(ValueError, match="Scale"):
        wrap(copy.deepcopy(host), dict(targets=["1"]), backend="reference")
    register_layer_type(Scale, LayerType(features=lambda m: m.w.numel(), feature_dim=-2, fold=fold_affine("w", "b")))
    assert layer_type_of(Scale(3)) is not None
    wrapped = wrap(copy.deepcopy(host), dict(targets=["1"], per_layer=4, kind="diagonal"), backend="reference")
    x = torch.randn(3, 16, 4)
    _assert_bit_identical(host, wrapped, x)
    layer = seeded_layers(wrapped)["1"]
    with torch.no_grad():
        layer.bank.p0.normal_()
        layer.bank.p1.normal_()
        layer.stage.fill_(int(Stage.FOSSILIZED))
        layer.alpha.fill_(0.75)
        layer.blend.copy_(torch.tensor([0, 2, 0, 2], dtype=torch.int8))  # additive and linear: all fold
        want = wrapped.eval()(x)
    plain = export(wrapped)
    assert type(plain[1]) is Scale  # merged into w and b: the module itself, no seed modules
    with torch.no_grad():
        torch.testing.assert_close(plain(x), want, rtol=0, atol=1e-6)


def test_register_layer_type_refuses_what_is_not_a_module_type():
    with pytest.raises(ValueError, match="nn.Module subclass"):
        register_layer_type(int, LayerType(features=lambda m: 1))
    with pytest.raises(ValueError, match="LayerType"):
        morpho_dist.register_layer_type(Scale, {"features": 1})


# (blend, alpha, g, b) -> the per-feature (scale, shift) the fold must apply, by hand:
# additive y + a(g y + b) = (1 + a g) y + a b;  linear (1 - a) y + a(g y + b) = (1 - a + a g) y + a b
FOLD_TABLE = [
    (0, 0.5, 2.0, 1.0, 2.0, 0.5),
    (0, 1.0, -1.0, 0.0, 0.0, 0.0),
    (2, 0.25, 3.0, -2.0, 1.5, -0.5),
    (2, 1.0, 0.5, 4.0, 0.5, 4.0),
]


@pytest.mark.parametrize("type_name", ["linear", "conv1d", "conv2d_channels_last", "conv3d", "hf_conv1d"])
@pytest.mark.parametrize("blend,alpha,g,b,scale,shift", FOLD_TABLE)
def test_fold_per_layer_type_matches_the_hand_table(type_name, blend, alpha, g, b, scale, shift):
    make_target, _, shape, fmt = TYPES[type_name]
    torch.manual_seed(0)
    target = make_target()
    if fmt is not None:
        target = target.to(memory_format=fmt)
    wrapped = wrap(nn.Sequential(copy.deepcopy(target)), dict(targets=["0"], per_layer=2, kind="diagonal"))
    layer = seeded_layers(wrapped)["0"]
    with torch.no_grad():
        layer.bank.p0[1].fill_(g)
        layer.bank.p1[1].fill_(b)
        layer.stage[1], layer.alpha[1], layer.blend[1] = int(Stage.FOSSILIZED), alpha, blend
    merged = export(wrapped)[0]
    assert type(merged) is type(target)
    x = torch.randn(shape)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
        assert merged.weight.is_contiguous(memory_format=fmt)
    with torch.no_grad():
        y, got = target(x), merged(x)
    dim = layer_type_of(target).dim_of(target)
    y, got = y.movedim(dim, -1), got.movedim(dim, -1)
    torch.testing.assert_close(got[..., :16], y[..., :16], rtol=0, atol=0)  # seed 0 is DORMANT: untouched
    torch.testing.assert_close(got[..., 16:], scale * y[..., 16:] + shift, rtol=1e-6, atol=1e-6)


def test_fold_without_bias_takes_scale_only_seeds_and_keeps_shifted_ones():
    torch.manual_seed(0)
    wrapped = wrap(nn.Sequential(nn.Linear(8, 32, bias=False)), dict(targets=["0"], per_layer=2, kind="diagonal"))
    layer = seeded_layers(wrapped)["0"]
    with torch.no_grad():
        layer.bank.p0.fill_(0.5)
        layer.bank.p1[0].fill_(0.0)  # seed 0: a scale only -> folds
        layer.bank.p1[1].fill_(1.0)  # seed 1: a shift, and no bias to take it -> stays a module
        layer.stage.fill_(int(Stage.FOSSILIZED))
        layer.alpha.fill_(1.0)
    plain = export(wrapped)
    assert [(s.start, s.end) for s in plain[0].seeds] == [(16, 32)]
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), wrapped.eval()(x), rtol=0, atol=1e-6)


def test_tied_weights_are_not_folded():
    torch.manual_seed(0)
    tied = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    tied[1].weight = tied[0].weight  # like GPT-2's lm_head and its embedding: folding one would change both
    wrap(tied, dict(targets=["1"], per_layer=1, kind="diagonal"))
    layer = seeded_layers(tied)["1"]
    with torch.no_grad():
        layer.bank.p0.fill_(0.5)
        layer.stage.fill_(int(Stage.FOSSILIZED))
        layer.alpha.fill_(1.0)
    before = tied[0].weight.detach().clone()
    plain = export(tied)
    assert len(plain[1].seeds) == 1 and plain[0].weight is plain[1].original.weight
    assert torch.equal(plain[0].weight, before)
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), tied.eval()(x), rtol=0, atol=1e-6)


def _hf_models():
    transformers = pytest.importorskip("transformers")
    llama = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    gpt2 = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    return {
        "llama": (lambda: transformers.LlamaForCausalLM(llama), r".*(proj|lm_head)", r".*mlp\..*"),
        "gpt2": (lambda: transformers.GPT2LMHeadModel(gpt2), r".*(c_attn|c_proj|c_fc|lm_head)", r".*mlp\..*"),
    }


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_idle_transformers_models_are_bit_identical(name):
    """Every projection of a transformers Llama / GPT-2 seeded (diagonal; lowrank on the MLPs), every seed idle:
    logits and every host gradient are torch.equal to the unwrapped model's (dropout drawing the same masks)."""
    make, everything, mlp = _hf_models()[name]
    torch.manual_seed(0)
    host = make()
    wrapped = copy.deepcopy(host)
    wrap(wrapped, dict(targets=everything, exclude=mlp, per_layer=2, kind="diagonal"), backend="reference")
    wrap(wrapped, dict(targets=mlp, per_layer=2, kind="lowrank", rank=4), backend="reference")
    assert len(seeded_layers(wrapped)) == (15 if name == "llama" else 9)
    tokens = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    results = []
    for model in (host, wrapped):
        torch.manual_seed(2)
        logits = model(tokens).logits
        logits.backward(torch.randn(logits.shape, generator=torch.Generator().manual_seed(3)))
        results.append((logits, [p.grad for n, p in model.named_parameters() if ".bank." not in n]))
    (y0, g0), (y1, g1) = results
    assert torch.equal(y0, y1) and len(g0) == len(g1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
