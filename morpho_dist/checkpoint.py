"""Save and resume: model (host + SeededLayer buffers and banks), optimizers, controller, RNG, step and the
train loop's own carried state. Rank 0 writes ``<run_dir>/checkpoints/step_<k>.pt`` with torch.save (atomic
rename); every rank reads it. (A later issue moves this to torch.distributed.checkpoint.)

A run stopped after step k and resumed ends with the same summary as an uninterrupted run: batches are a
function of (seed, step), and everything else that evolves is in here.
"""

from __future__ import annotations

import glob
import os
import random
import re
from typing import Any

import numpy as np
import torch

CKPT_DIR = "checkpoints"
_STEP_RE = re.compile(r"step_(\d+)\.pt$")


def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, CKPT_DIR, f"step_{step:07d}.pt")


def latest_checkpoint(run_dir: str) -> str | None:
    paths = glob.glob(os.path.join(run_dir, CKPT_DIR, "step_*.pt"))
    steps = [(int(m.group(1)), p) for p in paths if (m := _STEP_RE.search(p))]
    return max(steps)[1] if steps else None


def resolve_resume(resume: str | None, run_dir: str) -> str | None:
    """checkpoint.resume -> a checkpoint file or None. ``auto``: this run dir's latest (None if there is none);
    a directory: its latest (error if none); a file: itself."""
    if resume in (None, "", "null"):
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    if os.path.isdir(resume):
        found = latest_checkpoint(resume)
        if found is None:
            raise FileNotFoundError(f"checkpoint.resume={resume!r}: no {CKPT_DIR}/step_*.pt in that directory")
        return found
    if not os.path.isfile(resume):
        raise FileNotFoundError(f"checkpoint.resume={resume!r}: no such checkpoint file or run directory")
    return resume


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    path: str, *, step: int, model: torch.nn.Module, optimizers: Any, controller: Any, extra: dict | None = None
) -> str:
    """Write one checkpoint (call on rank 0 only)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    payload = {
        "step": int(step),
        "model": model.state_dict(),
        "optim": optimizers.state_dict(),
        "controller": controller.state_dict() if controller is not None else None,
        "rng": rng_state(),
        "extra": extra or {},
    }
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load(
    path: str, *, model: torch.nn.Module, optimizers: Any, controller: Any, device: torch.device
) -> tuple[int, dict]:
    """Restore everything in place; returns (step, extra)."""
    payload = torch.load(path, map_location="cpu", weights_only=False)  # load_state_dict copies to the device
    model.load_state_dict(payload["model"])
    optimizers.load_state_dict(payload["optim"])
    if controller is not None and payload.get("controller") is not None:
        controller.load_state_dict(payload["controller"])
    set_rng_state(payload["rng"])
    return int(payload["step"]), dict(payload.get("extra", {}))
