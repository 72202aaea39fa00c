"""The CPU counterpart of test_capture.py's GPU tests: CapturedStep over a CUDA graph emulated on the CPU
(tests/kernels/cpu_graph.py: the capture records every aten operation and Triton launch, replays run them again on
the same tensors and none of the Python), the kernels in Triton's interpreter.

A captured training step gives the eager step's results step after step while the lifecycle moves under it; it
captures again exactly when a layer's idle promise changes (a seed going live, the last live seed culled); a graph
replayed after its promise changed would be stale, which shows as NaN in the live seed's columns.
"""

from __future__ import annotations

import os

import pytest
import torch

from morpho_dist.capture import CapturedStep
from morpho_dist.lifecycle import Stage
from tests.kernels import capture_host
from tests.kernels.cpu_graph import CpuGraph, HostReadInCapture, cpu_graphs

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU kernels need TRITON_INTERPRET=1")
HIDDEN, SEEDS, RANK, ROWS = 64, 4, 4, 8  # chunk 16: the smallest lowrank chunk


def build():
    return capture_host.build(hidden=HIDDEN, seeds=SEEDS, rank=RANK, device="cpu")


def move(layers, k: int) -> None:
    capture_host.move(layers, k, seed=1)


def test_captured_step_matches_eager_through_lifecycle_moves(monkeypatch):
    cpu_graphs(monkeypatch)
    eager_model, eager_layers, eager_step = build()
    graph_model, graph_layers, graph_step = build()
    captured = CapturedStep(graph_step, graph_layers, warmup=1)
    gen = torch.Generator().manual_seed(3)
    captures, replays, alphas = [], [], []
    for k in range(13):
        move(eager_layers, k)
        move(graph_layers, k)
        x = torch.randn(ROWS, HIDDEN, generator=gen)
        target = torch.randn(ROWS, HIDDEN, generator=gen)
        want = eager_step(x, target)
        got = captured(x, target)
        captures.append(captured.captures)
        replays.append(captured.graph.replays if captured.graph is not None else 0)
        alphas.append(float(graph_layers["fc1"].alpha[1]))
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6, msg=lambda m, k=k: f"loss at step {k}: {m}")
        for (name, p), q in zip(graph_model.named_parameters(), eager_model.parameters(), strict=True):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6, msg=lambda m, n=name, k=k: f"{n} step {k}: {m}")
        for key in eager_layers:
            for buf in ("telemetry", "alpha", "steps_in_stage"):
                a, b = getattr(graph_layers[key], buf), getattr(eager_layers[key], buf)
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-6, msg=lambda m, k=k, n=buf: f"{n} {k}: {m}")
    assert not torch.isnan(graph_model.fc1.original.weight).any()
    # captured after one warm-up step (at 1), again at 6 (TRAINING, step 5 warms up) and 11 (culled at 10)
    assert captures == [0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3], captures
    # each capture's step is its graph's first replay; a changed promise drops the graph for an eager warm-up step
    assert replays == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2], replays
    # GRAFTING from step 7 at rate 0.25, moved by the replayed schedule: 0.25, 0.5, 0.75; culled: 0
    assert alphas == [0.0] * 7 + [0.25, 0.5, 0.75, 0.0, 0.0, 0.0], alphas


def _live_fc1(layers, step: int) -> None:
    fc1 = layers["fc1"]
    fc1.germinate(0, step=step, blend="additive")
    fc1.apply_stage_changes([(0, Stage.TRAINING)], step=step)
    fc1.apply_stage_changes([(0, Stage.GRAFTING)], step=step)
    with torch.no_grad():
        fc1.alpha[0] = 0.5
        fc1.bank.p1[0].fill_(0.1)


def test_a_graph_is_not_replayed_after_a_promise_changes(monkeypatch):
    """A graph captured with every seed idle launches the column kernel alone; after a seed of fc1 goes live,
    CapturedStep captures again, so the live seed's columns are blended, not NaN."""
    cpu_graphs(monkeypatch)
    _, layers, step = build()
    captured = CapturedStep(step, layers, warmup=1)
    x = torch.randn(ROWS, HIDDEN)
    for _ in range(3):
        captured(x, x)
    _live_fc1(layers, step=3)
    before = captured.captures
    for _ in range(3):
        loss = captured(x, x)
    assert captured.captures == before + 1
    assert torch.isfinite(loss) and torch.isfinite(layers["fc1"].telemetry).all()


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")  # the NaN columns' telemetry
def test_a_stale_graph_replayed_after_the_promise_changed_is_nan(monkeypatch):
    """What the test above guards against, seen on the emulated graph: the idle-captured graph, replayed after a
    seed went live, ran the column kernel alone, which writes NaN into that seed's columns."""
    cpu_graphs(monkeypatch)
    model, layers, step = build()
    captured = CapturedStep(step, layers, warmup=1)
    x = torch.randn(ROWS, HIDDEN)
    for _ in range(2):
        loss = captured(x, x)  # the second call captured: its loss is the tensor every replay rewrites
    stale = captured.graph
    assert isinstance(stale, CpuGraph) and stale.replays == 1
    _live_fc1(layers, step=2)
    stale.replay()
    assert torch.isnan(loss)
    assert torch.isnan(model.fc2.original.weight).all()  # AdamW stepped on NaN gradients


HOST_READS = [lambda t: bool(torch.isfinite(t)), lambda t: t.tolist(), lambda t: t.item()]


@pytest.mark.parametrize("read", HOST_READS, ids=["bool", "tolist", "item"])
def test_a_host_read_inside_the_captured_step_is_refused(monkeypatch, read):
    """The emulated capture refuses what a CUDA capture refuses, a step that reads a device value on the host: the
    captured steps above made none (on a GPU, ``torch.cuda.set_sync_debug_mode("error")`` holds them to that)."""
    cpu_graphs(monkeypatch)
    _, layers, step = build()

    def syncing(x, target):
        loss = step(x, target)
        read(loss)
        return loss

    captured = CapturedStep(syncing, layers, warmup=1)
    x = torch.randn(ROWS, HIDDEN)
    captured(x, x)  # eager: reads are allowed
    with pytest.raises(HostReadInCapture, match="inside a graph capture"):
        captured(x, x)
