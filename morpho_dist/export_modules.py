"""Plain PyTorch modules for exported models: a fossilized seed as an ordinary nn.Module.

This module imports torch only (nothing from morpho_dist.ops, kernels or Triton), so an exported model runs
(and unpickles) anywhere PyTorch does. A fossilized seed n of a layer computes, on its feature chunk
[start, end) of the host module's output, y_c = blend(x_c, u(x_c), alpha) with frozen parameters:
    lowrank:  u = act(x_c @ A) @ B   (as Linear(C, R) -> act -> Linear(R, C), no biases)
    diagonal: u = g * x_c + b
    blend:    additive x + a*u | multiplicative x * (1 + a*tanh(u)) | linear (1 - a)*x + a*u
"""

from __future__ import annotations

import torch
from torch import nn

BLEND_FORMULAS = ("additive", "multiplicative", "linear")  # index = blend id (DESIGN.md section 2)


class WrapsOriginal(nn.Module):
    """A module standing in for a user's ``original`` one: attributes it does not have (``weight``, ``in_features``,
    a model's own fields) are read from ``original``, so code written for the user's module keeps working."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if name == "original" or not modules or "original" not in modules:
                raise
            return getattr(modules["original"], name)


class DiagonalBlueprint(nn.Module):
    """u = g * x + b (per feature)."""

    def __init__(self, g: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.g = nn.Parameter(g.detach().clone().float(), requires_grad=False)
        self.b = nn.Parameter(b.detach().clone().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.g * x + self.b


def lowrank_blueprint(a: torch.Tensor, b: torch.Tensor, act: str) -> nn.Sequential:
    """u = act(x @ A) @ B with A [C, R], B [R, C] as two bias-free, frozen Linear layers."""
    chunk, rank = a.shape
    down, up = nn.Linear(chunk, rank, bias=False), nn.Linear(rank, chunk, bias=False)
    with torch.no_grad():
        down.weight.copy_(a.detach().t().float())
        up.weight.copy_(b.detach().t().float())
    activation = nn.ReLU() if act == "relu" else nn.GELU(approximate="tanh")
    seq = nn.Sequential(down, activation, up)
    seq.requires_grad_(False)
    return seq


class FossilizedSeed(nn.Module):
    """y_c = blend(x_c, u(x_c), alpha) on features [start, end) of the last dim."""

    def __init__(self, start: int, end: int, blueprint: nn.Module, blend: int, alpha: float) -> None:
        super().__init__()
        if not 0 <= int(blend) < len(BLEND_FORMULAS):
            raise ValueError(f"blend id {blend} out of range 0..{len(BLEND_FORMULAS) - 1}")
        self.start, self.end, self.blend = int(start), int(end), int(blend)
        self.blueprint = blueprint
        self.register_buffer("alpha", torch.tensor(float(alpha), dtype=torch.float32))

    def forward(self, xc: torch.Tensor) -> torch.Tensor:
        x = xc.float()
        u = self.blueprint(x)
        a = self.alpha
        if self.blend == 0:
            y = x + a * u
        elif self.blend == 1:
            y = x * (1 + a * torch.tanh(u))
        else:
            y = (1 - a) * x + a * u
        return y.to(xc.dtype)

    def extra_repr(self) -> str:
        return f"features=[{self.start}, {self.end}), blend={BLEND_FORMULAS[self.blend]}"


class FossilizedOutput(WrapsOriginal):
    """``original`` followed by its fossilized seeds, each rewriting its chunk of the feature dim
    (``channel_dim``: -1 for Linear outputs, -3 for Conv2d's channels). The output keeps the original output's
    strides; attributes it does not have are read from ``original``."""

    def __init__(self, original: nn.Module, seeds: list[FossilizedSeed], channel_dim: int = -1) -> None:
        super().__init__()
        self.original = original
        self.seeds = nn.ModuleList(seeds)
        self.channel_dim = int(channel_dim)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        y = self.original(*args, **kwargs)
        moved = self.channel_dim != -1
        h = y.movedim(self.channel_dim, -1) if moved else y
        out = h.clone(memory_format=torch.contiguous_format)
        for seed in self.seeds:
            out[..., seed.start : seed.end] = seed(h[..., seed.start : seed.end])
        out = out.movedim(-1, self.channel_dim) if moved else out
        return out if out.stride() == y.stride() else torch.empty_like(y).copy_(out)

    def extra_repr(self) -> str:
        return f"channel_dim={self.channel_dim}"


class RefusedSavePretrained:
    """Put in place of an exported model's ``save_pretrained``: its class would load the FossilizedOutput layers
    it cannot represent as freshly initialised ones, so saving says so instead."""

    def __init__(self, class_name: str, layers: list[str]) -> None:
        self.class_name, self.layers = class_name, list(layers)

    def __call__(self, *args, **kwargs):
        raise ValueError(
            f"save_pretrained cannot represent this exported {self.class_name}: layers {self.layers} carry fossilized "
            "seeds that do not fold into their weights, and from_pretrained would load them re-initialised. Save the "
            "grown (wrapped) model with morpho_dist.save_grown(model, path) and load it with "
            "morpho_dist.load_grown(fresh_model, path)"
        )


def refuse_save_pretrained(model: nn.Module, layers: list[str]) -> None:
    """Make ``model.save_pretrained`` (and push_to_hub, which calls it) raise, naming ``layers``."""
    model.save_pretrained = RefusedSavePretrained(type(model).__name__, layers)
