"""Training FLOPs of a run (host + live seeds), throughput and model FLOPs utilisation.

Host: one forward and backward of a training batch of the unwrapped host, counted by
``torch.utils.flop_counter.FlopCounterMode`` on a meta-device copy (no memory, no compute, no draw from any
RNG): matrix products and attention as PyTorch counts them (attention without a causal discount), the loss and
element-wise work left out. Seeds: a seed costs nothing while idle (DORMANT, GERMINATED, CULLED, CANCELLED,
ROLLED_BACK: the op skips it); a lowrank seed's forward is 4 * rows * C * R (two products), a diagonal seed's
2 * rows * C; a trainable seed (TRAINING, GRAFTING, FINE_TUNING) costs three forwards per step (forward, input
gradient, weight gradient) and a frozen blended one (STABILIZATION, EVALUATING, FOSSILIZED) two. ``rows`` is
the number of feature vectors the seeded layer sees per step on this rank, measured in the same meta pass.

MFU: achieved model FLOPs per second (host + seeds, this rank) over the device's dense peak for the math in
use (fp32, or TF32 when ``torch.backends.cuda.matmul.allow_tf32`` is on, or bf16 under an autocast the caller
declares); None off CUDA or on an unknown device.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from contextlib import contextmanager

import torch
from torch import nn

from morpho_dist.lifecycle import BLENDED_STAGES, TRAINABLE_STAGES

# Dense peaks in FLOP/s (vendor datasheets; SXM parts): fp32 (no tensor cores), tf32, bf16.
PEAKS = {
    "H200": {"fp32": 66.9e12, "tf32": 494.7e12, "bf16": 989.4e12},
    "H100": {"fp32": 66.9e12, "tf32": 494.7e12, "bf16": 989.4e12},
    "A100": {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12},
}


def peak_flops(device: torch.device, math: str | None = None) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if math is None:
        math = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
    for key, peaks in PEAKS.items():
        if key in name:
            return peaks[math]
    return None


def _count(model: nn.Module, x: torch.Tensor, targets: list[str]) -> tuple[float, dict[str, int]]:
    from torch.utils.flop_counter import FlopCounterMode

    from morpho_dist.task import logits_of

    rows: dict[str, int] = {}
    hooks = []
    for name in targets:
        module = model.get_submodule(name)
        features = getattr(module, "out_features", None) or getattr(module, "out_channels", None) or 1

        def record(mod, args, out, name=name, features=features):
            rows[name] = rows.get(name, 0) + out.numel() // features

        hooks.append(module.register_forward_hook(record))
    try:
        with FlopCounterMode(display=False) as counter:
            logits_of(model(x)).float().sum().backward()
    finally:
        for h in hooks:
            h.remove()
    return float(counter.get_total_flops()), rows


def measure_host(model: nn.Module, example: torch.Tensor, targets: list[str]) -> tuple[float, dict[str, int]]:
    """(FLOPs of one forward + backward of ``model`` on a batch shaped like ``example``, rows per step seen by
    each module of ``targets``), from a meta-device copy of the unwrapped host. Models whose forward reads
    values (``transformers`` builds masks with ``.item()``) are counted on a copy on their own device with one
    row of the batch, the RNG state restored, and scaled by the batch size (FLOPs are linear in it)."""
    try:
        x = torch.empty_like(example, device="meta") if example.is_floating_point() else example.to("meta")
        return _count(copy.deepcopy(model).to("meta"), x, targets)
    except (RuntimeError, NotImplementedError):
        pass
    n = example.shape[0]
    devices = [example.device] if example.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        flops, rows = _count(copy.deepcopy(model), example[:1], targets)
    return flops * n, {k: v * n for k, v in rows.items()}


def seed_forward_flops(kind: str, rows: int, chunk: int, rank: int) -> float:
    return 4.0 * rows * chunk * rank if kind == "lowrank" else 2.0 * rows * chunk


class FlopMeter:
    """Cumulative training FLOPs: ``step(stages)`` once per step with the stages in effect during it."""

    def __init__(self, host_per_step: float, seed_forward: Mapping[str, float]) -> None:
        self.host_per_step = float(host_per_step)
        self.seed_forward = dict(seed_forward)
        self.total = 0.0
        self.seed_total = 0.0

    @classmethod
    def for_layers(cls, host_per_step: float, rows: Mapping[str, int], layers: Mapping) -> FlopMeter:
        """From ``measure_host``'s result and the run's SeededLayers (name -> layer; may be empty)."""
        forward = {n: seed_forward_flops(m.kind, rows.get(n, 0), m.chunk, m.bank.rank) for n, m in layers.items()}
        return cls(host_per_step, forward)

    def seed_flops(self, stages: Mapping[str, list[int]]) -> float:
        total = 0.0
        for name, ids in stages.items():
            fwd = self.seed_forward.get(name, 0.0)
            for s in ids:
                if s in TRAINABLE_STAGES:
                    total += 3 * fwd
                elif s in BLENDED_STAGES:
                    total += 2 * fwd
        return total

    def step(self, stages: Mapping[str, list[int]]) -> None:
        seeds = self.seed_flops(stages) if stages else 0.0
        self.seed_total += seeds
        self.total += self.host_per_step + seeds

    def state_dict(self) -> dict:
        return {"total": self.total, "seed_total": self.seed_total}

    def load_state_dict(self, state: Mapping) -> None:
        self.total = float(state.get("total", 0.0))
        self.seed_total = float(state.get("seed_total", 0.0))


class Throughput:
    """Training wall time (the logging evaluations excluded; controller work included), items per second and
    MFU between log points. Log points synchronise the device so the times are real."""

    def __init__(self, device: torch.device, global_batch: int, spec) -> None:
        self.device = device
        self.unit = "tokens" if spec.kind == "tokens" else "samples"
        self.items_per_step = int(global_batch) * (int(spec.seq_len) if spec.kind == "tokens" else 1)
        self.peak = peak_flops(device)
        self.start = time.perf_counter()
        self.paused_s = 0.0
        self.last = (0.0, None, 0.0)  # (train seconds, step, flops) at the previous log point

    def _train_seconds(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - self.start - self.paused_s

    @contextmanager
    def paused(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t0

    def metrics(self, step: int, meter: FlopMeter) -> dict:
        now = self._train_seconds()
        out = {"time/train_s": now, "flops/total": meter.total, "flops/seeds": meter.seed_total}
        last_t, last_step, last_flops = self.last
        if last_step is not None and now > last_t:
            dt = now - last_t
            out[f"throughput/{self.unit}_per_s"] = (step - last_step) * self.items_per_step / dt
            if self.peak:
                out["throughput/mfu"] = (meter.total - last_flops) / dt / self.peak
        self.last = (now, step, meter.total)
        return out

    def summary(self, steps_run: int, meter: FlopMeter) -> dict:
        seconds = self._train_seconds()
        out = {
            "train_time_s": seconds,
            "flops": meter.total,
            "seed_flops": meter.seed_total,
            "host_flops_per_step": meter.host_per_step,
            f"{self.unit}_per_s": steps_run * self.items_per_step / seconds if seconds > 0 else None,
            "mfu": meter.total / seconds / self.peak if self.peak and seconds > 0 else None,
        }
        return out


__all__ = ["FlopMeter", "Throughput", "measure_host", "peak_flops", "seed_forward_flops"]
