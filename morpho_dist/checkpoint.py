"""Save and resume with torch.distributed.checkpoint (DCP), in a layout that does not depend on the mesh.

``<run_dir>/checkpoints/step_<k>/`` is a DCP checkpoint (``.metadata`` + ``*.distcp``), written by every rank
together. Every tensor is stored in its global view (morpho_dist.sharding): tensor-parallel host parameters
and their optimizer state as DTensors, each seeded layer's per-seed state, blueprint bank and seed-optimizer
state as one tensor of the whole population (seed shards are DTensor Shard(0) pieces of it), replicated
tensors once. Loading fills the live tensors of whatever mesh the resuming run has, so a checkpoint saved
under ``sharding=seed`` on 2 ranks loads on 1 rank, under ``data``, ``hybrid``, and the reverse.

Keys: ``model.<param>``, ``seeds.<layer>.<buffer or bank.p0/p1>``, ``optim.host.<param>.<state>``,
``optim.seeds.<layer>.<state>``, ``train.prev_host.<param>`` and ``meta`` (step, controller, RNG, extra).
Telemetry accumulated since the last controller interval is saved reduced over ``dp`` and normalized to the
global batch; on load dp-rank 0 holds it (rescaled to the new dp degree), the other replicas start at zero,
so the next report equals the uninterrupted run's. A run stopped after step k and resumed ends with the same
summary as an uninterrupted one: batches are a function of (seed, step), and everything else is in here.
"""

from __future__ import annotations

import glob
import os
import pickle
import random
import re
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from morpho_dist.kernels.layout import F_ABSMAX
from morpho_dist.sharding import global_view, seed_view
from morpho_dist.telemetry import grad_field_scale

CKPT_DIR = "checkpoints"
_STEP_RE = re.compile(r"step_(\d+)$")


def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, CKPT_DIR, f"step_{step:07d}")


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ".metadata"))


def latest_checkpoint(run_dir: str) -> str | None:
    paths = glob.glob(os.path.join(run_dir, CKPT_DIR, "step_*"))
    steps = [(int(m.group(1)), p) for p in paths if (m := _STEP_RE.search(p)) and is_checkpoint(p)]
    return max(steps)[1] if steps else None


def resolve_resume(resume: str | None, run_dir: str) -> str | None:
    """checkpoint.resume -> a checkpoint directory or None. ``auto``: this run dir's latest (None if there is
    none); a checkpoint directory: itself; a run directory: its latest (error if none)."""
    if resume in (None, "", "null"):
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    if os.path.isdir(resume):
        if is_checkpoint(resume):
            return resume
        found = latest_checkpoint(resume)
        if found is None:
            raise FileNotFoundError(f"checkpoint.resume={resume!r}: no {CKPT_DIR}/step_*/ checkpoint in that directory")
        return found
    raise FileNotFoundError(f"checkpoint.resume={resume!r}: no such checkpoint or run directory")


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


# ---- the global-view state dict -----------------------------------------------------------------------------
def _host_optim_state(optimizers: Any) -> dict:
    host = getattr(optimizers, "host", None)
    return host.state if host is not None else {}


def _global_telemetry(layer: Any, mesh: Any) -> torch.Tensor:
    """The layer's accumulation since the last report, summed over dp replicas, normalized to the global
    batch (this is the only collective of a save outside DCP's own: two all_reduces over ``dp``)."""
    tel = layer.telemetry.detach().double() * grad_field_scale(mesh.dp).to(layer.telemetry.device)
    if mesh.dp > 1 and mesh.device_mesh is not None:
        group = mesh.group("dp")
        absmax = tel[:, F_ABSMAX].clone()
        dist.all_reduce(tel, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(absmax, op=dist.ReduceOp.MAX, group=group)
        tel[:, F_ABSMAX] = absmax
    return tel.float()


def state_dict(
    *,
    mesh: Any,
    layers: Mapping[str, Any],
    host_params: list[tuple[str, torch.nn.Parameter]],
    optimizers: Any,
    prev_host: list[torch.Tensor] | None = None,
    telemetry: bool = True,
) -> dict[str, torch.Tensor]:
    """Every tensor of the training state in its global view (views of the live tensors, except telemetry)."""
    sd: dict[str, torch.Tensor] = {}
    for name, p in host_params:
        sd[f"model.{name}"] = global_view(p, p)
    for lname, layer in layers.items():
        for key, t in [*layer.named_parameters(), *layer.named_buffers()]:
            if key == "telemetry":
                t = _global_telemetry(layer, mesh) if telemetry else torch.zeros_like(t)
            sd[f"seeds.{lname}.{key}"] = seed_view(t, mesh)
    seeds_opt = getattr(optimizers, "seeds", None)
    if seeds_opt is not None:
        for lname, st in seeds_opt.state.items():
            for key, t in st.items():
                sd[f"optim.seeds.{lname}.{key}"] = seed_view(t, mesh)
    state = _host_optim_state(optimizers)
    for name, p in host_params:
        for key, v in state.get(p, {}).items():
            if torch.is_tensor(v):
                sd[f"optim.host.{name}.{key}"] = global_view(v, p) if v.shape == p.shape else v.detach()
    for (name, p), t in zip(host_params, prev_host or []):
        sd[f"train.prev_host.{name}"] = global_view(t, p)
    return sd


def save(
    path: str,
    *,
    step: int,
    mesh: Any,
    layers: Mapping[str, Any],
    host_params: list[tuple[str, torch.nn.Parameter]],
    optimizers: Any,
    controller: Any,
    prev_host: list[torch.Tensor] | None = None,
    extra: dict | None = None,
) -> str:
    """Write one DCP checkpoint; every rank calls it (collective when distributed)."""
    sd: dict[str, Any] = state_dict(
        mesh=mesh, layers=layers, host_params=host_params, optimizers=optimizers, prev_host=prev_host
    )
    sd["meta"] = pickle.dumps(
        {  # one opaque leaf (DCP would flatten a dict, dropping its empty parts)
            "step": int(step),
            "controller": controller.state_dict() if controller is not None else None,
            "rng": rng_state(),
            "extra": extra or {},
            "mesh": {"mode": mesh.mode, "dp": mesh.dp, "seed": mesh.seed},
        }
    )
    if mesh.rank == 0:
        os.makedirs(path, exist_ok=True)
    with warnings.catch_warnings():  # DCP says it saves "in a single process" when there is no process group
        warnings.filterwarnings("ignore", message=".*single process.*", category=UserWarning)
        dcp.save(sd, checkpoint_id=path)
    return path


def _ensure_host_optim_state(optimizers: Any, host_params: list, saved: set[str]) -> None:
    """Allocate the host optimizer's per-parameter state that the checkpoint holds (torch optimizers create
    it lazily at their first step), so that DCP can load into it."""
    host = getattr(optimizers, "host", None)
    if host is None:
        return
    for name, p in host_params:
        st = host.state[p]
        for key in [k[len(f"optim.host.{name}.") :] for k in saved if k.startswith(f"optim.host.{name}.")]:
            if key not in st:
                st[key] = torch.zeros((), dtype=torch.float32) if key == "step" else torch.zeros_like(p)


def load(
    path: str,
    *,
    mesh: Any,
    layers: Mapping[str, Any],
    host_params: list[tuple[str, torch.nn.Parameter]],
    optimizers: Any,
    controller: Any,
    prev_host: list[torch.Tensor] | None = None,
) -> tuple[int, dict]:
    """Restore everything in place from a checkpoint saved under any mesh; returns (step, extra)."""
    saved = set(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)
    _ensure_host_optim_state(optimizers, host_params, saved)
    sd: dict[str, Any] = state_dict(
        mesh=mesh, layers=layers, host_params=host_params, optimizers=optimizers, prev_host=prev_host, telemetry=False
    )
    missing = sorted(k for k in sd if k not in saved and not k.startswith("train."))
    if missing:
        raise ValueError(f"checkpoint {path!r} does not match this model: missing {missing[:5]}")
    sd = {k: v for k, v in sd.items() if k in saved}
    sd["meta"] = b""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*", category=UserWarning)
        dcp.load(sd, checkpoint_id=path)
    scale = 1.0 / grad_field_scale(mesh.dp)
    for lname, layer in layers.items():
        tel = sd[f"seeds.{lname}.telemetry"]
        tel = tel.to_local() if hasattr(tel, "to_local") else tel
        with torch.no_grad():
            if mesh.dp_rank == 0:
                layer.telemetry.copy_((tel.double() * scale.to(tel.device)).float())
            else:  # the other replicas add nothing to the sums; the max is idempotent
                layer.telemetry.zero_()
                layer.telemetry[:, F_ABSMAX] = tel[:, F_ABSMAX]
    meta = pickle.loads(sd["meta"])
    if controller is not None and meta.get("controller") is not None:
        controller.load_state_dict(meta["controller"])
    set_rng_state(meta["rng"])
    return int(meta["step"]), dict(meta.get("extra", {}))
