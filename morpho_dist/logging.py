"""Run logs: the run dir's files (always, rank 0) plus one logger backend (wandb | jsonl | none).

Rank 0 gets a ``RunLog``; every other rank gets a ``NullRunLog`` with the same methods doing nothing, so the
train loop never asks "am I rank 0?" or "is wandb on?". Files in the run dir, whatever the logger:
- ``events.jsonl``: every lifecycle decision (step, layer, seed, command, from, to, reason, signals)
- ``telemetry.jsonl``: one health record per seed per controller interval
- ``summary.json``: the final summary returned by train.run
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from morpho_dist.lifecycle import Stage

# Stage id -> RGB for the seed-state image (padding cells: dark grey).
STAGE_COLORS = {
    Stage.DORMANT: (200, 200, 200),
    Stage.GERMINATED: (255, 235, 59),
    Stage.TRAINING: (255, 152, 0),
    Stage.GRAFTING: (3, 169, 244),
    Stage.STABILIZATION: (0, 188, 212),
    Stage.EVALUATING: (156, 39, 176),
    Stage.FINE_TUNING: (63, 81, 181),
    Stage.FOSSILIZED: (76, 175, 80),
    Stage.CULLED: (244, 67, 54),
    Stage.CANCELLED: (121, 85, 72),
    Stage.ROLLED_BACK: (0, 0, 0),
}
PAD_COLOR = (60, 60, 60)
HIST_FIELDS = ("mean", "std", "dead_frac", "absmax", "grad_rms", "benefit", "delta_rms")


def _clean(v: Any) -> Any:
    """JSON-safe values: non-finite floats become strings ('nan', 'inf')."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def stage_image(stages: dict[str, list[int]], cell: int = 16) -> np.ndarray:
    """Seed-state picture: one row per layer, one column per seed, coloured by stage; uint8 [H, W, 3]."""
    width = max((len(s) for s in stages.values()), default=1)
    grid = np.zeros((max(len(stages), 1), width, 3), dtype=np.uint8)
    grid[:] = PAD_COLOR
    for li, seq in enumerate(stages.values()):
        for si, st in enumerate(seq):
            grid[li, si] = STAGE_COLORS[Stage(int(st))]
    img = np.kron(grid, np.ones((cell, cell, 1), dtype=np.uint8))
    img[::cell, :, :] = 255  # grid lines
    img[:, ::cell, :] = 255
    return img


def _truncate_jsonl(path: str, after_step: int) -> None:
    """Drop the records of steps > after_step (a resumed run rewrites them)."""
    if not os.path.exists(path):
        return
    with open(path) as fh:
        keep = [line for line in fh if line.strip() and json.loads(line).get("step", 0) <= after_step]
    with open(path, "w") as fh:
        fh.writelines(keep)


class Backend:
    """A logger backend: metrics per step, extras per controller interval, a close."""

    def metrics(self, step: int, values: dict[str, float]) -> None:
        pass

    def interval(self, step: int, report: Any, events: list[dict], stages: dict[str, list[int]]) -> None:
        pass

    def finish(self, summary: dict, events: list[dict], stages: dict[str, list[int]]) -> None:
        pass

    def close(self) -> None:
        """The run stops before its end (an interrupt): flush and release, keep what was logged."""


class JsonlBackend(Backend):
    """metrics.jsonl in the run dir."""

    def __init__(self, run_dir: str, resume_step: int | None) -> None:
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if resume_step is not None:
            _truncate_jsonl(self.path, resume_step)
        self.fh = open(self.path, "a" if resume_step is not None else "w")  # noqa: SIM115  closed in finish()

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.fh.write(json.dumps(_clean({"step": step, **values})) + "\n")
        self.fh.flush()

    def finish(self, summary: dict, events: list[dict], stages: dict[str, list[int]]) -> None:
        self.fh.close()

    def close(self) -> None:
        self.fh.close()


class WandbBackend(Backend):
    """wandb, offline by default (``wandb sync`` later); run files under <run_dir>/wandb."""

    def __init__(self, logger_cfg: Any, run_dir: str, config: dict) -> None:
        import wandb

        self.wandb = wandb
        self.histograms = bool(getattr(logger_cfg, "histograms", True))
        self.run = wandb.init(
            project=logger_cfg.project,
            entity=logger_cfg.entity,
            mode=logger_cfg.mode,
            dir=run_dir,
            name=os.path.basename(os.path.normpath(run_dir)),
            tags=list(logger_cfg.tags),
            config=config,
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True, disable_git=True),
        )

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def interval(self, step: int, report: Any, events: list[dict], stages: dict[str, list[int]]) -> None:
        wandb = self.wandb
        out: dict[str, Any] = {}
        for s in report.seeds:
            if s.stage in (Stage.GRAFTING, Stage.STABILIZATION, Stage.EVALUATING, Stage.FINE_TUNING, Stage.FOSSILIZED):
                out[f"alpha/{s.layer}/{s.seed}"] = s.alpha
        if self.histograms:
            for layer in report.layers:
                seeds = report.layer_seeds(layer)
                for name in HIST_FIELDS:
                    vals = np.array([getattr(s, name) for s in seeds], dtype=np.float64)
                    vals = vals[np.isfinite(vals)]
                    if vals.size:
                        out[f"telemetry/{layer}/{name}"] = wandb.Histogram(vals)
        if events:
            out["seed_states"] = wandb.Image(stage_image(stages), caption="rows: layers, columns: seeds")
        if out:
            self.run.log(out, step=step)

    def finish(self, summary: dict, events: list[dict], stages: dict[str, list[int]]) -> None:
        wandb = self.wandb
        cols = ["step", "layer", "seed", "command", "from", "to", "reason", "signals"]
        table = wandb.Table(columns=cols)
        for e in events:
            table.add_data(*[json.dumps(_clean(e[c])) if c == "signals" else e.get(c) for c in cols])
        self.run.log({"lifecycle_events": table, "seed_states": wandb.Image(stage_image(stages))})
        for k, v in summary.items():
            if isinstance(v, (int, float, str)):
                self.run.summary[k] = v
        self.run.finish()

    def close(self) -> None:
        self.run.finish(exit_code=1)


class RunLog:
    """Rank 0's log: run-dir files plus the configured backend."""

    def __init__(self, run_dir: str, backend: Backend, resume_step: int | None = None) -> None:
        self.run_dir, self.backend = run_dir, backend
        os.makedirs(run_dir, exist_ok=True)
        self.events_path = os.path.join(run_dir, "events.jsonl")
        self.telemetry_path = os.path.join(run_dir, "telemetry.jsonl")
        mode = "w"
        self.all_events: list[dict] = []
        if resume_step is not None:
            mode = "a"
            for path in (self.events_path, self.telemetry_path):
                _truncate_jsonl(path, resume_step)
            if os.path.exists(self.events_path):
                with open(self.events_path) as fh:
                    self.all_events = [json.loads(line) for line in fh if line.strip()]
        self.events_fh = open(self.events_path, mode)  # noqa: SIM115  closed in finish()
        self.telemetry_fh = open(self.telemetry_path, mode)  # noqa: SIM115

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.backend.metrics(step, values)

    def interval(self, step: int, report: Any, events: list[dict], stages: dict[str, list[int]]) -> None:
        for e in events:
            self.events_fh.write(json.dumps(_clean(e)) + "\n")
        for rec in report.records():
            self.telemetry_fh.write(json.dumps(_clean(rec)) + "\n")
        self.events_fh.flush()
        self.telemetry_fh.flush()
        self.all_events.extend(events)
        self.backend.interval(step, report, events, stages)

    def events(self, events: list[dict]) -> None:
        """Events outside a controller interval (a divergence restore and its rollbacks)."""
        for e in events:
            self.events_fh.write(json.dumps(_clean(e)) + "\n")
        self.events_fh.flush()
        self.all_events.extend(events)

    def finish(self, summary: dict, stages: dict[str, list[int]]) -> None:
        self.events_fh.close()
        self.telemetry_fh.close()
        with open(os.path.join(self.run_dir, "summary.json"), "w") as fh:
            json.dump(_clean(summary), fh, indent=2, sort_keys=True)
        self.backend.finish(summary, self.all_events, stages)

    def close(self) -> None:
        self.events_fh.close()
        self.telemetry_fh.close()
        self.backend.close()


class NullRunLog:
    """What non-zero ranks get: the RunLog interface, doing nothing."""

    def metrics(self, step: int, values: dict[str, float]) -> None:
        pass

    def interval(self, step: int, report: Any, events: list[dict], stages: dict[str, list[int]]) -> None:
        pass

    def events(self, events: list[dict]) -> None:
        pass

    def finish(self, summary: dict, stages: dict[str, list[int]]) -> None:
        pass

    def close(self) -> None:
        pass


def make_run_log(
    logger_cfg: Any, run_dir: str, *, is_main: bool, config: dict, resume_step: int | None = None
) -> RunLog | NullRunLog:
    if not is_main:
        return NullRunLog()
    os.makedirs(run_dir, exist_ok=True)
    name = logger_cfg.name
    if name == "wandb":
        backend: Backend = WandbBackend(logger_cfg, run_dir, config)
    elif name == "jsonl":
        backend = JsonlBackend(run_dir, resume_step)
    elif name == "none":
        backend = Backend()
    else:
        raise ValueError(f"logger.name={name!r} is not known; allowed values: ['wandb', 'jsonl', 'none']")
    return RunLog(run_dir, backend, resume_step)
