"""SeedOptimizer: only trainable seeds move, per-seed Adam bias correction, reset of one seed's state."""

from __future__ import annotations

import math

import pytest
import torch

from morpho_dist.layer import SeededLayer
from morpho_dist.lifecycle import Stage
from morpho_dist.optim import SeedOptimizer


def _layer() -> SeededLayer:
    layer = SeededLayer(32, 2, kind="lowrank", rank=4, backend="reference", layer_key="l")
    with torch.no_grad():
        layer.bank.p0.normal_()
        layer.bank.p1.normal_()
    return layer


def _grads(layer: SeededLayer) -> None:
    for p in (layer.bank.p0, layer.bank.p1):
        p.grad = torch.ones_like(p)


def test_only_trainable_seeds_move_and_first_adam_step_is_lr():
    layer = _layer()
    layer.stage[0], layer.stage[1] = int(Stage.GRAFTING), int(Stage.FOSSILIZED)
    before = layer.bank.p0.detach().clone()
    opt = SeedOptimizer({"l": layer}, name="adamw", lr=0.1)
    _grads(layer)
    opt.step()
    after = layer.bank.p0.detach()
    assert torch.equal(after[1], before[1])  # frozen seed: untouched (no momentum, no weight decay)
    torch.testing.assert_close(before[0] - after[0], torch.full_like(before[0], 0.1), rtol=1e-4, atol=1e-6)


def test_reset_seed_restarts_bias_correction():
    layer = _layer()
    layer.stage[0] = layer.stage[1] = int(Stage.TRAINING)
    opt = SeedOptimizer({"l": layer}, name="adamw", lr=0.1)
    for _ in range(5):
        _grads(layer)
        opt.step()
    opt.reset_seed("l", 1)
    assert float(opt.state["l"]["t"][1]) == 0 and float(opt.state["l"]["t"][0]) == 5
    assert not opt.state["l"]["m_p0"][1].any() and opt.state["l"]["m_p0"][0].any()
    state = opt.state_dict()
    other = SeedOptimizer({"l": layer}, name="adamw", lr=0.1)
    other.load_state_dict(state)
    assert torch.equal(other.state["l"]["v_p1"], opt.state["l"]["v_p1"])


def test_sgd_momentum_masks_idle_seeds():
    layer = _layer()
    layer.stage[0] = int(Stage.FINE_TUNING)  # seed 1 stays DORMANT
    before = layer.bank.p1.detach().clone()
    opt = SeedOptimizer({"l": layer}, name="sgd", lr=0.5, momentum=0.0)
    _grads(layer)
    opt.step()
    torch.testing.assert_close(layer.bank.p1.detach()[0], before[0] - 0.5)
    assert torch.equal(layer.bank.p1.detach()[1], before[1])


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "fused-kernel"])
def test_sgd_momentum_through_a_skipped_step(fused):
    """momentum 0.9 (off the test above's 0): a skipped step (ok False, NaN gradients) leaves the momentum and
    the banks as they were, so the next step is p - lr * (0.9 * m + g) with the momentum of the step before it;
    the DORMANT seed never moves and keeps zero momentum."""
    layer = _layer()
    layer.stage[0] = int(Stage.FINE_TUNING)  # seed 1 stays DORMANT
    before = layer.bank.p1.detach().clone()
    opt = SeedOptimizer({"l": layer}, name="sgd", lr=0.5, momentum=0.9, fused=fused)
    yes, no = torch.tensor(True), torch.tensor(False)
    _grads(layer)
    opt.step(yes)  # m = 1, p -= 0.5
    for p in (layer.bank.p0, layer.bank.p1):
        p.grad = torch.full_like(p, float("nan"))
    opt.step(no)  # skipped: nothing moves
    torch.testing.assert_close(layer.bank.p1.detach()[0], before[0] - 0.5)
    _grads(layer)
    opt.step(yes)  # m = 0.9 * 1 + 1 = 1.9, p -= 0.5 * 1.9
    torch.testing.assert_close(layer.bank.p1.detach()[0], before[0] - 0.5 - 0.95)
    assert torch.isfinite(layer.bank.p0).all() and torch.isfinite(layer.bank.p1).all()
    assert torch.equal(layer.bank.p1.detach()[1], before[1])
    assert torch.equal(opt.state["l"]["m_p1"][1], torch.zeros_like(before[1]))
    torch.testing.assert_close(opt.state["l"]["m_p1"][0], torch.full_like(before[0], 1.9))


def _adam_moves(grads, lr, b1, b2, eps):
    """Hand-written Adam (per-seed bias correction): the total change of a parameter after these gradients."""
    m = v = 0.0
    total = 0.0
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        total += lr * (m / (1 - b1**t)) / (math.sqrt(v / (1 - b2**t)) + eps)
    return total


@pytest.mark.parametrize(
    "options,adam",
    [({}, (0.9, 0.999, 1e-8)), ({"betas": (0.5, 0.75), "eps": 0.5}, (0.5, 0.75, 0.5))],
    ids=["defaults", "off-defaults"],
)
def test_adam_two_steps_match_the_formula(options, adam):
    """Gradients 2 then -3 (not 1: g, g*g and g/g differ) on a TRAINING seed; the DORMANT seed stays."""
    layer = _layer()
    layer.stage[0] = int(Stage.TRAINING)
    before = [layer.bank.p0.detach().clone(), layer.bank.p1.detach().clone()]
    opt = SeedOptimizer({"l": layer}, name="adam", lr=0.1, **options)
    for g in (2.0, -3.0):
        for p in (layer.bank.p0, layer.bank.p1):
            p.grad = torch.full_like(p, g)
        opt.step()
    moved = _adam_moves([2.0, -3.0], 0.1, *adam)
    for b, p in zip(before, (layer.bank.p0, layer.bank.p1)):
        torch.testing.assert_close(b[0] - p.detach()[0], torch.full_like(b[0], moved), rtol=1e-5, atol=1e-7)
        assert torch.equal(p.detach()[1], b[1])


def test_name_and_lr_are_keyword_only():
    with pytest.raises(TypeError):
        SeedOptimizer({"l": _layer()}, "adamw", 0.1)


def test_sgd_default_momentum_is_0_9():
    layer = _layer()
    layer.stage[0] = int(Stage.TRAINING)
    before = layer.bank.p0.detach().clone()
    opt = SeedOptimizer({"l": layer}, name="sgd", lr=0.5)
    for _ in range(2):
        _grads(layer)
        opt.step()
    torch.testing.assert_close(before[0] - layer.bank.p0.detach()[0], torch.full_like(before[0], 0.5 * (1 + 1.9)))


def test_zero_grad_and_a_bank_without_gradient():
    """zero_grad drops both banks' gradients; a bank whose gradient is None is skipped (neither it nor its
    state moves) while the other bank steps."""
    layer = _layer()
    layer.stage[0] = int(Stage.TRAINING)
    opt = SeedOptimizer({"l": layer}, name="adamw", lr=0.1)
    _grads(layer)
    opt.zero_grad()
    assert layer.bank.p0.grad is None and layer.bank.p1.grad is None
    before = [layer.bank.p0.detach().clone(), layer.bank.p1.detach().clone()]
    layer.bank.p0.grad = torch.ones_like(layer.bank.p0)
    opt.step()
    assert not torch.equal(layer.bank.p0.detach()[0], before[0][0])
    assert torch.equal(layer.bank.p1.detach(), before[1]) and not opt.state["l"]["m_p1"].any()


@pytest.mark.parametrize(
    "case,fused_calls",
    [
        ("auto on cpu", 0),
        ("fused", 1),
        ("fused, ok", 1),
        ("fused=False", 0),
        ("fused, ok of 2 elements", 0),
        ("fused, a bank without gradient", 0),
        ("fused, a non-contiguous gradient", 0),
        ("fused, float64 banks", 0),
    ],
)
def test_fused_kernel_only_for_plain_float32_contiguous_banks(monkeypatch, case, fused_calls):
    """The one-launch kernel takes plain contiguous float32 banks with both gradients and a one-element ok;
    None picks it only for CUDA banks. Everything else takes the torch path."""
    import morpho_dist.kernels.seed_optim as seed_optim

    calls = []
    monkeypatch.setattr(seed_optim, "seed_step_", lambda *a, **k: calls.append(1))
    layer = _layer()
    if "float64" in case:
        layer.bank.double()
    layer.stage[0] = int(Stage.TRAINING)
    opt = SeedOptimizer({"l": layer}, name="adamw", lr=0.1, fused=None if "auto" in case else "=False" not in case)
    _grads(layer)
    if "without" in case:
        layer.bank.p1.grad = None
    if "non-contiguous" in case:
        layer.bank.p0.grad = torch.ones(layer.bank.p0.shape[::-1], dtype=layer.bank.p0.dtype).permute(2, 1, 0)
    ok = None
    if "ok" in case:
        ok = torch.tensor([True, True]) if "2 elements" in case else torch.tensor(True)
    opt.step(ok)
    assert len(calls) == fused_calls


def _host(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 2)


def _host_grads(model: torch.nn.Module, value: float) -> None:
    for p in model.parameters():
        p.grad = torch.full_like(p, value)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_guarded_step_commits_only_where_ok(kind):
    """A refused step (NaN gradients) leaves parameters and optimizer state as they were, including state the
    step would have created; committed steps equal torch's own steps on a twin that never saw the refused one."""
    from morpho_dist.optim import guarded_step

    make = {
        "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.1),
    }[kind]
    model, twin = _host(), _host()
    opt, twin_opt = make(model.parameters()), make(twin.parameters())
    start = [p.detach().clone() for p in model.parameters()]
    _host_grads(model, float("nan"))
    guarded_step(opt, torch.tensor(False))  # first step refused: the state it created reads as fresh (zeros)
    for p, s in zip(model.parameters(), start):
        assert torch.equal(p.detach(), s)
        assert all(not v.any() for v in opt.state[p].values() if torch.is_tensor(v))
    for g, ok in ((1.0, True), (float("nan"), False), (-2.0, True)):
        _host_grads(model, g)
        guarded_step(opt, torch.tensor(ok))
        if ok:
            _host_grads(twin, g)
            twin_opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.detach(), q.detach())
        for name, value in twin_opt.state[q].items():
            torch.testing.assert_close(opt.state[p][name], value)


def test_optimizers_step_zero_grad_reset_and_state_round_trip():
    from morpho_dist.optim import Optimizers

    layer = _layer()
    layer.stage[0] = int(Stage.TRAINING)
    host = _host()
    seeds = SeedOptimizer({"l": layer}, name="sgd", lr=0.5)
    opts = Optimizers(torch.optim.SGD(host.parameters(), lr=0.1, momentum=0.9), seeds)
    host_before = [p.detach().clone() for p in host.parameters()]
    bank_before = layer.bank.p0.detach().clone()
    _host_grads(host, 1.0)
    _grads(layer)
    opts.step(torch.tensor(False))  # refused: nothing moves
    assert all(torch.equal(p.detach(), b) for p, b in zip(host.parameters(), host_before))
    assert torch.equal(layer.bank.p0.detach(), bank_before)
    opts.step()  # no ok: both step
    assert all(torch.equal(p.detach(), b - 0.1) for p, b in zip(host.parameters(), host_before))
    torch.testing.assert_close(layer.bank.p0.detach()[0], bank_before[0] - 0.5)
    opts.step(torch.tensor(True))  # momentum 0.9: host moves 0.1 * 1.9, the seed 0.5 * 1.9
    torch.testing.assert_close(layer.bank.p0.detach()[0], bank_before[0] - 0.5 - 0.95)
    state = opts.state_dict()
    assert state["host"]["state"] and torch.equal(state["seeds"]["l"]["m_p0"][0], torch.full_like(bank_before[0], 1.9))
    opts.zero_grad()
    assert all(p.grad is None for p in host.parameters()) and layer.bank.p0.grad is None
    opts.reset_seed("l", 0)
    assert not opts.seeds.state["l"]["m_p0"].any()
    opts.load_state_dict(state)
    torch.testing.assert_close(opts.seeds.state["l"]["m_p0"][0], torch.full_like(bank_before[0], 1.9))
    assert opts.host.state_dict()["state"][0]["momentum_buffer"] is not None
    fresh = Optimizers(torch.optim.SGD(_host().parameters(), lr=0.1, momentum=0.9), None)
    fresh.load_state_dict(state)  # a host-only run restores the host part
    torch.testing.assert_close(fresh.host.state_dict()["state"][0]["momentum_buffer"], torch.full((2, 3), 1.9))
    empty = Optimizers(None, None)
    empty.zero_grad()
    empty.step(torch.tensor(True))
    empty.reset_seed("l", 0)
    assert empty.state_dict() == {"host": None, "seeds": None}
    empty.load_state_dict(state)  # nothing to restore into: a no-op


def _optim_cfg(**kw):
    from types import SimpleNamespace

    base = dict(name="adamw", weight_decay=0.0, betas=[0.9, 0.999], momentum=0.9, seed_lr_scale=1.0)
    return SimpleNamespace(**{**base, **kw})


def test_make_optimizers_splits_host_and_banks_and_scales_the_seed_lr():
    from morpho_dist.optim import make_optimizers

    layer = _layer()
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    model = torch.nn.ModuleDict({"fc": torch.nn.Linear(4, 4), "seeded": layer, "frozen": frozen})
    opts = make_optimizers(_optim_cfg(seed_lr_scale=0.25), 0.2, model, {"l": layer})
    host_ids = {id(p) for g in opts.host.param_groups for p in g["params"]}
    assert host_ids == {id(model["fc"].weight), id(model["fc"].bias)}  # no bank, no frozen parameter
    assert opts.seeds.lr == pytest.approx(0.05) and opts.seeds.name == "adamw"
    assert opts.host.param_groups[0]["lr"] == pytest.approx(0.2)
    assert make_optimizers(_optim_cfg(), 0.2, model, {}).seeds is None
    given = make_optimizers(_optim_cfg(), 0.2, model, {"l": layer}, params=[model["fc"].weight])
    assert [id(p) for g in given.host.param_groups for p in g["params"]] == [id(model["fc"].weight)]


def test_make_host_optimizer_kinds_and_options():
    from morpho_dist.optim import make_host_optimizer

    params = list(_host().parameters())
    sgd = make_host_optimizer(_optim_cfg(name="sgd", momentum=0.7, weight_decay=0.01), 0.3, params)
    assert type(sgd) is torch.optim.SGD
    assert (sgd.defaults["lr"], sgd.defaults["momentum"], sgd.defaults["weight_decay"]) == (0.3, 0.7, 0.01)
    adam = make_host_optimizer(_optim_cfg(name="adam", betas=[0.8, 0.9]), 0.3, params)
    assert type(adam) is torch.optim.Adam and adam.defaults["betas"] == (0.8, 0.9)
    assert adam.defaults["capturable"] is False and adam.defaults["fused"] in (None, False)
    adamw = make_host_optimizer(_optim_cfg(weight_decay=0.05), 0.3, params)
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["weight_decay"] == 0.05
    fused = make_host_optimizer(_optim_cfg(fused=True, foreach=None), 0.3, params)
    assert fused.defaults["fused"] is True
    foreach = make_host_optimizer(_optim_cfg(foreach=False), 0.3, params)
    assert foreach.defaults["foreach"] is False
    grouped = make_host_optimizer(_optim_cfg(), 0.3, [{"params": params[:1]}, params[1]])  # groups are flattened
    assert [len(g["params"]) for g in grouped.param_groups] == [2]
    with pytest.raises(ValueError, match=r"optim.fused=true works with optim.name in \['adamw', 'adam'\]"):
        make_host_optimizer(_optim_cfg(name="sgd", fused=True), 0.3, params)
    with pytest.raises(ValueError, match=r"optim.name='lion' is not known; allowed values: \['adamw', 'adam', 'sgd'\]"):
        make_host_optimizer(_optim_cfg(name="lion"), 0.3, params)


def test_host_param_groups_puts_plain_tensors_in_one_group_with_the_options():
    from morpho_dist.optim import host_param_groups

    params = list(_host().parameters())
    assert host_param_groups(params, lr=0.5) == [{"params": params, "lr": 0.5}]
    assert host_param_groups([]) == []
