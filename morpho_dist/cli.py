"""Command line: ``python -m morpho_dist.train [overrides]`` or ``torchrun ... -m morpho_dist.train``.

``main()`` composes the config once itself (same tree, same overrides) so that a bad key, a bad group option
or a bad value ends the process with exit code 2 and ONE line naming the key, no traceback. Under torchrun,
rank 0 picks the run dir and hands it to every rank (MORPHO_RUN_DIR, read by conf/config.yaml), and the other
ranks turn off Hydra's output files and logging, so only rank 0 writes them. Then the Hydra app runs.
"""

from __future__ import annotations

import os
import re
import sys

import hydra
from omegaconf import DictConfig

from morpho_dist.config import register_configs, validate
from morpho_dist.errors import EXIT_CONFIG, EXIT_FAULT, ConfigError

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
RUN_DIR_ENV = "MORPHO_RUN_DIR"

register_configs()


GROUPS = tuple(sorted(d for d in os.listdir(CONF_DIR) if os.path.isdir(os.path.join(CONF_DIR, d))))


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
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")  # <repo>/conf, absolute: works under -m
def hydra_app(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from morpho_dist.checkpoint import CheckpointError
    from morpho_dist.distributed import read_env
    from morpho_dist.reliability import DesyncError, DivergenceError
    from morpho_dist.train import run

    if not cfg.run_dir:
        cfg.run_dir = HydraConfig.get().runtime.output_dir
    try:
        summary = run(cfg)
    except (ConfigError, FileNotFoundError, NotImplementedError) as err:
        _die(str(err))
    except (DesyncError, DivergenceError, CheckpointError) as err:  # on every rank that meets it
        env = read_env()
        _die(f"rank {env.rank}: {err}" if env.distributed else str(err), EXIT_FAULT)
    if read_env().is_main:
        shown = [f"{k}={summary[k]:.4f}" for k in ("val_acc", "val_loss", "val_bpb") if summary.get(k) is not None]
        print(
            " ".join(shown) + f" stages={ {k: v for k, v in summary['stage_counts'].items() if v} } "
            f"run_dir={summary['run_dir']}"
        )


def main() -> None:
    args = sys.argv[1:]
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-")]
    if any(
        f in ("--help", "-h", "--hydra-help", "--info", "-i", "--multirun", "-m", "--shell-completion", "-sc")
        for f in flags
    ) or any(f.startswith(("--cfg", "-c", "--info")) for f in flags):
        hydra_app()
        return
    cfg = _precheck(overrides)

    from morpho_dist import distributed

    env = distributed.read_env()
    device = distributed.pick_device(env, cfg.train.device) if env.distributed else None
    with distributed.process_group(env, device, float(cfg.reliability.collective_timeout_s)):
        if env.distributed:
            if RUN_DIR_ENV not in os.environ and not any(o.startswith("hydra.run.dir=") for o in overrides):
                os.environ[RUN_DIR_ENV] = distributed.shared_run_dir(env)
            if not env.is_main:
                sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
        hydra_app()


if __name__ == "__main__":
    main()
