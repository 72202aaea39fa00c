"""A model with SeededLayers under torch.compile(fullgraph=True): no graph break, the same numerics as eager.

Training mode (telemetry accumulating over two steps), seeds in TRAINING with the reconstruction blend (so
rec_loss is non-zero) and with the incubator, blended seeds (GRAFTING, FINE_TUNING, FOSSILIZED) with mixed
blends, DORMANT ones. Compared: y, rec_loss, the input gradient, every parameter gradient (blueprint banks and
host) and the telemetry buffers. A lifecycle move between steps changes buffer values only: no recompile.

On the CPU: Dynamo + AOTAutograd (``aot_eager``) for the reference backend, and for the Triton backend in
Triton's interpreter (TRITON_INTERPRET=1); inductor (C++ for the host's math) around the Triton custom ops where a
C++ compiler is present. On a GPU machine (``TRITON_INTERPRET=0 pytest -m gpu``) the default
inductor backend compiles the model around the Triton custom ops.
"""

from __future__ import annotations

import copy
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from morpho_dist.commands import germinate
from morpho_dist.lifecycle import Stage
from morpho_dist.wrap import seeded_layers, wrap

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HIDDEN, SEEDS, RANK, ROWS = 64, 4, 16, 8  # chunk 16

# Per layer: (stage, blend, alpha) of seeds 0..3, reached through legal lifecycle moves.
SETUP = {
    "fc1": [
        (Stage.TRAINING, "linear", 0.0),  # reconstruction: rec_loss
        (Stage.TRAINING, "additive", 0.0),  # incubator
        (Stage.GRAFTING, "multiplicative", 0.4),
        (Stage.DORMANT, None, 0.0),
    ],
    "fc2": [
        (Stage.FINE_TUNING, "additive", 0.7),
        (Stage.FOSSILIZED, "linear", 0.9),
        (Stage.TRAINING, "linear", 0.0),
        (Stage.GRAFTING, "linear", 0.3),
    ],
}
PATH = (Stage.TRAINING, Stage.GRAFTING, Stage.STABILIZATION, Stage.EVALUATING, Stage.FINE_TUNING, Stage.FOSSILIZED)


class Host(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(HIDDEN, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def make_model(backend: str, device: str) -> nn.Module:
    torch.manual_seed(0)
    model = Host().to(device)
    cfg = SimpleNamespace(targets=["fc1", "fc2"], per_layer=SEEDS, kind="lowrank", rank=RANK, act="relu")
    wrap(model, cfg, backend=backend)
    gen = torch.Generator().manual_seed(1)
    for name, layer in seeded_layers(model).items():
        for i, (stage, blend, _) in enumerate(SETUP[name]):
            if stage != Stage.DORMANT:
                germinate(layer, i, 0, blend=blend)
        for dst in PATH:
            moves = [(i, dst) for i, (stage, _, _) in enumerate(SETUP[name]) if stage >= dst and stage != Stage.DORMANT]
            if moves:
                layer.apply_stage_changes(moves, 0, "advance")
        with torch.no_grad():
            layer.alpha.copy_(torch.tensor([a for _, _, a in SETUP[name]]))
            layer.bank.p1.copy_(0.3 * torch.randn(layer.bank.p1.shape, generator=gen))  # B != 0: u matters
        assert [int(s) for s in layer.stage.tolist()] == [int(s) for s, _, _ in SETUP[name]]
    return model.train()


def run_steps(model: nn.Module, forward, xs: list[torch.Tensor], between=None) -> dict[str, torch.Tensor]:
    """Forward + backward per input (gradients accumulate), ``between(model)`` after the first step."""
    layers = seeded_layers(model)
    out: dict[str, torch.Tensor] = {}
    for k, x in enumerate(xs):
        x = x.clone().requires_grad_()
        y = forward(x)
        rec = sum(layer.rec_loss for layer in layers.values())
        (y.square().mean() + rec).backward()
        out.update({f"y{k}": y.detach(), f"rec{k}": rec.detach(), f"dx{k}": x.grad})
        if between is not None and k == 0:
            between(model)
    out.update({f"grad {n}": p.grad for n, p in model.named_parameters()})
    out.update({f"telemetry {n}": layer.telemetry.clone() for n, layer in layers.items()})
    return out


def advance_fc1_grafting(model: nn.Module) -> None:
    """A lifecycle move between steps (GRAFTING -> STABILIZATION): new buffer values, the same graph."""
    seeded_layers(model)["fc1"].apply_stage_changes([(2, Stage.STABILIZATION)], 1, "advance")


def check_compiled_matches_eager(backend: str, device: str, compile_backend: str, atol: float, rtol: float):
    torch._dynamo.reset()
    eager = make_model(backend, device)
    compiled_model = copy.deepcopy(eager)
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(ROWS, HIDDEN, generator=gen).to(device) for _ in range(3)]

    want = run_steps(eager, eager, xs, between=advance_fc1_grafting)
    compiled = torch.compile(compiled_model, backend=compile_backend, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):  # the stage change must not recompile
        got = run_steps(compiled_model, compiled, xs, between=advance_fc1_grafting)

    assert want.keys() == got.keys()
    assert float(want["rec0"]) > 0.0, "no seed reconstructs: rec_loss must be non-zero"
    for key in want:
        assert got[key] is not None, key
        torch.testing.assert_close(got[key], want[key], atol=atol, rtol=rtol, msg=lambda m, key=key: f"{key}: {m}")
    # the backward telemetry fields were written in the compiled backward too (grad_sq, benefit of active seeds)
    tel = got["telemetry fc1"]
    assert (tel[:3, 5] > 0).all() and (tel[:3, 6] != 0).all()

    # eval mode (no telemetry) compiles as its own graph and matches too
    eager.eval()
    compiled_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(xs[0]), eager(xs[0]), atol=atol, rtol=rtol)
    assert (seeded_layers(compiled_model)["fc1"].telemetry == tel).all(), "eval mode must not touch telemetry"


@pytest.mark.parametrize(
    "backend",
    [
        "reference",
        pytest.param("triton", marks=pytest.mark.skipif(not INTERPRET, reason="CPU kernels need TRITON_INTERPRET=1")),
    ],
)
def test_compiled_model_matches_eager_cpu(backend):
    check_compiled_matches_eager(backend, "cpu", "aot_eager", atol=1e-6, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="native GPU run needs TRITON_INTERPRET=0")
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_compiled_model_matches_eager_cuda_inductor(backend):
    # inductor may fuse and reorder the host's fp32 math around the (opaque) seeded op: close, not bit-equal
    check_compiled_matches_eager(backend, "cuda", "inductor", atol=1e-4, rtol=1e-4)


CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


@pytest.mark.slow
@pytest.mark.skipif(not INTERPRET, reason="CPU kernels need TRITON_INTERPRET=1")
@pytest.mark.skipif(CXX is None, reason="inductor's CPU backend needs a C++ compiler")
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_compiled_model_matches_eager_cpu_inductor(backend):
    """The GPU test's inductor compile, on the CPU (torch.compile's default there too): inductor generates C++ for
    the host's math around the Triton custom ops (run in the interpreter), or for the reference op's math as well.
    About a minute of compiling each on 2 cores."""
    check_compiled_matches_eager(backend, "cpu", "inductor", atol=1e-4, rtol=1e-4)


def check_lifecycle_moves_do_not_recompile(backend: str, device: str, compile_backend: str) -> None:
    """From every seed DORMANT (the layers known idle) through germination, TRAINING and GRAFTING: the compiled
    model is compiled once; the idle promise is an eager-only shortcut, so no move changes what was traced."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Host().to(device)
    cfg = SimpleNamespace(targets=["fc1", "fc2"], per_layer=SEEDS, kind="lowrank", rank=RANK, act="relu")
    wrap(model, cfg, backend=backend)
    fc1 = seeded_layers(model)["fc1"]
    compiled = torch.compile(model, backend=compile_backend, fullgraph=True)
    moves = [
        lambda: fc1.germinate(1, 0, blend="additive"),
        lambda: fc1.apply_stage_changes([(1, Stage.TRAINING)], 1),
        lambda: fc1.apply_stage_changes([(1, Stage.GRAFTING)], 2),
        lambda: fc1.alpha.fill_(0.5),
    ]
    x = torch.randn(ROWS, HIDDEN, device=device)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(x).sum().backward()
        for move in moves:
            with torch.no_grad():
                move()
            y = compiled(x)
            y.sum().backward()
            torch.testing.assert_close(y, model(x), atol=1e-5, rtol=1e-5)


def test_lifecycle_moves_do_not_recompile_cpu():
    check_lifecycle_moves_do_not_recompile("reference", "cpu", "aot_eager")


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="native GPU run needs TRITON_INTERPRET=0")
def test_lifecycle_moves_do_not_recompile_cuda_inductor():
    check_lifecycle_moves_do_not_recompile("triton", "cuda", "inductor")


@pytest.mark.skipif(not INTERPRET, reason="CPU kernels need TRITON_INTERPRET=1")
@pytest.mark.skipif(CXX is None, reason="inductor's CPU backend needs a C++ compiler")
def test_lifecycle_moves_do_not_recompile_cpu_inductor():
    check_lifecycle_moves_do_not_recompile("triton", "cpu", "inductor")


class _Counting:
    """Wraps a @triton.jit kernel: counts ``kernel[grid](...)`` launches, then launches."""

    def __init__(self, kernel) -> None:
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.skipif(not INTERPRET, reason="CPU kernels need TRITON_INTERPRET=1")
def test_compiled_calls_consult_the_idle_record_when_they_run(monkeypatch):
    """Traced calls promise nothing (no recompile at lifecycle moves); when they run, the op asks the layer's idle
    record: a known-idle layer launches no lowrank kernel, one with a live seed (or an unrecorded write) does."""
    from morpho_dist.kernels import launch

    lowrank = {name: _Counting(getattr(launch, name)) for name in ("_lowrank_fwd_kernel", "_lowrank_bwd_kernel")}
    for name, counting in lowrank.items():
        monkeypatch.setattr(launch, name, counting)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Host()
    cfg = SimpleNamespace(targets=["fc1", "fc2"], per_layer=SEEDS, kind="lowrank", rank=RANK, act="relu")
    wrap(model, cfg, backend="triton")
    layers = seeded_layers(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(ROWS, HIDDEN)

    def launches_of_a_step() -> int:
        before = sum(c.launches for c in lowrank.values())
        compiled(x).sum().backward()
        return sum(c.launches for c in lowrank.values()) - before

    with torch._dynamo.config.patch(error_on_recompile=True):
        assert launches_of_a_step() == 0  # both layers known idle
        layers["fc1"].germinate(1, 0)
        assert launches_of_a_step() == 0  # GERMINATED is idle, recorded as such
        layers["fc1"].apply_stage_changes([(1, Stage.TRAINING)], 1)
        assert launches_of_a_step() == 2  # fc1's lowrank kernels, forward and backward
        with torch.no_grad():
            layers["fc2"].stage.fill_(int(Stage.DORMANT))  # unrecorded: fc2 not known idle any more
        assert launches_of_a_step() == 4
