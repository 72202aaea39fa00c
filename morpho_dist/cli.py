"""Command line: ``python -m morpho_dist.train [overrides]`` or ``torchrun ... -m morpho_dist.train``.

``main()`` composes the config once itself (same tree, same overrides) so that a bad key, a bad group option
or a bad value ends the process with exit code 2 and ONE line naming the key, no traceback. Under torchrun,
rank 0 picks the run dir and hands it to every rank (MORPHO_RUN_DIR, read by conf/config.yaml), and the other
ranks turn off Hydra's output files and logging, so only rank 0 writes them. Then the Hydra app runs.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import signal
import sys
import time

import hydra
from omegaconf import DictConfig

from morpho_dist.config import register_configs
from morpho_dist.config_rules import validate
from morpho_dist.errors import EXIT_CHECKPOINT, EXIT_CONFIG, EXIT_FAULT, ConfigError
from morpho_dist.interrupts import Interrupted, StopSignal

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
RUN_DIR_ENV = "MORPHO_RUN_DIR"
LAUNCH_CMD_ENV = "MORPHO_LAUNCH_CMD"  # set by launch/ scripts: how the user launched (for the resume command)
LAUNCH_ADDED_ENV = "MORPHO_LAUNCH_ADDED"  # overrides a launch/ script added to the user's own

register_configs()


GROUPS = tuple(sorted(d for d in os.listdir(CONF_DIR) if os.path.isdir(os.path.join(CONF_DIR, d)) and d != "hydra"))


def bad_override(overrides: list[str]) -> str | None:
    """The first override that is wrong on its own, as one line naming its key: one Hydra's grammar rejects
    (parsed alone), or a config group given something other than a plain option name (null, a number, an
    interpolation). None when each override is fine alone."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for ov in overrides:
        key = ov.split("=", 1)[0].lstrip("+~")
        try:
            (parsed,) = parser.parse_overrides([ov])
        except Exception as err:  # hydra's OverrideParseException and the lexer's errors
            reason = " ".join(str(err).split("See https://")[0].split())
            return f"{key}: malformed override {ov!r} ({reason})"
        if parsed.key_or_group.split("@")[0] in GROUPS and not parsed.is_delete():
            value = parsed.value()
            if not isinstance(value, str) or "${" in value:
                return f"{key}={value!r}: a config group takes an option name (one of the files in conf/{key}/)"
    return None


def one_line(err: BaseException, overrides: list[str] | None = None) -> str:
    """A one-line description of a composition or validation error that names the key or group (the override
    that caused it, when ``overrides`` are given and one of them is wrong on its own)."""
    blamed = bad_override(overrides) if overrides else None
    if blamed:
        return blamed
    text = str(err)
    missing = re.search(r"Could not find '([^']+)'", text)
    if missing:
        group, _, option = missing.group(1).rpartition("/")
        options = re.findall(r"^\t(\S+)$", text, flags=re.M)
        if group:
            return f"{group}={option}: no such option in group '{group}'; available options: {options}"
        return f"config {option!r} not found"
    cause = err.__cause__
    key = re.search(r"full_key: (\S+)", str(cause)) if cause is not None else None
    first = (str(cause) if cause is not None else text).strip().splitlines()[0]
    if key:
        if "not in" in first:
            return f"{key.group(1)}: unknown key ({first})"
        return f"{key.group(1)}: {first}"
    return " ".join(text.split())


def _precheck(overrides: list[str]) -> DictConfig:
    """Compose and validate like the Hydra app will; exits with one line on any config error."""
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name="precheck"):
            cfg = compose("config", overrides=overrides)
        validate(cfg)
        return cfg
    except ConfigError as err:
        _die(str(err))
    except Exception as err:  # Hydra/OmegaConf composition errors
        _die(one_line(err, overrides))
    raise AssertionError("unreachable")


def _die(message: str, code: int = EXIT_CONFIG) -> None:
    """One line on rank 0 (every rank meets the same config and the same collective errors), then exit."""
    if _is_main():
        print(f"error: {message}", file=sys.stderr)
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torchrun ends the other ranks as soon as one exits: leave rank 0 the moment it needs to print the line
        time.sleep(_RANK0_GRACE_S)
    sys.exit(code)


_RANK0_GRACE_S = 1.0


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


# What main() hands to the Hydra app (a @hydra.main function takes no arguments of its own).
_LAUNCH: dict = {"stop": None, "overrides": []}
# What a failed launch may leave in its run dir before it trained; such a run dir is removed.
_LAUNCH_LEFTOVERS = {".hydra", "train.log", ".run.lock"}


def _remove_if_untouched(run_dir: str) -> None:
    """Rank 0, after a launch that failed or stopped before it wrote anything: no empty run dir is left."""
    from morpho_dist.resume import run_dir_in_use

    untouched = os.path.isdir(run_dir) and set(os.listdir(run_dir)) <= _LAUNCH_LEFTOVERS
    if _is_main() and untouched and not run_dir_in_use(run_dir):  # never the dir of a live run that holds it
        logging.shutdown()  # Hydra's file handler holds train.log open
        shutil.rmtree(run_dir, ignore_errors=True)
        parent, cwd = os.path.dirname(os.path.abspath(run_dir)), os.getcwd()
        while parent.startswith(cwd + os.sep) and not os.listdir(parent):  # outputs/<date>/ left empty
            os.rmdir(parent)
            parent = os.path.dirname(parent)


def _shown_path(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def resume_command(overrides: list[str], checkpoint: str, run_dir: str) -> str:
    """The command that continues this run from ``checkpoint`` in the same run dir."""
    kept = [o for o in overrides if not o.startswith(("checkpoint.resume=", "hydra.run.dir=", "run_dir="))]
    for added in os.environ.get(LAUNCH_ADDED_ENV, "").split():  # arguments a launch/ script added itself
        if added in kept:
            kept.remove(added)
    launcher = os.environ.get(LAUNCH_CMD_ENV)
    if not launcher:
        env = os.environ
        if int(env.get("WORLD_SIZE", "1")) == 1:
            launcher = "python -m morpho_dist.train"
        elif int(env.get("GROUP_WORLD_SIZE", "1")) > 1:
            launcher = "<the same torchrun command>"
        else:
            launcher = (
                f"torchrun --nproc_per_node={env.get('LOCAL_WORLD_SIZE', env['WORLD_SIZE'])} -m morpho_dist.train"
            )
    args = [*kept, f"checkpoint.resume={_shown_path(checkpoint)}", f"hydra.run.dir={_shown_path(run_dir)}"]
    return f"{launcher} {shlex.join(args)}"


def _interrupted(stop: Interrupted, run_dir: str) -> None:
    if _is_main():
        name = signal.Signals(stop.signum).name
        if stop.checkpoint:
            where = f"last complete checkpoint {_shown_path(stop.checkpoint)}; resume with: "
            where += resume_command(_LAUNCH["overrides"], stop.checkpoint, run_dir)
        else:
            where = "no checkpoint to resume from (set checkpoint.every=N to save them, and one on interrupt)"
        line = f"interrupted ({name}) after step {stop.step}; {where}"
        logging.getLogger("morpho_dist.run").info(line)
        print(f"\n{line}", file=sys.stderr)
        _remove_if_untouched(run_dir)
    sys.exit(stop.exit_code)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")  # <repo>/conf, absolute: works under -m
def hydra_app(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from morpho_dist.checkpoint import CheckpointError
    from morpho_dist.reliability import DesyncError, DivergenceError
    from morpho_dist.train import run

    if not cfg.run_dir:
        cfg.run_dir = HydraConfig.get().runtime.output_dir
    run_dir = str(cfg.run_dir)
    try:
        summary = run(cfg, stop=_LAUNCH["stop"])
    except Interrupted as stop:
        _interrupted(stop, run_dir)
    except (ConfigError, FileNotFoundError, NotImplementedError) as err:
        _remove_if_untouched(run_dir)
        _die(str(err), EXIT_CONFIG)
    except CheckpointError as err:
        _remove_if_untouched(run_dir)
        _die(str(err), EXIT_CHECKPOINT)
    except (DesyncError, DivergenceError) as err:  # met on every rank together
        _die(str(err), EXIT_FAULT)
    if _is_main():
        shown = [f"{k}={summary[k]:.4f}" for k in ("val_acc", "val_loss", "val_bpb") if summary.get(k) is not None]
        print(
            " ".join(shown) + f" stages={ {k: v for k, v in summary['stage_counts'].items() if v} } "
            f"run_dir={summary['run_dir']}"
        )


def _check_launch(cfg: DictConfig, env) -> object:
    """What composing cannot check: the device and the mesh degrees against this launch's world size. Returns
    the device; exits with one line (code 2) when they do not fit."""
    from morpho_dist import distributed

    try:
        device = distributed.pick_device(env, cfg.train.device, int(cfg.train.ranks_per_device))
    except (RuntimeError, ValueError) as err:  # train.device='cuda' without CUDA; too few GPUs for the ranks
        _die(str(err))
    try:
        mode, _, seed = distributed.Mesh.degrees(cfg.sharding, env.world_size)
    except ValueError as err:
        _die(str(err))
    per_layer = int(cfg.seeds.per_layer)
    if cfg.seeds.enabled and per_layer % seed:
        _die(
            f"seeds.per_layer={per_layer} is not divisible by the seed degree {seed} (sharding={mode}, world size "
            f"{env.world_size}); use a multiple of {seed}"
        )
    if mode != "data" and env.world_size == 1 and _is_main():
        print(f"note: sharding={mode} on one process runs every seed here (as sharding=data)", file=sys.stderr)
    return device


def set_cpu_threads(env, device) -> None:
    """A single CPU process without OMP_NUM_THREADS: a quarter of the cores (1 to 8). torch's default (every
    core) oversubscribes small models and competes with the data loader and logger (torchrun sets 1 itself)."""
    if env.distributed or getattr(device, "type", "cpu") != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, min(8, cores // 4)))


def main() -> None:
    stop = StopSignal().install()
    args = sys.argv[1:]
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-")]
    if "--help" in flags or "-h" in flags:
        from morpho_dist.cli_help import help_text

        print(help_text(_precheck(overrides), CONF_DIR, GROUPS))
        return
    if any(
        f in ("--hydra-help", "--info", "-i", "--multirun", "-m", "--shell-completion", "-sc") for f in flags
    ) or any(f.startswith(("--cfg", "-c", "--info")) for f in flags):
        _LAUNCH.update(stop=stop, overrides=overrides)
        hydra_app()
        return
    cfg = _precheck(overrides)

    from morpho_dist import distributed

    env = distributed.read_env()
    device = _check_launch(cfg, env)
    set_cpu_threads(env, device)
    _LAUNCH.update(stop=stop, overrides=overrides)
    with distributed.process_group(
        env,
        device if env.distributed else None,
        float(cfg.reliability.collective_timeout_s),
        backend=str(cfg.sharding.backend),  # ranks sharing a GPU: gloo (NCCL refuses two ranks on one device)
        ranks_per_device=int(cfg.train.ranks_per_device),
    ):
        if env.distributed:
            if RUN_DIR_ENV not in os.environ and not any(o.startswith("hydra.run.dir=") for o in overrides):
                os.environ[RUN_DIR_ENV] = distributed.shared_run_dir(env)
            if not env.is_main:
                sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
        hydra_app()


if __name__ == "__main__":
    main()
