"""A whole training step captured into a CUDA graph (morpho_dist.capture.CapturedStep) gives the eager step's
results step after step while the lifecycle moves under it: moves that keep every layer's launches (germinate:
GERMINATED is idle; TRAINING -> GRAFTING: both live) replay the same graph, which reads the new stages from the
device; moves that change a layer's idle promise (a seed going live, the last live seed culled) capture again.
A stale graph would show: a seed gone live in a layer captured as idle comes out NaN.

CPU: the launch key the capture depends on. GPU (``-m gpu``): the captured step against the eager one.
"""

from __future__ import annotations

import os

import pytest
import torch

from morpho_dist.capture import CapturedStep, launch_key
from morpho_dist.layer import SeededLayer
from morpho_dist.lifecycle import Stage
from tests.kernels import capture_host

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HIDDEN, SEEDS, RANK, ROWS = 256, 16, 4, 64


def test_launch_key_follows_the_idle_promise_and_training_mode():
    layers = [SeededLayer(64, 4, rank=4, backend="reference") for _ in range(2)]
    start = launch_key(layers)
    assert start == ((True, True), (True, True))
    layers[1].germinate(2, step=0)  # GERMINATED is idle: the same launches
    assert launch_key(layers) == start
    layers[1].apply_stage_changes([(2, Stage.TRAINING)], step=1)
    assert launch_key(layers) == ((True, True), (False, True))
    layers[1].apply_stage_changes([(2, Stage.CULLED)], step=2, command="cull")
    assert launch_key(layers) == start
    layers[0].load_state_dict(layers[0].state_dict())  # an unrecorded write: not known idle any more
    assert launch_key(layers) == ((False, True), (True, True))
    layers[0].refresh_idle_record()
    layers[1].eval()
    assert launch_key(layers) == ((True, True), (True, False))


def test_warmup_must_be_positive():
    with pytest.raises(ValueError, match=r"warmup must be >= 1 \(eager steps before each capture\), got 0"):
        CapturedStep(lambda: None, [], warmup=0)


def build():
    return capture_host.build(hidden=HIDDEN, seeds=SEEDS, rank=RANK, device="cuda")


def move(layers, k: int) -> None:
    capture_host.move(layers, k, seed=5)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA device, TRITON_INTERPRET=0")
def test_captured_step_matches_eager_through_lifecycle_moves():
    eager_model, eager_layers, eager_step = build()
    graph_model, graph_layers, graph_step = build()
    captured = CapturedStep(graph_step, graph_layers, warmup=1)
    gen = torch.Generator(device="cuda").manual_seed(3)
    captures = []
    for k in range(13):
        move(eager_layers, k)
        move(graph_layers, k)
        x = torch.randn(ROWS, HIDDEN, device="cuda", generator=gen)
        target = torch.randn(ROWS, HIDDEN, device="cuda", generator=gen)
        want = eager_step(x, target)
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = captured(x, target)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        captures.append(captured.captures)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m, k=k: f"loss at step {k}: {m}")
        for (name, p), q in zip(graph_model.named_parameters(), eager_model.parameters(), strict=True):
            torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5, msg=lambda m, n=name, k=k: f"{n} step {k}: {m}")
        for key in eager_layers:
            for buf in ("telemetry", "alpha", "steps_in_stage"):
                a, b = getattr(graph_layers[key], buf), getattr(eager_layers[key], buf)
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5, msg=lambda m, k=k, n=buf: f"{n} {k}: {m}")
    assert not torch.isnan(graph_model.fc1.original.weight).any()
    assert float(graph_layers["fc1"].alpha[5]) == 0.0  # culled
    # captured at step 1 (after one warm-up step), again at 6 (TRAINING) and 11 (culled); nothing else
    assert captures == [0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3], captures


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA device, TRITON_INTERPRET=0")
def test_a_graph_is_not_replayed_after_a_promise_changes():
    """Without the launch key a graph captured with every seed idle would replay the column kernel alone after a
    seed went live; CapturedStep captures again, so the live seed's columns are blended, not NaN."""
    _, layers, step = build()
    captured = CapturedStep(step, layers, warmup=1)
    x = torch.randn(ROWS, HIDDEN, device="cuda")
    for _ in range(3):
        captured(x, x)
    fc1 = layers["fc1"]
    fc1.germinate(0, step=3, blend="additive")
    fc1.apply_stage_changes([(0, Stage.TRAINING)], step=3)
    fc1.apply_stage_changes([(0, Stage.GRAFTING)], step=3)
    with torch.no_grad():
        fc1.alpha[0] = 0.5
        fc1.bank.p1[0].fill_(0.1)
    before = captured.captures
    for _ in range(3):
        loss = captured(x, x)
    assert captured.captures == before + 1
    assert torch.isfinite(loss) and torch.isfinite(fc1.telemetry).all()
