"""Config checks from the schema: every numeric field has one rule, and a fuzz of bad overrides (nan, inf and
-inf for every float key found in the composed configs, plus a hand-written table of out-of-range values for
every numeric key) each stops the front door with exit code 2 and one line naming the key. A few go through the
real command line, which must leave no run dir behind."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import subprocess
import sys
import typing

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, ListConfig

from morpho_dist import cli
from morpho_dist.cli import CONF_DIR
from morpho_dist.config import SCHEMAS, Config, register_configs
from morpho_dist.config_rules import rules
from morpho_dist.controller import ControllerConfig

register_configs()
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# every option of the groups whose schemas differ, so that each schema's keys are reached
VARIANTS = (
    [],
    ["model=cnn"],
    ["model=transformer", "optim=sgd"],
    ["data=synthetic"],
    ["data=cifar10", "model=cnn"],
)

# Out-of-range values, written by hand (independent of config_rules.RULES): (variant overrides, bad override).
OUT_OF_RANGE = [
    ([], "seed=-1"),
    ([], "train.steps=0"),
    ([], "train.batch_size=0"),
    ([], "train.lr=0"),
    ([], "train.lr=-0.1"),
    ([], "train.eval_batch=-1"),
    ([], "train.log_every=-1"),
    ([], "train.rec_weight=-1"),
    ([], "checkpoint.every=-1"),
    ([], "checkpoint.keep=-1"),
    ([], "optim.weight_decay=-0.1"),
    ([], "optim.betas=[2.0,3.0]"),
    ([], "optim.betas=[0.9,1.0]"),
    ([], "optim.betas=[-0.1,0.9]"),
    ([], "optim.betas=[0.9]"),
    ([], "optim.seed_lr_scale=-1"),
    (["optim=sgd"], "optim.momentum=1.5"),
    (["optim=sgd"], "optim.momentum=-0.5"),
    ([], "seeds.per_layer=0"),
    ([], "seeds.rank=0"),
    ([], "seeds.dead_eps=-1"),
    ([], "controller.interval=0"),
    ([], "controller.max_active=-1"),
    ([], "controller.germinate_per_interval=-1"),
    ([], "controller.warmup_steps=-1"),
    ([], "controller.germinate_grad_quantile=1.5"),
    ([], "controller.dead_frac_threshold=-0.1"),
    ([], "controller.patience_k=0"),
    ([], "controller.benefit_threshold=-1"),
    ([], "controller.rec_rel_threshold=-1"),
    ([], "controller.min_training_steps=-1"),
    ([], "controller.max_training_steps=5"),  # below min_training_steps (20)
    ([], "controller.alpha_done=0"),
    ([], "controller.alpha_done=1.5"),
    ([], "controller.max_grafting_steps=0"),
    ([], "controller.stabilization_steps=-1"),
    ([], "controller.fine_tuning_steps=-1"),
    ([], "controller.embargo_steps=-1"),
    ([], "schedule.ramp_steps=0"),
    ([], "schedule.min_factor=-1"),
    ([], "schedule.max_factor=-1"),
    ([], "schedule.drift_threshold=-1"),
    ([], "schedule.grad_lo=-1"),
    ([], "schedule.grad_lo=20"),  # above grad_hi (10)
    ([], "sharding.seed_degree=-1"),
    ([], "kernel.block_rows=0"),
    ([], "kernel.block_rows=48"),
    ([], "kernel.block_cols=3"),
    ([], "kernel.num_warps=64"),
    ([], "kernel.bwd_num_warps=3"),
    ([], "kernel.lowrank_rows=8"),
    ([], "kernel.lowrank_warps=0"),
    ([], "kernel.programs_per_sm=65"),
    ([], "reliability.divergence_factor=-1"),
    ([], "reliability.divergence_floor=-1"),
    ([], "reliability.divergence_sigmas=-1"),
    ([], "reliability.window=0"),
    ([], "reliability.max_rollbacks=-1"),
    ([], "reliability.collective_timeout_s=0"),
    ([], "reliability.collective_timeout_s=1e9"),
    ([], "model.embed=-1"),
    ([], "model.hidden=[0]"),
    ([], "model.hidden=[4,-2]"),
    (["model=cnn"], "model.channels=[0]"),
    (["model=cnn"], "model.hidden=0"),
    (["model=transformer"], "model.d_model=0"),
    (["model=transformer"], "model.heads=0"),
    (["model=transformer"], "model.layers=0"),
    (["model=transformer"], "model.mlp_hidden=0"),
    (["model=transformer"], "model.token_dim=0"),
    ([], "data.val_fraction=1.0"),
    ([], "data.val_fraction=0"),
    (["data=synthetic"], "data.samples=1"),
    (["data=synthetic"], "data.features=0"),
    (["data=synthetic"], "data.classes=1"),
    (["data=synthetic"], "data.noise=-0.5"),
    (["data=cifar10", "model=cnn"], "data.val_fraction=1.0"),
]


def _numeric_leaves(node, prefix: str = "") -> dict[str, type]:
    """dotted key -> int or float for every numeric leaf (or numeric list) of a composed config."""
    out: dict[str, type] = {}
    for key in node:
        value = node[key]
        name = f"{prefix}{key}"
        if isinstance(value, DictConfig):
            out.update(_numeric_leaves(value, name + "."))
        elif isinstance(value, ListConfig) and len(value) and all(isinstance(v, (int, float)) for v in value):
            out[name] = float if any(isinstance(v, float) for v in value) else int
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = type(value)
    return out


def _non_finite_overrides() -> list[tuple[list[str], str]]:
    """nan, inf and -inf for every float key of every variant (each key once)."""
    seen: set[str] = set()
    out = []
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for variant in VARIANTS:
            for key, kind in _numeric_leaves(compose("config", overrides=variant)).items():
                if kind is not float or key in seen:
                    continue
                seen.add(key)
                listy = key == "optim.betas"
                for bad in ("nan", "inf", "-inf"):
                    out.append((variant, f"{key}=[{bad},0.9]" if listy else f"{key}={bad}"))
    return out


FUZZ = OUT_OF_RANGE + _non_finite_overrides()


def test_every_numeric_schema_field_has_one_rule():
    table = rules()
    schemas = {*SCHEMAS.values(), Config, ControllerConfig}
    for field_type in list(schemas):  # the nested dataclasses of the root (train, checkpoint, reliability, ...)
        for f in dataclasses.fields(field_type):
            if dataclasses.is_dataclass(f.default_factory if callable(f.default_factory) else None):
                schemas.add(f.default_factory)
    missing = []
    for schema in schemas:
        hints = typing.get_type_hints(schema)
        for f in dataclasses.fields(schema):
            hint = hints[f.name]
            args = typing.get_args(hint)
            numeric = hint in (int, float) or (typing.get_origin(hint) is list and args and args[0] in (int, float))
            if numeric and f.name not in table.get(schema, {}):
                missing.append(f"{schema.__name__}.{f.name}")
    assert not missing, f"numeric fields without a rule in config_rules.RULES: {missing}"


def test_fuzz_has_at_least_100_bad_overrides():
    assert len(FUZZ) >= 100 and len({ov for _, ov in FUZZ}) >= 100


def _precheck(overrides: list[str]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli._precheck(overrides)
        except SystemExit as exc:
            return exc.code, out.getvalue(), err.getvalue()
    return None, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("variant, bad", FUZZ, ids=[" ".join([*v, b]) for v, b in FUZZ])
def test_bad_override_is_one_line_and_exit_2(variant, bad):
    code, out, err = _precheck([*variant, bad])
    assert code == cli.EXIT_CONFIG, f"{bad}: exit code {code!r}; stderr {err!r}"
    lines = err.splitlines()
    assert out == "" and len(lines) == 1 and "Traceback" not in err, err
    key = bad.split("=", 1)[0]
    assert key in lines[0] or key.rsplit(".", 1)[-1] in lines[0], lines[0]


@pytest.mark.parametrize(
    "bad", ["train.lr=inf", "reliability.divergence_factor=nan", "optim.betas=[2.0,3.0]", "model.hidden=[0]"]
)
def test_cli_refuses_without_leaving_a_run_dir(tmp_path, bad):
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    run_dir = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "morpho_dist.train", bad, "logger=none", f"hydra.run.dir={run_dir}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1 and bad.split("=")[0] in lines[0], res.stderr
    assert not run_dir.exists() and os.listdir(tmp_path) == []
