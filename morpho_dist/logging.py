"""Run logs: the run dir's files (always, rank 0) plus one logger backend (wandb | jsonl | none).

Rank 0 gets a ``RunLog``; every other rank gets a ``NullRunLog`` with the same methods doing nothing, so the
train loop never asks "am I rank 0?" or "is wandb on?". Files in the run dir, whatever the logger:
- ``events.jsonl``: every lifecycle decision (step, layer, seed, command, from, to, reason, signals)
- ``telemetry.jsonl``: one health record per seed per controller interval
- ``summary.json``: the final summary returned by train.run
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from typing import Any

import numpy as np

from morpho_dist.lifecycle import Stage
from morpho_dist.plots import STAGE_COLORS, stage_image  # noqa: F401  STAGE_COLORS: the plots' colours

LOG = logging.getLogger("morpho_dist.run")  # Hydra's job logging writes it to <run_dir>/train.log
WANDB_ID = "run_id"  # <run_dir>/wandb/run_id: the wandb run of this run dir, continued by a resume

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


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSONL log. A line that does not parse (the torn last line a crash or a full disk leaves
    behind) is dropped, with a one-line note on stderr: it never stops a resume."""
    records, torn = [], 0
    with open(path, "rb") as fh:
        for raw in fh:
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except ValueError:
                torn += 1
                continue
            if isinstance(rec, dict):
                records.append(rec)
            else:
                torn += 1
    if torn:
        note = f"note: {path}: dropped {torn} torn line(s) (a write cut short by a crash or a full disk)"
        print(note, file=sys.stderr)
    return records


def _truncate_jsonl(path: str, after_step: int, source: str | None = None) -> list[dict]:
    """Keep the records of steps <= after_step (a resumed run rewrites the later ones) and drop any torn line;
    with ``source`` (the same file of the run dir it resumed from), the records are carried over from there, so
    that a run resumed into a new run dir holds its whole history. The file is replaced whole (written aside,
    then renamed): a crash here leaves the old file or the new one. Returns the records kept."""
    source = source or path
    if not os.path.exists(source):
        return []
    keep = [rec for rec in read_jsonl(source) if rec.get("step", 0) <= after_step]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        fh.writelines(json.dumps(rec) + "\n" for rec in keep)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return keep


def _write_lines(fh: Any, records: list[dict]) -> None:
    """Whole lines in one write, flushed: what a crash can leave is at most one torn last line."""
    if records:
        fh.write("".join(json.dumps(_clean(rec)) + "\n" for rec in records))
        fh.flush()


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

    def __init__(self, run_dir: str, resume_step: int | None, source_dir: str | None = None) -> None:
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if resume_step is not None:
            _truncate_jsonl(self.path, resume_step, source_dir and os.path.join(source_dir, "metrics.jsonl"))
        self.fh = open(self.path, "a" if resume_step is not None else "w")  # noqa: SIM115  closed in finish()

    def metrics(self, step: int, values: dict[str, float]) -> None:
        _write_lines(self.fh, [{"step": step, **values}])

    def finish(self, summary: dict, events: list[dict], stages: dict[str, list[int]]) -> None:
        self.fh.close()

    def close(self) -> None:
        self.fh.close()


class WandbBackend(Backend):
    """wandb, offline by default (``wandb sync`` later); run files under <run_dir>/wandb."""

    def __init__(self, logger_cfg: Any, run_dir: str, config: dict, resume_step: int | None = None) -> None:
        import wandb

        self.wandb = wandb
        self.histograms = bool(getattr(logger_cfg, "histograms", True))
        id_path = os.path.join(run_dir, "wandb", WANDB_ID)
        run_id = None
        if resume_step is not None and os.path.isfile(id_path):  # a resume in the same run dir continues its run
            with open(id_path) as fh:
                run_id = fh.read().strip() or None
        self.run = wandb.init(
            id=run_id,
            resume="allow" if run_id else None,
            project=logger_cfg.project,
            entity=logger_cfg.entity,
            mode=logger_cfg.mode,
            dir=run_dir,
            name=os.path.basename(os.path.normpath(run_dir)),
            tags=list(logger_cfg.tags),
            config=config,
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True, disable_git=True),
        )
        os.makedirs(os.path.dirname(id_path), exist_ok=True)
        with open(id_path, "w") as fh:
            fh.write(self.run.id)

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
        if events:  # the picture changes only with a decision
            out["seed_states"] = wandb.Image(stage_image(stages, step), caption="stage of every seed")
        if out:
            self.run.log(out, step=step)

    def finish(self, summary: dict, events: list[dict], stages: dict[str, list[int]]) -> None:
        wandb = self.wandb
        cols = ["step", "layer", "seed", "command", "from", "to", "reason", "signals"]
        table = wandb.Table(columns=cols)
        for e in events:
            table.add_data(*[json.dumps(_clean(e[c])) if c == "signals" else e.get(c) for c in cols])
        image = wandb.Image(stage_image(stages, summary.get("steps")), caption="stage of every seed at the end")
        self.run.log({"lifecycle_events": table, "seed_states": image})
        for k, v in summary.items():
            if isinstance(v, (int, float, str)):
                self.run.summary[k] = v
        self.run.finish()

    def close(self) -> None:
        self.run.finish(exit_code=1)


class RunLog:
    """Rank 0's log: run-dir files plus the configured backend."""

    def __init__(
        self, run_dir: str, backend: Backend, resume_step: int | None = None, source_dir: str | None = None
    ) -> None:
        self.run_dir, self.backend = run_dir, backend
        os.makedirs(run_dir, exist_ok=True)
        self.events_path = os.path.join(run_dir, "events.jsonl")
        self.telemetry_path = os.path.join(run_dir, "telemetry.jsonl")
        mode = "w"
        self.all_events: list[dict] = []
        if resume_step is not None:
            mode = "a"
            src = {
                p: source_dir and os.path.join(source_dir, os.path.basename(p))
                for p in (self.events_path, self.telemetry_path)
            }
            self.all_events = _truncate_jsonl(self.events_path, resume_step, src[self.events_path])
            _truncate_jsonl(self.telemetry_path, resume_step, src[self.telemetry_path])
            if source_dir:
                LOG.info("resumed at step %d from %s (its records up to there carried over)", resume_step, source_dir)
        self.events_fh = open(self.events_path, mode)  # noqa: SIM115  closed in finish()
        self.telemetry_fh = open(self.telemetry_path, mode)  # noqa: SIM115

    def metrics(self, step: int, values: dict[str, float]) -> None:
        shown = " ".join(f"{k}={v:.4g}" for k, v in values.items() if not k.startswith("stages/"))
        LOG.info("step %d: %s", step, shown)
        self.backend.metrics(step, values)

    def interval(self, step: int, report: Any, events: list[dict], stages: dict[str, list[int]]) -> None:
        for e in events:
            LOG.info(
                "step %d: %s[%s] %s: %s -> %s (%s)",
                step,
                e["layer"],
                e["seed"],
                e["command"],
                e["from"],
                e["to"],
                e.get("reason"),
            )
        _write_lines(self.events_fh, events)
        _write_lines(self.telemetry_fh, list(report.records()))
        self.all_events.extend(events)
        self.backend.interval(step, report, events, stages)

    def events(self, events: list[dict]) -> None:
        """Events outside a controller interval (a divergence restore and its rollbacks)."""
        _write_lines(self.events_fh, events)
        self.all_events.extend(events)

    def finish(self, summary: dict, stages: dict[str, list[int]]) -> None:
        shown = {k: summary[k] for k in ("steps", "val_loss", "val_acc", "effective_params") if k in summary}
        LOG.info("finished: %s; stages %s", shown, {k: v for k, v in summary.get("stage_counts", {}).items() if v})
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
    logger_cfg: Any,
    run_dir: str,
    *,
    is_main: bool,
    config: dict,
    resume_step: int | None = None,
    resumed_from: str | None = None,
) -> RunLog | NullRunLog:
    """``resumed_from``: the checkpoint the run resumed from; when it belongs to another run dir, that run's
    records up to ``resume_step`` are carried into this one (events, telemetry, jsonl metrics)."""
    if not is_main:
        return NullRunLog()
    os.makedirs(run_dir, exist_ok=True)
    source = os.path.dirname(os.path.dirname(os.path.abspath(resumed_from))) if resumed_from else None
    source = source if source and source != os.path.abspath(run_dir) else None
    name = logger_cfg.name
    if name == "wandb":
        backend: Backend = WandbBackend(logger_cfg, run_dir, config, resume_step)
    elif name == "jsonl":
        backend = JsonlBackend(run_dir, resume_step, source)
    elif name == "none":
        backend = Backend()
    else:
        raise ValueError(f"logger.name={name!r} is not known; allowed values: ['wandb', 'jsonl', 'none']")
    return RunLog(run_dir, backend, resume_step, source)
