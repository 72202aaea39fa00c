"""One source of defaults: the schema dataclasses. Every value a conf/ YAML file sets equals its schema's default,
except the keys that make an option what it is (listed here by hand: a schedule's name, a sharding mode, ...)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from morpho_dist.config import SCHEMAS
from morpho_dist.controller import ControllerConfig

CONF = Path(__file__).resolve().parents[2] / "conf"

# (group, option) -> the keys in which that option differs from its schema's defaults, on purpose
OPTION_KEYS = {
    ("grafting", "linear"): {"name", "blend"},
    ("grafting", "multiplicative"): {"name", "blend"},
    ("model", "mlp_wide"): {"hidden"},
    ("schedule", "drift_controlled"): {"name"},
    ("schedule", "grad_norm_gated"): {"name"},
    ("schedule", "performance_linked"): {"name"},
    ("sharding", "seed"): {"mode"},
    ("sharding", "hybrid"): {"mode", "seed_degree"},
    ("optim", "sgd"): {"name"},
    ("kernel", "autotune"): {"autotune"},
    ("controller", "scaled"): {  # dwell times and budgets as fractions of train.steps
        "interval",
        "max_active",
        "germinate_per_interval",
        "warmup_steps",
        "min_training_steps",
        "max_training_steps",
        "max_grafting_steps",
        "stabilization_steps",
        "fine_tuning_steps",
        "embargo_steps",
    },
}


def _schema(group: str, node) -> type | None:
    """The schema an option names first in its defaults list (``- /schema/<group>@_here_: <name>``), or the one of
    the option it extends (``- default``)."""
    for entry in node.get("defaults", []):
        if isinstance(entry, str) and entry != "_self_":
            return _schema(group, OmegaConf.load(CONF / group / f"{entry}.yaml"))
        if not isinstance(entry, str):
            for key, name in entry.items():
                if str(key).startswith("/schema/"):
                    return {**SCHEMAS, "controller/controller": ControllerConfig}.get(f"{group}/{name}")
    return None


OPTIONS = sorted((p.parent.name, p.stem) for p in CONF.glob("*/*.yaml"))


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_yaml_values_are_the_schema_defaults(group, option):
    node = OmegaConf.load(CONF / group / f"{option}.yaml")
    schema = _schema(group, node)
    if schema is None:
        pytest.skip(f"conf/{group}/{option}.yaml names no schema of morpho_dist.config")
    defaults = {f.name: getattr(schema(), f.name) for f in dataclasses.fields(schema)}
    values = OmegaConf.to_container(node, resolve=False)
    values.pop("defaults", None)
    unknown = sorted(set(values) - set(defaults))
    assert not unknown, f"conf/{group}/{option}.yaml sets keys its schema {schema.__name__} lacks: {unknown}"
    allowed = OPTION_KEYS.get((group, option), set())
    differ = {k: (v, defaults[k]) for k, v in values.items() if k not in allowed and v != defaults[k]}
    assert not differ, f"conf/{group}/{option}.yaml contradicts {schema.__name__} (yaml, dataclass): {differ}"
    for key in allowed:  # the listed keys really are what makes the option differ
        assert key in values and values[key] != defaults[key], (group, option, key)


def test_every_default_option_has_a_schema():
    chosen = {"model": "mlp", "data": "digits", "seeds": "default", "grafting": "additive"}
    chosen.update(schedule="fixed_ramp", controller="default", sharding="data", kernel="default")
    chosen.update(logger="wandb", optim="adamw")
    for group, option in chosen.items():
        assert _schema(group, OmegaConf.load(CONF / group / f"{option}.yaml")) is not None, (group, option)
