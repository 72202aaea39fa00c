"""Alpha schedules (the Hydra ``schedule`` group): how the alpha of GRAFTING seeds moves from 0 to 1.

Every step ``step_`` moves the alpha of GRAFTING seeds on the layer's device (tensor ops only, no host sync);
at controller intervals ``on_interval`` sets per-seed ``alpha_rate`` from the health report and host signals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from morpho_dist.lifecycle import Stage

if TYPE_CHECKING:
    from morpho_dist.layer import SeededLayer
    from morpho_dist.telemetry import HealthReport, SeedReport


SCHEDULES = ("fixed_ramp", "performance_linked", "drift_controlled", "grad_norm_gated")
RAMP_SHAPES = ("linear", "cosine")


@dataclass
class ScheduleConfig:
    """The Hydra ``schedule`` group (one schema for every schedule; each reads the keys it needs)."""

    name: str = "fixed_ramp"  # fixed_ramp | performance_linked | drift_controlled | grad_norm_gated
    ramp_steps: int = 50  # steps from alpha 0 to 1 at the base rate
    shape: str = "linear"  # fixed_ramp only: linear | cosine
    min_factor: float = 0.0  # performance_linked: rate factor clamp (0 pauses a seed whose benefit is >= 0)
    max_factor: float = 2.0  # performance_linked: rate factor upper clamp
    drift_threshold: float = 0.05  # drift_controlled: pause while host weight drift per interval > this
    grad_lo: float = 0.0  # grad_norm_gated: ramp only while lo <= host grad norm <= hi
    grad_hi: float = 10.0  # grad_norm_gated: upper bound


@dataclass(frozen=True)
class HostSignals:
    """Host-side signals the train loop computes once per interval (identical on every rank)."""

    weight_drift: float = 0.0  # relative change of the host weights over the interval
    grad_norm: float = 0.0  # host gradient norm (after the data-parallel reduction)


_DEFAULTS = ScheduleConfig()


def _cfg(cfg: Any, name: str) -> Any:
    """``cfg.name``, or ScheduleConfig's default (the one source of defaults) when cfg lacks it or holds None."""
    value = getattr(cfg, name, None) if cfg is not None else None
    return getattr(_DEFAULTS, name) if value is None else value


class AlphaSchedule:
    """Base: a linear ramp at ``1 / ramp_steps`` per step; subclasses scale or pause the rate per interval."""

    name = "fixed_ramp"

    def __init__(self, cfg: Any = None) -> None:
        self.ramp_steps = int(_cfg(cfg, "ramp_steps"))
        if self.ramp_steps < 1:
            raise ValueError(f"schedule.ramp_steps must be >= 1, got {self.ramp_steps}")

    @property
    def base_rate(self) -> float:
        return 1.0 / self.ramp_steps

    def initial_rate(self) -> float:
        """alpha_rate given to a seed as it enters GRAFTING."""
        return self.base_rate

    @torch.no_grad()
    def step_(self, layer: SeededLayer) -> None:
        """alpha = clamp(alpha + alpha_rate, 0, 1) for GRAFTING seeds; device ops only."""
        if layer.known_idle():  # no GRAFTING seed: nothing to move, no launches
            return
        grafting = layer.stage == int(Stage.GRAFTING)
        moved = torch.clamp(layer.alpha + layer.alpha_rate, 0.0, 1.0)
        layer.alpha.copy_(torch.where(grafting, moved, layer.alpha))

    def rates(self, seeds: list[SeedReport], host: HostSignals) -> dict[int, float]:
        """Global seed index -> alpha_rate for this layer's GRAFTING seeds (base: the base rate)."""
        return {s.seed: self.base_rate for s in seeds}

    @torch.no_grad()
    def on_interval(self, layer: SeededLayer, report: HealthReport, host: HostSignals) -> None:
        """Set alpha_rate of this layer's GRAFTING seeds (one host->device copy); others keep theirs."""
        grafting = [s for s in report.layer_seeds(layer.layer_key) if s.stage == Stage.GRAFTING]
        chosen = self.rates(grafting, host)
        values = [self.base_rate] * layer.num_seeds
        for seed, rate in chosen.items():
            i = seed - layer.seed_offset
            if 0 <= i < layer.num_seeds:
                values[i] = float(rate)
        new = torch.tensor(values, dtype=layer.alpha_rate.dtype).to(layer.alpha_rate.device, non_blocking=True)
        layer.alpha_rate.copy_(torch.where(layer.stage == int(Stage.GRAFTING), new, layer.alpha_rate))


class FixedRamp(AlphaSchedule):
    """Linear (constant rate) or cosine ramp over ramp_steps; cosine reads steps_in_stage on the device:
    alpha = (1 - cos(pi * min((steps_in_stage + 1) / ramp_steps, 1))) / 2, so that ``step_`` before ``tick_``
    reaches alpha = 1 after ramp_steps steps."""

    name = "fixed_ramp"

    def __init__(self, cfg: Any = None) -> None:
        super().__init__(cfg)
        self.shape = str(_cfg(cfg, "shape"))
        if self.shape not in RAMP_SHAPES:
            raise ValueError(f"schedule.shape={self.shape!r} is not known; allowed values: {list(RAMP_SHAPES)}")

    @torch.no_grad()
    def step_(self, layer: SeededLayer) -> None:
        if self.shape == "linear" or layer.known_idle():
            return super().step_(layer)
        grafting = layer.stage == int(Stage.GRAFTING)
        frac = torch.clamp((layer.steps_in_stage.to(torch.float32) + 1.0) / self.ramp_steps, 0.0, 1.0)
        cosine = 0.5 * (1.0 - torch.cos(math.pi * frac))
        layer.alpha.copy_(torch.where(grafting, cosine.to(layer.alpha.dtype), layer.alpha))


class PerformanceLinked(AlphaSchedule):
    """rate = base_rate * clamp(-benefit / mean|benefit|, min_factor, max_factor) over the layer's GRAFTING
    seeds: seeds whose grafting lowers the loss most ramp fastest; a harmful one (benefit > 0) pauses."""

    name = "performance_linked"

    def __init__(self, cfg: Any = None) -> None:
        super().__init__(cfg)
        self.min_factor = float(_cfg(cfg, "min_factor"))
        self.max_factor = float(_cfg(cfg, "max_factor"))
        if not 0.0 <= self.min_factor <= self.max_factor:
            raise ValueError(
                f"schedule needs 0 <= min_factor <= max_factor, got {self.min_factor} and {self.max_factor}"
            )

    def rates(self, seeds: list[SeedReport], host: HostSignals) -> dict[int, float]:
        finite = [abs(s.benefit) for s in seeds if math.isfinite(s.benefit)]
        scale = sum(finite) / len(finite) if finite else 0.0
        out = {}
        for s in seeds:
            factor = -s.benefit / scale if scale > 0.0 and math.isfinite(s.benefit) else 1.0
            out[s.seed] = self.base_rate * min(max(factor, self.min_factor), self.max_factor)
        return out


class DriftControlled(AlphaSchedule):
    """Base rate, paused (0) while the host weight drift per interval exceeds drift_threshold."""

    name = "drift_controlled"

    def __init__(self, cfg: Any = None) -> None:
        super().__init__(cfg)
        self.threshold = float(_cfg(cfg, "drift_threshold"))

    def rates(self, seeds: list[SeedReport], host: HostSignals) -> dict[int, float]:
        rate = 0.0 if host.weight_drift > self.threshold else self.base_rate
        return {s.seed: rate for s in seeds}


class GradNormGated(AlphaSchedule):
    """Base rate, paused (0) while the host grad norm lies outside [grad_lo, grad_hi]."""

    name = "grad_norm_gated"

    def __init__(self, cfg: Any = None) -> None:
        super().__init__(cfg)
        self.lo, self.hi = float(_cfg(cfg, "grad_lo")), float(_cfg(cfg, "grad_hi"))
        if self.lo > self.hi:
            raise ValueError(f"schedule needs grad_lo <= grad_hi, got {self.lo} > {self.hi}")

    def rates(self, seeds: list[SeedReport], host: HostSignals) -> dict[int, float]:
        rate = self.base_rate if self.lo <= host.grad_norm <= self.hi else 0.0
        return {s.seed: rate for s in seeds}


_SCHEDULE_CLASSES: dict[str, type[AlphaSchedule]] = {
    "fixed_ramp": FixedRamp,
    "performance_linked": PerformanceLinked,
    "drift_controlled": DriftControlled,
    "grad_norm_gated": GradNormGated,
}


def make_schedule(schedule_cfg: Any = None) -> AlphaSchedule:
    """Build the alpha schedule named by ``schedule_cfg.name`` (default fixed_ramp)."""
    name = str(_cfg(schedule_cfg, "name"))
    if name not in _SCHEDULE_CLASSES:
        raise ValueError(f"schedule.name={name!r} is not known; allowed values: {list(SCHEDULES)}")
    return _SCHEDULE_CLASSES[name](schedule_cfg)
