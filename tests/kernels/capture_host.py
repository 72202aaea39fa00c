"""The model, training step and lifecycle moves that test_capture.py (CUDA graphs) and test_capture_cpu.py (the
CPU emulation) both capture: two seeded Linear layers, fused AdamW for the host, the seeds' fused Triton step."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from morpho_dist.commands import tick_
from morpho_dist.kernels.options import KernelOptions
from morpho_dist.layer import with_rec_losses
from morpho_dist.lifecycle import Stage
from morpho_dist.optim import Optimizers, SeedOptimizer, host_parameters
from morpho_dist.schedules import make_schedule
from morpho_dist.wrap import seeded_layers, wrap


class Host(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def build(*, hidden: int, seeds: int, rank: int, device: str):
    """(model, layers, step). ``capturable`` is a CUDA-only flag of the fused AdamW (the CPU fused step reads its
    step count on the device anyway)."""
    torch.manual_seed(0)
    model = Host(hidden).to(device)
    cfg = SimpleNamespace(targets=["fc1", "fc2"], per_layer=seeds, kind="lowrank", rank=rank, act="relu")
    wrap(model, cfg, backend="triton", kernel=KernelOptions(deterministic=True))
    layers = seeded_layers(model)
    extra = {"capturable": True} if torch.device(device).type == "cuda" else {}
    host = torch.optim.AdamW(host_parameters(model, layers), lr=1e-3, fused=True, **extra)
    optimizers = Optimizers(host, SeedOptimizer(layers, name="adamw", lr=1e-2, fused=True))
    schedule = make_schedule(SimpleNamespace(name="fixed_ramp", ramp_steps=4, shape="linear"))
    seeded = list(layers.values())

    def step(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = F.mse_loss(model(x), target)
        total = with_rec_losses(loss, seeded, 1.0)
        optimizers.zero_grad()
        total.backward()
        optimizers.step()
        for layer in seeded:
            schedule.step_(layer)
        tick_(seeded)
        return loss.detach()

    return model, layers, step


def move(layers, k: int, seed: int) -> None:
    """The lifecycle moves made before step k to ``seed`` of fc1 (the same on the eager and the captured model)."""
    fc1 = layers["fc1"]
    if k == 3:
        fc1.germinate(seed, step=k, blend="linear")  # still idle
    if k == 5:
        fc1.apply_stage_changes([(seed, Stage.TRAINING)], step=k)  # live: captured again
    if k == 7:
        fc1.apply_stage_changes([(seed, Stage.GRAFTING)], step=k)  # live -> live: the same graph
        with torch.no_grad():
            fc1.alpha_rate[seed] = 0.25
    if k == 10:
        fc1.apply_stage_changes([(seed, Stage.CULLED)], step=k, command="cull")  # idle again: captured again
