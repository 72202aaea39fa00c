"""Which checkpoint a run resumes from, and one run per run dir.

``resolve_resume`` turns ``checkpoint.resume`` (a checkpoint directory, a run directory, ``auto``) into a
validated checkpoint directory. ``auto`` takes the run dir's newest complete checkpoint (a restart, a relaunch
into the same dir), else the newest complete checkpoint under the outputs root whose marker ``fits`` the config
(``fits_config``: no fit key it records differs from this config's).

``run_dir_lock``: one run per run dir. Rank 0 holds an exclusive ``flock`` on ``<run_dir>/.run.lock`` (holding
its pid, host and start time) for the whole run; the kernel releases it when the process ends however it ends,
so a lock file left by a dead run is stale and taken over. A second run on the same dir stops with
``RunDirBusy`` (a ConfigError: one line, exit 2) on every rank before it writes anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from morpho_dist.checkpoint import (
    CKPT_DIR,
    MARKER,
    CheckpointError,
    config_mismatch,
    describe_failure,
    fit_config,
    is_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    read_marker,
    step_of,
    validate,
)
from morpho_dist.distributed import gather_object
from morpho_dist.errors import ConfigError

LOCK = ".run.lock"


class RunDirBusy(ConfigError):
    """Another live run holds the run dir's lock."""


def fits_config(config: Any) -> Callable[[dict], bool]:
    """Whether a checkpoint's marker fits ``config``: no fit key that both set differs (``auto`` skips the
    checkpoints of other runs that do not)."""
    fit = fit_config(config)
    return lambda marker: not config_mismatch(marker.get("config", {}), fit)


def find_auto_resume(run_dir: str, root: str, fits: Callable[[dict], bool] | None = None) -> str | None:
    """``checkpoint.resume=auto``: the newest complete checkpoint of this run dir (a restart, a relaunch into the
    same dir), else of the newest run under ``root`` (by its newest checkpoint's write time) whose checkpoint
    ``fits`` this config (a predicate over its marker); None when there is none."""
    own = latest_checkpoint(run_dir)
    if own is not None:
        return own
    found = []
    for marker in glob.glob(os.path.join(glob.escape(root), "**", CKPT_DIR, "step_*", MARKER), recursive=True):
        path = os.path.dirname(marker)
        step = step_of(path)
        if is_checkpoint(path) and step is not None and (fits is None or fits(read_marker(path))):
            found.append((os.path.getmtime(marker), step, path))
    return max(found)[2] if found else None


def outputs_root(run_dir: str) -> str:
    """Where ``auto`` looks for earlier runs: Hydra's ``outputs/`` when the run dir lies under it (the default
    ``outputs/<date>/<time>``), else the run dir's parent."""
    run_dir = os.path.abspath(run_dir)
    default = os.path.abspath("outputs")
    if run_dir.startswith(default + os.sep):
        return default
    return os.path.dirname(run_dir)


def resolve_resume(
    resume: str | None,
    run_dir: str,
    *,
    steps: int | None = None,
    fits: Callable[[dict], bool] | None = None,
    announce: bool = False,
) -> str | None:
    """checkpoint.resume -> a validated checkpoint directory or None.

    ``auto``: see ``find_auto_resume`` (None: start fresh); with ``announce`` one line says which checkpoint it
    took, or that it starts fresh. A checkpoint directory: itself; a run directory: its latest. Errors are one
    line naming ``checkpoint.resume`` (``CheckpointError``): no such checkpoint, an incomplete or corrupt one
    (never silently skipped; the hint names the newest complete one older than it), or one past ``steps``
    (``ConfigError``)."""
    if resume in (None, "", "null"):
        return None
    if resume == "auto":
        found = find_auto_resume(run_dir, outputs_root(run_dir), fits)
        if announce:
            root = os.path.relpath(outputs_root(run_dir))
            said = f"resuming from {found}" if found else f"no complete checkpoint that fits this config under {root}"
            print(f"checkpoint.resume=auto: {said}{'' if found else '; starting fresh'}", file=sys.stderr)
    elif os.path.isdir(resume) and (is_checkpoint(resume) or step_of(resume) is not None):
        found = resume
    elif os.path.isdir(resume):
        found = latest_checkpoint(resume)
        if found is None:
            raise CheckpointError(f"checkpoint.resume={resume!r}: no complete {CKPT_DIR}/step_*/ checkpoint there")
    else:
        raise CheckpointError(f"checkpoint.resume={resume!r}: no such checkpoint or run directory")
    if found is None:
        return None
    try:
        meta = validate(found)
    except CheckpointError as err:
        step = step_of(found)
        older = [p for s, p in list_checkpoints(os.path.dirname(os.path.dirname(found))) if step is None or s < step]
        hint = f"; the newest complete checkpoint before it is {older[-1]!r}" if older else ""
        raise CheckpointError(f"checkpoint.resume={resume!r}: {err}{hint}") from None
    if steps is not None and int(meta["step"]) > steps:
        raise ConfigError(
            f"checkpoint.resume={resume!r} is at step {meta['step']}, past train.steps={steps}; set "
            f"train.steps={meta['step']} or more to continue it"
        )
    return found


# ---- one run per run dir ------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _acquire(run_dir: str) -> tuple[int | None, str | None]:
    """Rank 0: (fd holding the exclusive lock, None) or (None, why not: one line)."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        lock = os.path.join(run_dir, LOCK)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        return None, f"run_dir={run_dir!r} cannot be locked ({describe_failure(err)})"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").split()
        os.close(fd)
        who = f"pid {holder[0]} on {holder[1]}" if len(holder) >= 2 else "another process"
        return None, (
            f"run_dir={run_dir!r} is in use by another run ({who}); wait for it to end or give this run another "
            "run_dir (hydra.run.dir=...)"
        )
    previous = os.pread(fd, 4096, 0).decode(errors="replace").split()
    if previous and previous[0].isdigit() and previous[1:2] == [socket.gethostname()]:
        state = "not running" if not _pid_alive(int(previous[0])) else "its lock released"
        print(f"note: run_dir={run_dir!r}: taking over the stale lock of pid {previous[0]} ({state})", file=sys.stderr)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode(), 0)
    return fd, None


def run_dir_in_use(run_dir: str) -> bool:
    """Whether a live process holds the run dir's lock (a refused second run must not clean up that dir)."""
    try:
        fd = os.open(os.path.join(run_dir, LOCK), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # releases the probe's lock too
    return False


@contextlib.contextmanager
def run_dir_lock(run_dir: str, is_main: bool) -> Iterator[str]:
    """Hold the run dir for this run (rank 0 holds the lock; collective when distributed): RunDirBusy on every
    rank when another live run holds it. Released on leaving, however (the emptied lock file stays: removing
    it could let two later runs lock two different files)."""
    fd, refusal = _acquire(run_dir) if is_main else (None, None)
    refusal = next((r for r in gather_object(refusal) if r), None)
    if refusal is not None:
        raise RunDirBusy(refusal)
    try:
        yield run_dir
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # releases the flock
