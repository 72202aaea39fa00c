"""SeededLayer's prepared calls (morpho_dist.ops.prepared): checked and planned once per kind of call, then made
straight from the plans, with the same results as the checked functional op, and checked again whenever
anything the check depended on changes. CPU: the Triton kernels run in Triton's interpreter."""

from __future__ import annotations

import os

import pytest
import torch

import morpho_dist.ops.prepared as prepared
import morpho_dist.ops.validation as validation
from morpho_dist.kernels.options import KernelOptions
from morpho_dist.layer import SeededLayer
from morpho_dist.lifecycle import Stage
from morpho_dist.ops import seeded

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="CPU kernels need TRITON_INTERPRET=1")
DEVICES = [
    pytest.param("cpu", marks=needs_interpreter),
    pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(INTERPRET, reason="native GPU run needs TRITON_INTERPRET=0")]
    ),
]


def make_layer(live: bool, device: str = "cpu") -> SeededLayer:
    torch.manual_seed(0)
    layer = SeededLayer(64, 4, rank=4, backend="triton").to(device).train()
    if live:  # seed 1 GRAFTING (additive), seed 2 TRAINING (linear: rec_loss), seeds 0 and 3 DORMANT
        layer.germinate(1, step=0)
        layer.germinate(2, step=0, blend="linear")
        layer.apply_stage_changes([(1, Stage.TRAINING), (2, Stage.TRAINING)], step=0)
        layer.apply_stage_changes([(1, Stage.GRAFTING)], step=0)
        with torch.no_grad():
            layer.alpha[1] = 0.4
            layer.bank.p1.normal_(0, 0.3)
    return layer


def count_checks(monkeypatch) -> list:
    calls = []
    real = validation.check_seeded_args

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(validation, "check_seeded_args", counting)
    return calls


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("live", [False, True], ids=["dormant", "live"])
def test_prepared_calls_match_the_checked_op_bit_for_bit(live, device):
    layer = make_layer(live, device)
    layer.kernel = KernelOptions(deterministic=True)  # telemetry without float atomics: bit-identical run to run
    assert layer.known_idle() is not live
    gen = torch.Generator().manual_seed(3)
    tel = layer.telemetry.clone()
    for step in range(3):
        x = torch.randn(2, 5, 64, generator=gen).to(device)
        dy = torch.randn(2, 5, 64, generator=gen).to(device)
        xa = x.clone().requires_grad_()
        y = layer(xa)
        (torch.sum(y * dy) + 0.7 * layer.rec_loss).backward()
        p0 = layer.bank.p0.detach().clone().requires_grad_()
        p1 = layer.bank.p1.detach().clone().requires_grad_()
        xb = x.clone().requires_grad_()
        want, rec = seeded(
            xb, layer.stage, layer.blend, layer.alpha, p0, p1, tel, kind="lowrank", backend="triton",
            options=layer.kernel, all_idle=not live,
        )  # fmt: skip
        (torch.sum(want * dy) + 0.7 * rec).backward()
        assert torch.equal(y, want) and torch.equal(layer.rec_loss, rec), step
        assert torch.equal(xa.grad, xb.grad), step
        assert torch.equal(layer.bank.p0.grad, p0.grad) and torch.equal(layer.bank.p1.grad, p1.grad), step
        assert torch.equal(layer.telemetry, tel), step
        layer.bank.p0.grad = layer.bank.p1.grad = None
    if live:
        assert float(layer.rec_loss.detach()) > 0.0 and (layer.bank.p0.grad is None)


@needs_interpreter
def test_a_call_is_checked_once_and_again_when_its_kind_changes(monkeypatch):
    checks = count_checks(monkeypatch)
    layer = make_layer(live=False)
    x = torch.randn(6, 64)
    for _ in range(3):
        layer(x)
    assert len(checks) == 1, "the same kind of call is checked once"
    layer(torch.randn(7, 64))  # another shape
    layer(x.double().float().to(torch.bfloat16))  # another dtype
    layer.eval()
    layer(x)  # no telemetry
    layer.train()
    layer.germinate(0, step=0)
    layer.apply_stage_changes([(0, Stage.TRAINING)], step=0)  # the idle record changes: another promise
    layer(x)
    assert len(checks) == 5
    layer(torch.randn(7, 64))  # the shape seen before, under the new promise
    assert len(checks) == 6
    for _ in range(2):
        layer(x)
        layer(torch.randn(7, 64))
    assert len(checks) == 6, "every kind seen before is still prepared"
    layer.to(torch.float32)  # .to() puts new tensors in place: checked again
    layer(x)
    assert len(checks) == 7


@needs_interpreter
def test_a_bad_input_is_refused_after_good_calls():
    layer = make_layer(live=False)
    layer(torch.randn(4, 64))
    with pytest.raises(ValueError, match=r"p0 \(A\) must have shape \[N, C, R\] = \[4, 20, R\]"):
        layer(torch.randn(4, 80))  # H=80: chunk 20, which the layer's bank does not have
    with pytest.raises(ValueError, match=r"x has dtype torch.int64; allowed dtypes"):
        layer(torch.ones(4, 64, dtype=torch.long))


@needs_interpreter
def test_a_replaced_parameter_is_checked_again(monkeypatch):
    checks = count_checks(monkeypatch)
    layer = make_layer(live=False)
    x = torch.randn(4, 64)
    layer(x)
    with torch.no_grad():
        layer.bank.p1.data = torch.zeros(4, 3, 16)  # the same Parameter object, another shape
    with pytest.raises(ValueError, match=r"p1 \(B\) must have shape \[N, R, C\] = \[4, 4, 16\]"):
        layer(x)
    assert len(checks) == 2


@needs_interpreter
def test_calls_under_the_reference_backend_are_not_prepared(monkeypatch):
    layer = SeededLayer(64, 4, rank=4, backend="reference")
    layer(torch.randn(3, 64))
    (entry,) = layer._calls._entries.values()
    assert entry.call is None  # no prepared form: every call goes through ops.seeded
    assert isinstance(layer._calls, prepared.SeededCalls)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("live", [False, True], ids=["dormant", "live"])
def test_a_backward_without_the_rec_loss_matches_a_zero_rec_gradient(live, device):
    """rec_loss left out of the loss (with_rec_losses drops an idle layer's): the gradients are those of a zero
    rec_loss gradient."""
    layer = make_layer(live, device)
    x = torch.randn(7, 64, device=device)
    dy = torch.randn(7, 64, device=device)
    xa = x.clone().requires_grad_()
    torch.sum(layer(xa) * dy).backward()
    xb = x.clone().requires_grad_()
    (torch.sum(layer(xb) * dy) + 0.0 * layer.rec_loss).backward()
    assert torch.equal(xa.grad, xb.grad)


@needs_interpreter
def test_a_replaced_option_or_state_tensor_is_checked_again(monkeypatch):
    """The latest kind of call is matched field by field: a new configuration object or a state tensor put in
    place by assignment makes the next call checked (and planned) again, with what the layer holds now."""
    checks = count_checks(monkeypatch)
    layer = make_layer(live=False)
    x = torch.randn(4, 64)
    layer(x)
    layer.kernel = KernelOptions(block_rows=16)
    layer(x)
    layer.act = "gelu_tanh"
    layer(x)
    assert len(checks) == 3
    layer.alpha = torch.zeros(5)  # a registered buffer replaced: the new one is checked
    with pytest.raises(ValueError, match=r"alpha must have shape \[N\]=\[4\] like stage, got \(5,\)"):
        layer(x)
    layer.alpha = torch.zeros(4)
    layer(x)
    assert len(checks) == 5


@needs_interpreter
def test_a_parametrized_bank_gives_its_computed_parameter_to_the_op():
    """Where the bank's parameter is not in its registry (torch.nn.utils.parametrize), the layer reads it by
    attribute: the op sees the parametrization's value, not a stale tensor."""
    from torch.nn.utils import parametrize

    class Doubled(torch.nn.Module):
        def forward(self, p):
            return 2.0 * p

    layer = make_layer(live=True)
    x = torch.randn(5, 64)
    want = seeded(
        x, layer.stage, layer.blend, layer.alpha, layer.bank.p0, 2.0 * layer.bank.p1.detach(), None, kind="lowrank",
        backend="triton", options=layer.kernel,
    )[0]  # fmt: skip
    parametrize.register_parametrization(layer.bank, "p1", Doubled())
    layer.eval()
    assert torch.equal(layer(x), want)


def test_the_custom_ops_config_carries_kind_act_promise_and_every_option():
    """torch.compile's path passes kind, act, all_idle and the kernel options to the custom ops as one int list;
    decoding it gives back what was encoded, for options that differ from the defaults in every field."""
    from morpho_dist.ops.triton_op import _config, _decoded

    opts = KernelOptions(
        block_rows=16, block_cols=64, num_warps=4, deterministic=True, dot_precision="tf32", bwd_num_warps=8,
        autotune=True, lowrank_rows=32, lowrank_warps=8, programs_per_sm=3, lowrank_math="rank1", overlap=False,
    )  # fmt: skip
    assert all(getattr(opts, f) != getattr(KernelOptions(), f) for f in KernelOptions.__dataclass_fields__)
    for kind, act, all_idle, options in (("diagonal", "gelu_tanh", True, opts), ("lowrank", "relu", False, None)):
        options = options or KernelOptions()
        config = _config(kind, act, all_idle, options)
        assert all(type(v) is int for v in config)
        assert _decoded(tuple(config)) == (kind, act, all_idle, options)
