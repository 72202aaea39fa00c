"""Value validation of a composed config, and one Hydra group's config outside the app.

The schemas of morpho_dist.config fix keys and types at compose time; ``validate(cfg)`` checks what types
cannot (positive counts, powers of two, known choices, seeds dividing the seeded widths) and raises
``ConfigError`` with a one-line message naming the key; the CLI prints it and exits non-zero. ``RULES``: one
``Rule`` per numeric field of every schema. ``group_config`` turns a dict, a dataclass or an OmegaConf node
into one group's schema dataclass under the same checks (the engine's config arguments).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from morpho_dist.blends import BLEND_NAMES
from morpho_dist.config import (
    CausalLMTaskConfig,
    CheckpointConfig,
    Cifar10Config,
    CNNConfig,
    Config,
    DigitsConfig,
    GPTConfig,
    GraftingConfig,
    KernelConfig,
    MLPConfig,
    OptimConfig,
    ReliabilityConfig,
    SeedsConfig,
    ShardingConfig,
    SyntheticConfig,
    TextConfig,
    TrainConfig,
    TransformerConfig,
)
from morpho_dist.errors import ConfigError
from morpho_dist.kernels.options import DOT_PRECISIONS, LOWRANK_MATHS
from morpho_dist.schedules import SCHEDULES, ScheduleConfig

CHOICES = {
    "seeds.kind": ("lowrank", "diagonal"),
    "seeds.act": ("relu", "gelu_tanh"),
    "seeds.blend": BLEND_NAMES,
    "grafting.blend": BLEND_NAMES,
    "schedule.name": SCHEDULES,
    "schedule.shape": ("linear", "cosine"),
    "sharding.mode": ("data", "seed", "hybrid"),
    "sharding.backend": ("auto", "nccl", "gloo"),
    "kernel.backend": ("auto", "triton", "reference"),
    "kernel.dot_precision": DOT_PRECISIONS,
    "kernel.lowrank_math": LOWRANK_MATHS,
    "logger.name": ("wandb", "jsonl", "none"),
    "optim.name": ("adamw", "adam", "sgd"),
    "train.device": ("auto", "cpu", "cuda"),
}


@dataclass(frozen=True)
class Rule:
    """The allowed values of one numeric field (of each element, for a list field): finite, within
    [lo, hi] (an end excluded when ``lo_open`` / ``hi_open``), a power of two when ``pow2`` (0 too with
    ``or_zero``)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    pow2: bool = False
    or_zero: bool = False

    def describe(self) -> str:
        parts = []
        if self.pow2:
            parts.append("a power of two" + (" or 0" if self.or_zero else ""))
        if self.lo is not None and self.hi is not None:
            parts.append(f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}")
        elif self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        elif self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
        return "a finite number" + (" " + " and ".join(parts) if parts else "")

    def allows(self, v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        if self.pow2 and not (_is_pow2(v) or (self.or_zero and v == 0)):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)


COUNT, POSITIVE, NON_NEGATIVE, ANY = Rule(lo=1), Rule(lo=0, lo_open=True), Rule(lo=0), Rule()
FRACTION, OPEN_FRACTION = Rule(0, 1), Rule(0, 1, lo_open=True, hi_open=True)
WARPS = Rule(1, 32, pow2=True)

# One rule per numeric field of every schema (tests/unit/test_config_rules.py checks that none is missing):
# schema class -> field -> Rule. A value outside its rule (nan and inf included) is refused naming its key.
RULES: dict[Any, dict[str, Rule]] = {
    Config: {"seed": NON_NEGATIVE},
    MLPConfig: {"embed": NON_NEGATIVE, "hidden": COUNT},
    CNNConfig: {"channels": COUNT, "hidden": COUNT},
    TransformerConfig: {"d_model": COUNT, "heads": COUNT, "layers": COUNT, "mlp_hidden": COUNT, "token_dim": COUNT},
    GPTConfig: {"width": COUNT, "depth": COUNT, "heads": COUNT, "mlp_width": COUNT},
    DigitsConfig: {"val_fraction": OPEN_FRACTION},
    SyntheticConfig: {
        "samples": Rule(lo=2),
        "features": COUNT,
        "classes": Rule(lo=2),
        "noise": NON_NEGATIVE,
        "val_fraction": OPEN_FRACTION,
    },
    Cifar10Config: {"val_fraction": Rule(0, 1, hi_open=True)},  # 0: the standard test batch
    TextConfig: {"seq_len": COUNT, "val_fraction": OPEN_FRACTION, "max_bytes": NON_NEGATIVE, "val_windows": COUNT},
    CausalLMTaskConfig: {"bytes_per_token": POSITIVE},
    SeedsConfig: {"per_layer": COUNT, "rank": COUNT, "dead_eps": NON_NEGATIVE},
    ScheduleConfig: {
        "ramp_steps": COUNT,
        "min_factor": NON_NEGATIVE,
        "max_factor": NON_NEGATIVE,
        "drift_threshold": NON_NEGATIVE,
        "grad_lo": NON_NEGATIVE,
        "grad_hi": NON_NEGATIVE,
    },
    ShardingConfig: {"seed_degree": NON_NEGATIVE},
    KernelConfig: {
        "block_rows": Rule(lo=1, pow2=True),
        "block_cols": Rule(lo=0, pow2=True, or_zero=True),
        "num_warps": WARPS,
        "bwd_num_warps": WARPS,
        "lowrank_rows": Rule(lo=16, pow2=True),  # tl.dot tiles
        "lowrank_warps": WARPS,
        "programs_per_sm": Rule(1, 64),
    },
    OptimConfig: {
        "weight_decay": NON_NEGATIVE,
        "betas": Rule(0, 1, hi_open=True),
        "momentum": Rule(0, 1, hi_open=True),
        "seed_lr_scale": NON_NEGATIVE,
        "max_grad_norm": NON_NEGATIVE,
    },
    TrainConfig: {
        "steps": COUNT,
        "batch_size": COUNT,
        "lr": POSITIVE,
        "eval_batch": NON_NEGATIVE,
        "log_every": NON_NEGATIVE,
        "rec_weight": NON_NEGATIVE,
        "ranks_per_device": COUNT,
    },
    CheckpointConfig: {"every": NON_NEGATIVE, "keep": NON_NEGATIVE},
    ReliabilityConfig: {
        "divergence_factor": NON_NEGATIVE,
        "divergence_floor": NON_NEGATIVE,
        "divergence_sigmas": NON_NEGATIVE,
        "window": COUNT,
        "max_rollbacks": NON_NEGATIVE,
        "collective_timeout_s": Rule(0, 7 * 24 * 3600, lo_open=True),  # a timedelta a process group accepts
    },
}


def _controller_rules() -> dict[str, Rule]:
    return {
        "interval": COUNT,
        "max_active": NON_NEGATIVE,
        "germinate_per_interval": NON_NEGATIVE,
        "warmup_steps": NON_NEGATIVE,
        "germinate_grad_quantile": FRACTION,
        "dead_frac_threshold": FRACTION,
        "patience_k": COUNT,
        "benefit_threshold": NON_NEGATIVE,
        "rec_rel_threshold": NON_NEGATIVE,
        "min_training_steps": NON_NEGATIVE,
        "max_training_steps": NON_NEGATIVE,
        "alpha_done": Rule(0, 1, lo_open=True),
        "max_grafting_steps": COUNT,
        "stabilization_steps": NON_NEGATIVE,
        "evaluate_threshold": ANY,
        "fine_tuning_steps": NON_NEGATIVE,
        "fossilize_threshold": ANY,
        "embargo_steps": NON_NEGATIVE,
    }


def rules() -> dict[Any, dict[str, Rule]]:
    """RULES plus the controller's (its schema lives in morpho_dist.controller, imported on first use)."""
    from morpho_dist.controller import ControllerConfig

    return {**RULES, ControllerConfig: _controller_rules()}


# Relations between fields: (key, the other key, check(value, other), what it must be).
RELATIONS = (
    ("schedule.min_factor", "schedule.max_factor", lambda a, b: a <= b, "<="),
    ("schedule.grad_lo", "schedule.grad_hi", lambda a, b: a <= b, "<="),
    ("controller.min_training_steps", "controller.max_training_steps", lambda a, b: a <= b, "<="),
)


def _get(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _is_pow2(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0 and v & (v - 1) == 0


def _schema_target(schema: Any) -> Any:
    return next((f.default for f in dataclasses.fields(schema) if f.name == "_target_"), None)


def check_known_keys(cfg: Any, prefix: str = "") -> None:
    """Keys added with ``+key=value`` that no schema declares are refused too. A node whose ``_target_`` is not
    its schema's own (a user's class) is checked against that callable's signature when it is built instead
    (morpho_dist.targets)."""
    schema = OmegaConf.get_type(cfg)
    own_target = dataclasses.is_dataclass(schema) and cfg.get("_target_", None) == _schema_target(schema)
    if dataclasses.is_dataclass(schema) and (own_target or _schema_target(schema) is None):
        known = {f.name for f in dataclasses.fields(schema)}
        for key in cfg:
            if key not in known:
                raise ConfigError(f"{prefix}{key} is not a known key; allowed keys here: {sorted(known)}")
    for key in cfg:
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
            check_known_keys(node, f"{prefix}{key}.")


def _show(v: Any) -> str:
    return str(v) if isinstance(v, float) and not math.isfinite(v) else repr(v)


def check_rules(cfg: Any, table: dict[Any, dict[str, Rule]], prefix: str = "") -> None:
    """Every numeric field of every schema node against its rule (list fields: each element)."""
    schema = OmegaConf.get_type(cfg)
    for name, rule in table.get(schema, {}).items():
        if name not in cfg:
            continue
        value = cfg[name]
        if isinstance(value, ListConfig):
            if not all(rule.allows(v) for v in value):
                shown = "[" + ", ".join(_show(v) for v in value) + "]"
                raise ConfigError(f"{prefix}{name}={shown} is not allowed; each value must be {rule.describe()}")
        elif not rule.allows(value):
            raise ConfigError(f"{prefix}{name}={_show(value)} is not allowed; it must be {rule.describe()}")
    for key in cfg:
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
            check_rules(node, table, f"{prefix}{key}.")


def validate(cfg: Any) -> None:
    """Check the values of a composed config; ConfigError (one line, naming the key) on the first bad one."""
    check_known_keys(cfg)
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; allowed values: {list(allowed)}")
    check_rules(cfg, rules())
    for key, other, ok, what in RELATIONS:
        if not ok(_get(cfg, key), _get(cfg, other)):
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be {what} {other}={_get(cfg, other)!r}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas={list(cfg.optim.betas)!r} must hold two values (beta1, beta2)")
    if cfg.optim.fused and (cfg.optim.foreach or cfg.optim.name == "sgd"):
        raise ConfigError(
            f"optim.fused=true works with optim.name in ['adamw', 'adam'] and optim.foreach unset or false "
            f"(got optim.name={cfg.optim.name!r}, optim.foreach={cfg.optim.foreach})"
        )
    if cfg.sharding.backend == "nccl" and (cfg.train.device == "cpu" or cfg.train.ranks_per_device > 1):
        raise ConfigError(
            "sharding.backend='nccl' needs train.device=cuda and train.ranks_per_device=1 (NCCL gives each rank "
            "its own GPU); allowed values with a CPU or a shared GPU: ['auto', 'gloo']"
        )
    for name, style in cfg.sharding.tp_plan.items():
        if style not in ("colwise", "rowwise"):
            raise ConfigError(
                f"sharding.tp_plan.{name}={style!r} is not allowed; allowed values: ['colwise', 'rowwise']"
            )
    from morpho_dist.targets import locate_target

    for group in ("model", "data", "task"):
        if not cfg[group].get("_target_", None):
            raise ConfigError(f"{group}._target_ is not set (pick a {group}=<option> or set {group}._target_)")
        locate_target(cfg[group], group)  # importable, or one line naming <group>._target_
    if cfg.model._target_ == CNNConfig._target_ and cfg.sharding.mode != "data":
        raise ConfigError(
            f"sharding.mode={cfg.sharding.mode!r}: model=cnn supports sharding=data only (seed and hybrid sharding "
            "need Linear host layers around each seeded point: use model=mlp or model=transformer)"
        )
    if cfg.model._target_ == CNNConfig._target_ and cfg.data._target_ == SyntheticConfig._target_:
        raise ConfigError("model=cnn needs image data; data=synthetic is flat (use data=digits or cifar10)")
    validate_task_data(cfg)
    if cfg.seeds.enabled:
        validate_seeded_widths(cfg)


def validate_task_data(cfg: Any) -> None:
    """The task must fit the data's kind (class labels vs token streams)."""
    from morpho_dist.data import data_spec
    from morpho_dist.task import build_task

    task = build_task(cfg.task)
    kind = data_spec(cfg.data, int(cfg.seed)).kind
    if task.data_kind is not None and task.data_kind != kind:
        need = {"labelled": "labelled data (data=digits, synthetic, cifar10)", "tokens": "token data (data=text)"}
        fits = {"labelled": "task=classification", "tokens": "task=causal_lm"}[kind]
        raise ConfigError(
            f"task={task.name} needs {need[task.data_kind]}; data={cfg.data.get('name', cfg.data._target_)} gives "
            f"{kind}: use {fits}"
        )


def validate_seeded_widths(cfg: Any) -> None:
    """seeds.per_layer must divide the width of every seeded layer (and leave C >= 16 for lowrank)."""
    import torch

    from morpho_dist.blueprints import LOWRANK_MIN_CHUNK
    from morpho_dist.data import data_spec
    from morpho_dist.models import build_model
    from morpho_dist.wrap import find_targets, seeded_width

    spec = data_spec(cfg.data, int(cfg.seed))
    with torch.device("meta"):  # shapes only: no memory, no draws from the RNG
        model = build_model(cfg.model, spec)
    targets = cfg.seeds.targets
    if not isinstance(targets, str):
        targets = list(targets)
    try:
        names = find_targets(model, targets, list(cfg.seeds.exclude))
    except ValueError as err:
        raise ConfigError(
            f"seeds.targets={targets!r} matches no seedable module of model={cfg.model.get('name', '')} "
            f"({cfg.model._target_}); "
            f"{str(err).split('; ')[-1]}"
        ) from None
    n = cfg.seeds.per_layer
    for name in names:
        module = model.get_submodule(name)
        width = seeded_width(module)[0]
        if width % n:
            raise ConfigError(f"seeds.per_layer={n} does not divide the width {width} of seeded layer {name!r}")
        if cfg.seeds.kind == "lowrank" and width // n < LOWRANK_MIN_CHUNK:
            raise ConfigError(
                f"seeds.per_layer={n} leaves chunks of {width // n} < {LOWRANK_MIN_CHUNK} features on layer "
                f"{name!r}, too small for seeds.kind='lowrank' (use fewer seeds or seeds.kind=diagonal)"
            )


# ---- one group outside the app (the engine's config arguments) -------------------------------------------------
# Schema defaults that point at another group of the app's tree, and what they mean without that tree.
_OUTSIDE_APP = {("seeds", "blend"): GraftingConfig.blend}


def _as_mapping(group: str, value: Any) -> dict:
    if value is None:
        return {}
    if isinstance(value, DictConfig):
        out = OmegaConf.to_container(value, resolve=False)
        for key in out:
            try:  # resolved against the node's root (the app's whole config); left as written when it cannot be
                resolved = value[key]
            except Exception:
                continue
            is_container = isinstance(resolved, (DictConfig, ListConfig))
            out[key] = OmegaConf.to_container(resolved, resolve=True) if is_container else resolved
        return out
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return dict(value)
    raise ValueError(f"{group}: expected a dict, a dataclass or an OmegaConf node, got {type(value).__name__}")


def _unresolved(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("${") and value.endswith("}")


def group_config(group: str, value: Any, schema: type) -> Any:
    """``value`` (None, a dict, a dataclass or an OmegaConf node with the keys of the Hydra group ``group``) as an
    instance of ``schema``, every missing key at its schema default. ValueError (ConfigError) naming the key on an
    unknown key, a value of the wrong type, or a value ``validate`` refuses for that group."""
    data = _as_mapping(group, value)
    known = [f.name for f in dataclasses.fields(schema)]
    for key in data:
        if key not in known:
            raise ConfigError(f"{group}.{key} is not a known key; allowed keys: {sorted(known)}")
    defaults = schema()
    for key in known:
        if _unresolved(data.get(key, getattr(defaults, key))):  # a default that points into the app's tree
            if (group, key) not in _OUTSIDE_APP:
                raise ConfigError(f"{group}.{key} is required (its default points into the Hydra app's config)")
            data[key] = _OUTSIDE_APP[(group, key)]
    node = OmegaConf.structured(schema)
    try:
        node = OmegaConf.merge(node, data)
    except Exception as err:  # omegaconf's ValidationError and friends, which carry full_key
        key = getattr(err, "full_key", None) or "?"
        first = str(err).strip().splitlines()[0]
        raise ConfigError(f"{group}.{key}={data.get(key)!r}: {first}") from None
    for full, allowed in CHOICES.items():
        g, _, key = full.partition(".")
        if g == group and node[key] not in allowed:
            raise ConfigError(f"{full}={node[key]!r} is not allowed; allowed values: {list(allowed)}")
    check_rules(node, rules(), f"{group}.")
    for full, other, ok, what in RELATIONS:
        (g, _, key), (g2, _, key2) = full.partition("."), other.partition(".")
        if g == g2 == group and not ok(node[key], node[key2]):
            raise ConfigError(f"{full}={node[key]!r} must be {what} {other}={node[key2]!r}")
    return OmegaConf.to_object(node)
