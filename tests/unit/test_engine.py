"""The public engine, morpho_dist.Morphogenesis: config arguments, misuse errors, the guard, state round trip,
the logger hook and the divergence rollback, in hand-written loops on the CPU (reference backend)."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

import morpho_dist
from morpho_dist.config import ReliabilityConfig, SeedsConfig
from morpho_dist.controller import ControllerConfig
from morpho_dist.lifecycle import Stage
from morpho_dist.logging import make_run_log
from morpho_dist.reliability import DivergenceError
from tests.fast_growth import FAST_CONTROLLER

SEEDS = {"targets": ["0"], "per_layer": 2, "kind": "diagonal"}


def make(seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    args = {
        "seeds": SEEDS,
        "controller": FAST_CONTROLLER,
        "schedule": {"ramp_steps": 5},
        "kernel": {"backend": "reference"},
    }
    args.update(kw)
    morph = morpho_dist.Morphogenesis(model, **args)
    return model, morph, torch.optim.AdamW(morph.host_parameters(), lr=1e-2)


X = torch.randn(128, 16, generator=torch.Generator().manual_seed(5))
Y = X[:, :4].argmax(1)


def val_loss(model):
    def fn():
        model.eval()
        with torch.no_grad():
            out = float(F.cross_entropy(model(X), Y))
        model.train()
        return out

    return fn


def train(model, morph, opt, steps, loss_scale=None):
    """The plain loop of the README, plus an optional per-step loss factor (to make a step diverge)."""
    for _ in range(steps):
        loss = F.cross_entropy(model(X), Y)
        if loss_scale is not None:
            loss = loss * loss_scale(morph.steps + 1)
        morph.loss(loss).backward()
        morph.step(opt, evaluate=val_loss(model))
        opt.zero_grad()


def test_engine_grows_and_fossilizes_in_a_plain_loop():
    model, morph, opt = make()
    train(model, morph, opt, 60)
    fossilized = [e for e in morph.events if e["to"] == "FOSSILIZED"]
    assert fossilized and all("val loss improvement" in e["reason"] for e in fossilized)
    s = morph.summary(opt)
    assert s["stage_counts"]["FOSSILIZED"] == len(fossilized) and s["steps"] == 60
    assert s["effective_params"] == s["host_params"] + 2 * 16 * len(fossilized)  # diagonal: g, b of 32 / 2 features


@pytest.mark.parametrize("form", ["dict", "dataclass", "omegaconf"])
def test_config_arguments_take_dict_dataclass_and_omegaconf(form):
    seeds = SeedsConfig(targets=["0"], per_layer=4, kind="diagonal")
    ctl = ControllerConfig(interval=7, fine_tuning_steps=3)
    if form == "dict":
        seeds, ctl = {"targets": ["0"], "per_layer": 4, "kind": "diagonal"}, {"interval": 7, "fine_tuning_steps": 3}
    elif form == "omegaconf":
        seeds, ctl = OmegaConf.structured(seeds), OmegaConf.create({"interval": 7, "fine_tuning_steps": 3})
    model = nn.Sequential(nn.Linear(4, 8))
    morph = morpho_dist.Morphogenesis(model, seeds=seeds, controller=ctl)
    assert list(morph.layers) == ["0"] and morph.layers["0"].num_seeds == 4
    assert morph.controller.cfg.interval == 7 and morph.controller.cfg.fine_tuning_steps == 3
    assert morph.controller.cfg.max_active == ControllerConfig().max_active  # the rest: the schema defaults
    assert morph.schedule.ramp_steps == 50 and morph.reliability_cfg == ReliabilityConfig()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seeds": {"targets": ["0"], "per_layers": 2}}, "seeds.per_layers is not a known key"),
        ({"seeds": {"targets": ["0"], "kind": "huge"}}, "seeds.kind='huge' is not allowed"),
        ({"seeds": {"targets": ["0"], "per_layer": "two"}}, "seeds.per_layer='two'"),
        ({"seeds": {"per_layer": 2}}, "seeds.targets is required"),
        ({"seeds": SEEDS, "controller": {"interval": 0}}, "controller.interval=0 is not allowed"),
        ({"seeds": SEEDS, "controller": {"intervall": 3}}, "controller.intervall is not a known key"),
        ({"seeds": SEEDS, "schedule": {"name": "sudden"}}, "schedule.name='sudden' is not allowed"),
        ({"seeds": SEEDS, "optim": {"name": "lion"}}, "optim.name='lion' is not allowed"),
        ({"seeds": SEEDS, "kernel": {"backend": "cuda"}}, "kernel.backend='cuda' is not allowed"),
        ({"seeds": SEEDS, "controller": [1, 2]}, "controller: expected a dict"),
    ],
)
def test_bad_config_is_a_value_error_naming_the_key(kwargs, message):
    model = nn.Sequential(nn.Linear(4, 8))
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        morpho_dist.Morphogenesis(model, **kwargs)
    assert str(model) == str(before)  # nothing was wrapped


def test_misuse_is_a_clear_error():
    model, morph, _ = make()
    everything = torch.optim.SGD(model.parameters(), lr=0.1)
    morph.loss(F.cross_entropy(model(X), Y)).backward()
    with pytest.raises(ValueError, match=r"blueprint bank parameter '0.bank.p0'.*morph.host_parameters\(\)"):
        morph.step(everything)
    opt = torch.optim.SGD(morph.host_parameters(), lr=0.1)
    morph.step(opt)
    F.cross_entropy(model(X), Y).backward()
    with pytest.raises(RuntimeError, match=r"without loss\(\)"):
        morph.step(opt)
    model.to("meta")
    with pytest.raises(RuntimeError, match="moved from cpu to meta after Morphogenesis.*cannot follow it any more"):
        morph.loss(torch.zeros((), requires_grad=True))
    with pytest.raises(RuntimeError, match="cannot follow"):
        morph.follow_model_device()


def test_a_model_moved_after_wrapping_is_an_error_unless_the_engine_follows():
    model, morph, _ = make()
    model.to("meta")
    with pytest.raises(RuntimeError, match=r"moved from cpu to meta.*morph.follow_model_device\(\) before the first"):
        morph.loss(torch.zeros((), device="meta"))
    morph.follow_model_device()
    morph.loss(torch.zeros((), device="meta"))
    assert morph.device == torch.device("meta") and morph.guard.device == torch.device("meta")
    assert all(t.is_meta for st in morph.seed_optimizer.state.values() for t in st.values())


def test_a_non_finite_step_moves_neither_host_nor_seeds():
    model, morph, opt = make()
    train(model, morph, opt, 12)  # a seed is germinated and training by now
    assert any(s in (Stage.TRAINING, Stage.GRAFTING) for s in morph.layers["0"].stages())
    before = {k: v.clone() for k, v in model.state_dict().items() if "telemetry" not in k}
    opt_before = copy.deepcopy(opt.state_dict())
    seeds_before = copy.deepcopy(morph.seed_optimizer.state_dict())
    train(model, morph, opt, 1, loss_scale=lambda step: float("nan"))
    for key, value in model.state_dict().items():
        if "telemetry" not in key and key != "0.seeded.steps_in_stage":
            assert torch.equal(value, before[key]), key
    for key, st in opt.state_dict()["state"].items():
        assert all(torch.equal(v, opt_before["state"][key][n]) for n, v in st.items()), key
    for key, st in morph.seed_optimizer.state_dict().items():
        assert all(torch.equal(v, seeds_before[key][n]) for n, v in st.items()), key


def test_banks_gradients_are_cleared_and_seed_lr_follows_the_optimizer():
    model, morph, opt = make()
    train(model, morph, opt, 3)
    assert all(p.grad is None for p in morph.layers["0"].bank.parameters())
    for group in opt.param_groups:
        group["lr"] = 0.25
    train(model, morph, opt, 1)
    assert morph.seed_optimizer.lr == 0.25 * morph.optim_cfg.seed_lr_scale


def test_state_dict_round_trip_continues_exactly():
    model, morph, opt = make()
    train(model, morph, opt, 23)
    saved = {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict())}
    saved["morph"] = copy.deepcopy(morph.state_dict())
    train(model, morph, opt, 30)

    model2, morph2, opt2 = make(seed=1)  # another init: everything must come from the checkpoint
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    morph2.load_state_dict(saved["morph"])
    assert morph2.steps == 23
    train(model2, morph2, opt2, 30)
    assert [e for e in morph2.events] == [e for e in morph.events if e["step"] > 23]
    for key, value in model.state_dict().items():
        assert torch.equal(value, model2.state_dict()[key]), key


@dataclass
class Collect:
    """A user's logger: the engine's one hook."""

    intervals: list
    others: list

    def interval(self, step, report, events, stages):
        self.intervals.append((step, [e["command"] for e in events], {k: list(v) for k, v in stages.items()}))

    def events(self, events):
        self.others.extend(events)


def test_loggers_get_every_interval_and_the_run_log_backends_work(tmp_path):
    mine = Collect([], [])
    log = make_run_log(OmegaConf.create({"name": "jsonl"}), str(tmp_path), is_main=True, config={})
    model, morph, opt = make(loggers=[mine, log])
    train(model, morph, opt, 30)
    log.metrics(30, {"val/loss": val_loss(model)()})
    log.finish(morph.summary(opt), morph.stages)
    assert [s for s, _, _ in mine.intervals] == [5, 10, 15, 20, 25, 30]
    assert mine.intervals[-1][2] == morph.stages
    written = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(e["step"], e["seed"], e["command"]) for e in written] == [
        (e["step"], e["seed"], e["command"]) for e in morph.events
    ]
    assert len((tmp_path / "telemetry.jsonl").read_text().splitlines()) == 6 * 2  # per interval, per seed
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["step"] == 30


def test_counterfactuals_need_evaluate():
    model, morph, opt = make()
    with pytest.raises(
        ValueError, match=r"need the counterfactual validation loss: pass morph.step\(optimizer, evaluate"
    ):
        for _ in range(60):
            morph.loss(F.cross_entropy(model(X), Y)).backward()
            morph.step(opt)
            opt.zero_grad()


def test_divergence_calls_rollback_and_marks_blending_seeds():
    saved = {}
    calls = []

    def rollback(last_good):
        calls.append(last_good)
        step = max(s for s in saved if s <= last_good)
        model.load_state_dict(saved[step]["model"])
        opt.load_state_dict(saved[step]["opt"])
        morph.load_state_dict(saved[step]["morph"])
        return f"snapshot {step}"

    model, morph, opt = make(rollback=rollback)
    blown = []

    def scale(step):  # once, at step 27, the loss explodes (interval 26..30 diverges)
        if step == 27 and not blown:
            blown.append(step)
            return 1e6
        return 1.0

    for _ in range(40):
        if morph.steps % 5 == 0:
            saved[morph.steps] = copy.deepcopy(
                {"model": model.state_dict(), "opt": opt.state_dict(), "morph": morph.state_dict()}
            )
        train(model, morph, opt, 1, loss_scale=scale)
    assert calls == [25]
    restore = [e for e in morph.events if e["command"] == "restore"]
    assert len(restore) == 1 and restore[0]["reason"].endswith("restored snapshot 25") and restore[0]["value"] == 25
    rolled = [e for e in morph.events if e["command"] == "rollback"]
    assert all(e["to"] == "ROLLED_BACK" and e["step"] == 25 for e in rolled)
    assert morph.monitor.rollbacks == 1 and morph.steps == 40 - 5  # five steps were redone


def test_divergence_without_rollback_is_a_clear_error():
    model, morph, opt = make()
    with pytest.raises(DivergenceError, match=r"step 5: host loss non-finite.*no checkpoint to restore"):
        train(model, morph, opt, 10, loss_scale=lambda step: float("nan") if step >= 3 else 1.0)


def test_exclude_banks_takes_them_out_of_a_fresh_optimizer():
    model, morph, _ = make()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    morph.exclude_banks(opt)
    held = [p for g in opt.param_groups for p in g["params"]]
    assert [id(p) for p in held] == [id(p) for p in morph.host_parameters()]
    train(model, morph, opt, 2)
    with pytest.raises(ValueError, match="already stepped"):
        everything = torch.optim.SGD(model.parameters(), lr=0.1)
        everything.state[morph.layers["0"].bank.p0] = {"momentum_buffer": torch.zeros(1)}
        morph.exclude_banks(everything)
