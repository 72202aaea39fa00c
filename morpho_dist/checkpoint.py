"""Save and resume with torch.distributed.checkpoint (DCP), in a layout that does not depend on the mesh.

``<run_dir>/checkpoints/step_<k>/`` is a DCP checkpoint (``.metadata`` + ``*.distcp``), written by every rank
together into ``step_<k>.tmp/``; rank 0 then writes the marker ``checkpoint.json`` (step, size and blake2b of
every file) and renames the directory, so a ``step_<k>/`` with its marker is complete, and a crash or a failed
save never leaves a half-written checkpoint under a final name nor touches the existing ones. The newest
``checkpoint.keep`` complete checkpoints are kept. Loading validates the marker and the checksums first: a
missing, incomplete or corrupt checkpoint is a ``CheckpointError`` naming the path. The marker lists every
file of the checkpoint (a file it does not list, or a listed file that is missing, makes it corrupt) and the
config keys that decide the tensors' shapes (``FIT_KEYS``): a resume under a config that does not fit names the
keys that differ. A save whose host tensors are not all finite is not written (a rollback must never restore a
poisoned state), and a checkpoint whose host tensors are not finite is refused on load.

A failed save (a full disk, a read-only or unwritable directory, any exception of DCP's, which raises
``CheckpointException``, a ``BaseException``) removes its ``.tmp`` and raises ``CheckpointError`` on every rank,
one line naming the path and the cause; the existing checkpoints are untouched.

Which checkpoint a run resumes from (``checkpoint.resume``, ``auto``) and the run dir's lock are
morpho_dist.resume, built on this module.

Every tensor is stored in its global view (morpho_dist.sharding): tensor-parallel host parameters and their
optimizer state as DTensors, each seeded layer's per-seed state, blueprint bank and seed-optimizer state as one
tensor of the whole population (seed shards are DTensor Shard(0) pieces of it), replicated tensors once.
Loading fills the live tensors of whatever mesh the resuming run has, so a checkpoint saved under ``sharding=seed``
on 2 ranks loads on 1 rank, under ``data``, ``hybrid``, and the reverse.

Keys: ``model.<param>``, ``seeds.<layer>.<buffer or bank.p0/p1>``, ``optim.host.<param>.<state>``,
``optim.seeds.<layer>.<state>``, ``train.prev_host.<param>`` and ``meta`` (step, controller, RNG, extra).
Telemetry accumulated since the last controller interval is saved reduced over ``dp`` and normalized to the
global batch; on load dp-rank 0 holds it (rescaled to the new dp degree), the other replicas start at zero,
so the next report equals the uninterrupted run's. A run stopped after step k and resumed ends with the same
summary as an uninterrupted one: batches are a function of (seed, step), and everything else is in here.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from morpho_dist.distributed import barrier, gather_object
from morpho_dist.kernels.layout import F_ABSMAX
from morpho_dist.sharding import global_view, seed_view
from morpho_dist.telemetry import grad_field_scale

CKPT_DIR = "checkpoints"
MARKER = "checkpoint.json"  # written last, inside the temporary directory, before the rename
TMP_SUFFIX = ".tmp"
_STEP_RE = re.compile(r"step_(\d+)$")
# Config keys that decide which tensors a checkpoint holds and their shapes (a resume must match them). The
# marker records them and ``load`` refuses a config that differs, so they live here, under morpho_dist.resume.
FIT_KEYS = (
    "model",
    "data.name",
    "data.features",
    "data.classes",
    "seeds.enabled",
    "seeds.targets",
    "seeds.exclude",
    "seeds.per_layer",
    "seeds.kind",
    "seeds.rank",
    "seeds.act",
    "seeds.blend",
    "optim.name",
)
HOST_PREFIXES = ("model.", "optim.host.", "train.prev_host.")
FULL_DISK_BYTES = 1 << 20  # a failed save on a filesystem with less free space than this names the full disk


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or corrupt, or a save that failed; the message names the path."""


def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, CKPT_DIR, f"step_{step:07d}")


def is_checkpoint(path: str) -> bool:
    """A complete checkpoint: its marker was written (after every rank's files), then it was renamed."""
    return not str(path).endswith(TMP_SUFFIX) and os.path.isfile(os.path.join(path, MARKER))


def _file_digests(path: str) -> dict[str, list]:
    """name -> [size, blake2b] of every file of a checkpoint directory but the marker."""
    out = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name == MARKER or not os.path.isfile(full):
            continue
        h = hashlib.blake2b(digest_size=16)
        with open(full, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        out[name] = [os.path.getsize(full), h.hexdigest()]
    return out


def validate(path: str) -> dict:
    """The marker of a complete, intact checkpoint (step and file checksums); CheckpointError naming the path
    and what is wrong otherwise."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    marker = os.path.join(path, MARKER)
    if not os.path.isfile(marker):
        raise CheckpointError(f"checkpoint {path!r} is incomplete: no {MARKER} (its write did not finish)")
    try:
        with open(marker) as fh:
            meta = json.load(fh)
        files, step = dict(meta["files"]), int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path!r} is corrupt: unreadable {MARKER} ({err})") from None
    found = _file_digests(path)
    if ".metadata" not in files:
        raise CheckpointError(f"checkpoint {path!r} is corrupt: its {MARKER} does not list .metadata")
    unlisted = sorted(set(found) - set(files))
    if unlisted:
        raise CheckpointError(f"checkpoint {path!r} is corrupt: file {unlisted[0]!r} is not listed in its {MARKER}")
    for name, (size, digest) in files.items():
        if name not in found:
            raise CheckpointError(f"checkpoint {path!r} is corrupt: file {name!r} is missing")
        if found[name][0] != size or found[name][1] != digest:
            raise CheckpointError(
                f"checkpoint {path!r} is corrupt: file {name!r} does not match its checksum "
                f"(size {found[name][0]}, expected {size})"
            )
    m = _STEP_RE.search(os.path.normpath(path))
    if m and int(m.group(1)) != step:
        raise CheckpointError(f"checkpoint {path!r} is corrupt: its marker says step {step}")
    return meta


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints of a run dir, oldest first (unvalidated: see ``validate``)."""
    paths = glob.glob(os.path.join(run_dir, CKPT_DIR, "step_*"))
    return sorted((int(m.group(1)), p) for p in paths if (m := _STEP_RE.search(p)) and is_checkpoint(p))


def latest_checkpoint(run_dir: str, max_step: int | None = None) -> str | None:
    """The newest complete checkpoint (at or before ``max_step`` when given), or None."""
    found = [(s, p) for s, p in list_checkpoints(run_dir) if max_step is None or s <= max_step]
    return found[-1][1] if found else None


def step_of(path: str) -> int | None:
    """The step of a ``step_<k>`` checkpoint directory's path, None for another path."""
    m = _STEP_RE.search(os.path.normpath(path))
    return int(m.group(1)) if m else None


def read_marker(path: str) -> dict:
    """A checkpoint's marker, unvalidated ({} when it cannot be read)."""
    try:
        with open(os.path.join(path, MARKER)) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


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


def fit_config(cfg: Any) -> dict[str, Any]:
    """The FIT_KEYS of a config, flattened to dotted keys with plain values."""
    from omegaconf import OmegaConf

    out: dict[str, Any] = {}
    for key in FIT_KEYS:
        value = OmegaConf.select(cfg, key, default=None) if cfg is not None else None
        if value is None:
            continue
        value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def config_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """'key=current (checkpoint: saved)' for every fit key the two configs both set and set differently."""
    return [
        f"{k}={current[k]!r} (checkpoint: {saved[k]!r})"
        for k in sorted(saved)
        if k in current and current[k] != saved[k]
    ]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def nonfinite_host_tensors(sd: Mapping[str, Any]) -> list[str]:
    """The host tensors of a state dict (model, host optimizer state, previous host snapshot) holding a
    non-finite value on this rank."""
    return [
        key
        for key, t in sd.items()
        if key.startswith(HOST_PREFIXES)
        and torch.is_tensor(t)
        and t.is_floating_point()
        and not bool(torch.isfinite(_local(t)).all())
    ]


def describe_failure(err: BaseException) -> str:
    """One line for the cause of a failed save: DCP's CheckpointException carries each rank's exception with
    its traceback (many lines); the first rank's exception is named instead."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, (inner, _trace) = sorted(failures.items())[0]
        return f"rank {rank}: {describe_failure(inner)}"
    if isinstance(err, OSError) and err.errno is not None:
        where = f": {err.filename!r}" if err.filename else ""
        return f"{type(err).__name__} [{errno.errorcode.get(err.errno, err.errno)}] {err.strerror}{where}"
    return " ".join(f"{type(err).__name__}: {err}".split())


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
    keep: int = 0,
    config: Any = None,
) -> str | None:
    """Write one DCP checkpoint atomically; every rank calls it (collective when distributed). The files go to
    ``<path>.tmp``; rank 0 adds the marker and renames it to ``path`` once every rank's files are there, then
    keeps the newest ``keep`` checkpoints (0: all). Returns the path, or None (on every rank, with a warning
    from rank 0) when a host tensor is not finite: such a state is never written. A failed save removes the
    ``.tmp`` and raises CheckpointError on every rank, leaving the existing checkpoints as they were."""
    sd: dict[str, Any] = state_dict(
        mesh=mesh, layers=layers, host_params=host_params, optimizers=optimizers, prev_host=prev_host
    )
    main = mesh.rank == 0
    bad = sorted({k for part in gather_object(nonfinite_host_tensors(sd)) for k in part})
    if bad:
        if main:
            print(
                f"warning: not saving checkpoint {path!r}: {len(bad)} host tensor(s) hold non-finite values "
                f"(first: {bad[0]}); the last complete checkpoint stays the newest",
                file=sys.stderr,
            )
        return None
    sd["meta"] = pickle.dumps(
        {  # one opaque leaf (DCP would flatten a dict, dropping its empty parts)
            "step": int(step),
            "controller": controller.state_dict() if controller is not None else None,
            "rng": rng_state(),
            "extra": extra or {},
            "mesh": {"mode": mesh.mode, "dp": mesh.dp, "seed": mesh.seed},
        }
    )
    tmp = path.rstrip(os.sep) + TMP_SUFFIX
    failure: str | None = None
    try:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a save that died
            os.makedirs(tmp)
    except OSError as err:
        failure = describe_failure(err)
    failure = next((f for f in gather_object(failure) if f), None)  # rank 0's verdict, on every rank
    if failure is None:
        try:
            with warnings.catch_warnings():  # DCP says it saves "in a single process" without a process group
                warnings.filterwarnings("ignore", message=".*single process.*", category=UserWarning)
                dcp.save(sd, checkpoint_id=tmp)  # collective: a failure on one rank raises on every rank
            barrier()  # every rank's files are written
            if main:
                _commit(tmp, path, step, keep, fit_config(config))
        except (KeyboardInterrupt, SystemExit):
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        except BaseException as err:  # noqa: BLE001  DCP's CheckpointException is a BaseException
            failure = describe_failure(err)
        failure = next((f for f in gather_object(failure) if f), None)
    if failure is not None:
        failure += _space_note(os.path.dirname(tmp), failure)
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"saving checkpoint {path!r} failed ({failure}); the .tmp was removed, the earlier checkpoints are "
            "untouched"
        )
    return path


def _space_note(directory: str, failure: str) -> str:
    """'; no space left on the device (N bytes free)' when the filesystem of ``directory`` is (nearly) full and
    the failure does not say so itself (torch's serializer reports a full disk as 'unexpected pos ...')."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return ""
    if free >= FULL_DISK_BYTES or "ENOSPC" in failure:
        return ""
    return f"; no space left on the device ({free} bytes free)"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: str, path: str, step: int, keep: int, config: dict | None = None) -> None:
    """Rank 0, after every rank wrote its files into ``tmp``: the marker (every file with its checksum, the fit
    config), then the rename to the final name; an existing checkpoint of the same step is replaced only after
    that succeeded. Then only the newest ``keep`` complete checkpoints (and no temporary directory) are left."""
    marker = {"format": 2, "step": int(step), "files": _file_digests(tmp), "config": config or {}}
    with open(os.path.join(tmp, MARKER), "w") as fh:
        json.dump(marker, fh)
        fh.flush()
        os.fsync(fh.fileno())
    old = None
    if os.path.exists(path):
        old = f"{path}.replaced-{os.getpid()}"
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync_dir(os.path.dirname(path))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    parent = os.path.dirname(path)
    if keep > 0:
        for _, stale in list_checkpoints(os.path.dirname(parent))[:-keep]:
            if os.path.abspath(stale) != os.path.abspath(path):
                shutil.rmtree(stale, ignore_errors=True)
    for name in os.listdir(parent):
        if name.endswith(TMP_SUFFIX) or ".replaced-" in name:
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _ensure_host_optim_state(optimizers: Any, host_params: list, saved: set[str]) -> None:
    """Allocate the host optimizer's per-parameter state that the checkpoint holds (torch optimizers create
    it lazily at their first step), so that DCP can load into it."""
    host = getattr(optimizers, "host", None)
    if host is None:
        return
    # a capturable or fused optimizer (the CUDA default here) keeps its step counters on the parameter's device
    on_device = {id(p) for g in host.param_groups if g.get("capturable") or g.get("fused") for p in g["params"]}
    for name, p in host_params:
        st = host.state[p]
        step_device = p.device if id(p) in on_device else torch.device("cpu")
        for key in [k[len(f"optim.host.{name}.") :] for k in saved if k.startswith(f"optim.host.{name}.")]:
            if key not in st:
                st[key] = torch.zeros((), device=step_device) if key == "step" else torch.zeros_like(p)


def load(
    path: str,
    *,
    mesh: Any,
    layers: Mapping[str, Any],
    host_params: list[tuple[str, torch.nn.Parameter]],
    optimizers: Any,
    controller: Any,
    prev_host: list[torch.Tensor] | None = None,
    config: Any = None,
) -> tuple[int, dict]:
    """Restore everything in place from a checkpoint saved under any mesh; returns (step, extra). The
    checkpoint is validated first (CheckpointError naming the path when it is missing, incomplete or corrupt,
    or when ``config`` does not fit it: one line with the keys that differ)."""
    marker = validate(path)
    differ = config_mismatch(marker.get("config", {}), fit_config(config)) if config is not None else []
    if differ:
        raise CheckpointError(f"checkpoint {path!r} does not fit this config: {'; '.join(differ)}")
    saved = set(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)
    _ensure_host_optim_state(optimizers, host_params, saved)
    sd: dict[str, Any] = state_dict(
        mesh=mesh, layers=layers, host_params=host_params, optimizers=optimizers, prev_host=prev_host, telemetry=False
    )
    missing = sorted(k for k in sd if k not in saved and not k.startswith("train."))
    if missing:
        raise CheckpointError(f"checkpoint {path!r} does not fit this model: it lacks {missing[:3]}")
    shapes = {
        k: tuple(m.size)
        for k, m in dcp.FileSystemReader(path).read_metadata().state_dict_metadata.items()
        if hasattr(m, "size")
    }
    differ = [
        f"{k} {tuple(v.shape)} (checkpoint: {shapes[k]})"
        for k, v in sd.items()
        if k in shapes and torch.is_tensor(v) and tuple(v.shape) != shapes[k]
    ]
    if differ:
        raise CheckpointError(f"checkpoint {path!r} does not fit this model: {'; '.join(differ[:3])}")
    sd = {k: v for k, v in sd.items() if k in saved}
    sd["meta"] = b""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*single process.*", category=UserWarning)
            dcp.load(sd, checkpoint_id=path)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # noqa: BLE001  DCP's CheckpointException is a BaseException
        raise CheckpointError(f"loading checkpoint {path!r} failed ({describe_failure(err)})") from None
    bad = sorted({k for part in gather_object(nonfinite_host_tensors(sd)) for k in part})
    if bad:
        raise CheckpointError(
            f"checkpoint {path!r} is not usable: {len(bad)} host tensor(s) hold non-finite values (first: {bad[0]})"
        )
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
        layer.refresh_idle_record()  # DCP wrote the stages in place: read them again
    meta = pickle.loads(sd["meta"])
    if controller is not None and meta.get("controller") is not None:
        controller.load_state_dict(meta["controller"])
    set_rng_state(meta["rng"])
    return int(meta["step"]), dict(meta.get("extra", {}))
