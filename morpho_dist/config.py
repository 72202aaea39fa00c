"""Config schemas (registered in Hydra's ConfigStore) and value validation.

Every group of conf/ starts its defaults list with its schema from here (``- mlp_schema``), so a typo in a key
or a value of the wrong type fails at compose time naming the key. ``validate(cfg)`` checks what types cannot
(positive counts, powers of two, known choices, seeds dividing the seeded widths) and raises ``ConfigError``
with a one-line message naming the key; the CLI prints it and exits non-zero.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from morpho_dist.blends import BLEND_NAMES
from morpho_dist.errors import ConfigError
from morpho_dist.kernels.options import DOT_PRECISIONS, LOWRANK_MATHS, KernelOptions
from morpho_dist.schedules import SCHEDULES, ScheduleConfig


# ---- groups ----------------------------------------------------------------------------------------------------
@dataclass
class MLPConfig:
    """A linear embedding (the seeded point) followed by a narrow ReLU core: capacity is deliberately short."""

    _target_: str = "morpho_dist.models.MLP"
    name: str = "mlp"
    embed: int = 32  # width of the linear input embedding (0: none)
    hidden: list[int] = field(default_factory=lambda: [4])  # widths of the ReLU core after the embedding
    act: str = "relu"  # activation of the core
    seed_targets: Any = field(default_factory=lambda: ["embed"])  # modules seeded by default (seeds.targets)


@dataclass
class CNNConfig:
    _target_: str = "morpho_dist.models.CNN"
    name: str = "cnn"
    channels: list[int] = field(default_factory=lambda: [32, 32])  # output channels of each conv block
    hidden: int = 32  # width of the classifier's hidden layer
    seed_targets: Any = field(default_factory=lambda: ["convs.0", "convs.1"])  # seeded by default (seeds.targets)


@dataclass
class TransformerConfig:
    _target_: str = "morpho_dist.models.Transformer"
    name: str = "transformer"
    d_model: int = 32  # token width
    heads: int = 2  # attention heads
    layers: int = 2  # encoder blocks
    mlp_hidden: int = 64  # hidden width of each block's MLP
    token_dim: int = 8  # flat inputs are cut into tokens of this size; images into rows
    seed_targets: Any = field(default_factory=lambda: ["mlp.fc1"])  # modules seeded by default (seeds.targets)


@dataclass
class GPTConfig:
    """A decoder-only transformer (morpho_dist.gpt); vocab_size and seq_len come from the data."""

    _target_: str = "morpho_dist.models.GPT"
    name: str = "gpt"
    width: int = 64  # token width
    depth: int = 2  # decoder blocks
    heads: int = 4  # attention heads
    mlp_width: int = 128  # hidden width of each block's MLP
    mlp: str = "gelu"  # gelu | swiglu
    seed_targets: Any = field(default_factory=lambda: ["mlp.fc1"])  # modules seeded by default (seeds.targets)


@dataclass
class HFLlamaConfig:
    """transformers' LlamaForCausalLM from a LlamaConfig (both nested _target_s; transformers is optional)."""

    _target_: str = "transformers.LlamaForCausalLM"
    name: str = "hf_llama"
    config: Any = field(
        default_factory=lambda: {
            "_target_": "transformers.LlamaConfig",
            "vocab_size": 256,  # bytes
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": "${oc.select:data.seq_len,2048}",
            "use_cache": False,
            "tie_word_embeddings": True,
        }
    )
    seed_targets: Any = field(default_factory=lambda: ["mlp.up_proj"])  # modules seeded by default (seeds.targets)


@dataclass
class DigitsConfig:
    _target_: str = "morpho_dist.data.load_digits_data"
    name: str = "digits"
    val_fraction: float = 0.2  # share of the 1797 images held out for validation


@dataclass
class SyntheticConfig:
    _target_: str = "morpho_dist.data.load_synthetic_data"
    name: str = "synthetic"
    samples: int = 4096  # examples drawn
    features: int = 64  # input width
    classes: int = 10  # label count
    noise: float = 0.1  # label noise of the teacher network
    val_fraction: float = 0.2  # share held out for validation


@dataclass
class Cifar10Config:
    _target_: str = "morpho_dist.data.load_cifar10_data"
    name: str = "cifar10"
    root: str = "data/cifar-10-batches-py"  # directory of the python-format batches (nothing is downloaded)
    val_fraction: float = 0.0  # 0: the standard test_batch is the validation set


@dataclass
class TextConfig:
    """The byte-level corpus of the interpreter's standard library sources (morpho_dist.corpus)."""

    _target_: str = "morpho_dist.corpus.stdlib_text"
    name: str = "text"
    seq_len: int = 128  # tokens (bytes) per sequence
    val_fraction: float = 0.05  # share of files (by path hash) in the validation split
    max_bytes: int = 0  # cap on the corpus size (0: every file)
    val_windows: int = 64  # fixed validation windows of seq_len tokens
    cache_dir: str | None = None  # token files; None: $MORPHO_CACHE or ~/.cache/morpho_dist


@dataclass
class ClassificationTaskConfig:
    """Cross-entropy over [B, K] logits; validation loss and accuracy (morpho_dist.task)."""

    _target_: str = "morpho_dist.task.ClassificationTask"
    name: str = "classification"


@dataclass
class CausalLMTaskConfig:
    """Next-token cross-entropy over [B, T, V] logits; validation loss and bits per byte."""

    _target_: str = "morpho_dist.task.CausalLMTask"
    name: str = "causal_lm"
    bytes_per_token: float = 1.0


@dataclass
class SeedsConfig:
    enabled: bool = True  # false: a static host (no seeds, no controller)
    targets: Any = "${model.seed_targets}"  # list: exact or '.'-suffix names; str: regex over module names
    exclude: list[str] = field(default_factory=list)  # module names never seeded
    per_layer: int = 2  # seeds per seeded layer; must divide its width
    kind: str = "lowrank"  # blueprint kind: lowrank | diagonal
    rank: int = 32  # lowrank blueprint rank
    act: str = "relu"  # lowrank activation: relu | gelu_tanh
    blend: str = "${grafting.blend}"  # how u joins x: additive | multiplicative | linear
    dead_eps: float = 1e-6  # |x| at or below this counts as dead in telemetry


@dataclass
class GraftingConfig:
    name: str = "additive"  # the option's name
    blend: str = "additive"  # blend of every seed: additive | multiplicative | linear


@dataclass
class ShardingConfig:
    mode: str = "data"  # data | seed | hybrid (morpho_dist.distributed.Mesh)
    seed_degree: int = 0  # ranks sharing out each layer's seeds; 0: all ranks (seed), 1 (hybrid)
    find_unused_parameters: bool = False  # DDP's flag, for hosts with parameters a step may not use
    backend: str = "auto"  # process group: auto (nccl on CUDA, gloo on CPU or when ranks share a GPU) | nccl | gloo
    # seed / hybrid: module name (pattern, '*' = one name component) -> colwise | rowwise; empty: the model's own
    # plan (transformers' config.base_model_tp_plan) or the built-in host's
    tp_plan: dict[str, str] = field(default_factory=dict)


@dataclass
class KernelConfig:
    """The op's backend plus every KernelOptions field, with KernelOptions' defaults (one source of truth)."""

    backend: str = "auto"  # auto (Triton on CUDA tensors, else the reference) | triton | reference
    deterministic: bool = KernelOptions.deterministic  # bit-identical telemetry run to run (no float atomics)
    block_rows: int = KernelOptions.block_rows  # column kernels: rows per tile
    block_cols: int = KernelOptions.block_cols  # column kernels: features per tile (0: auto)
    num_warps: int = KernelOptions.num_warps  # column kernels: warps per program, forward
    bwd_num_warps: int = KernelOptions.bwd_num_warps  # column kernels: warps per program, backward
    dot_precision: str = KernelOptions.dot_precision  # ieee | tf32 (tensor-core dots)
    autotune: bool = KernelOptions.autotune  # time a few tilings per layer shape on first use
    lowrank_rows: int = KernelOptions.lowrank_rows  # lowrank kernels: rows per tile
    lowrank_warps: int = KernelOptions.lowrank_warps  # lowrank kernels: warps per program
    programs_per_sm: int = KernelOptions.programs_per_sm  # column kernels: programs per multiprocessor
    lowrank_math: str = KernelOptions.lowrank_math  # auto | dots | rank1 (fp32 rank-1 updates)
    overlap: bool = KernelOptions.overlap  # CUDA: lowrank kernels on a side stream


@dataclass
class WandbLoggerConfig:
    name: str = "wandb"
    project: str = "morpho_dist"  # wandb project
    entity: str | None = None  # wandb entity (team or user)
    mode: str = "offline"  # offline (wandb sync later) | online | disabled
    tags: list[str] = field(default_factory=list)  # run tags
    histograms: bool = True  # per-layer telemetry histograms every interval


@dataclass
class JsonlLoggerConfig:
    name: str = "jsonl"


@dataclass
class NoneLoggerConfig:
    name: str = "none"


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adam | sgd (host and blueprint banks)
    weight_decay: float = 0.0  # decoupled weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam betas
    momentum: float = 0.9  # sgd
    seed_lr_scale: float = 1.0  # lr of the blueprint banks relative to train.lr
    foreach: bool | None = None  # torch's multi-tensor path: None = torch's choice (on for CUDA), true, false
    fused: bool = False  # torch's fused adam/adamw kernel (CUDA and CPU)
    max_grad_norm: float = 0.0  # clip the host gradients' global L2 norm to this (0: off); any sharding mode


# ---- top level -------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    steps: int = 1200  # optimizer steps
    batch_size: int = 64  # global batch: each of W ranks takes batch_size / W rows
    lr: float = 3e-3  # host learning rate (blueprint banks: optim.seed_lr_scale x this)
    eval_batch: int = 0  # val rows for counterfactual evaluations (same on every rank); 0: the whole val set
    log_every: int = 25  # metrics every N steps (0: none)
    progress: bool = True  # the progress bar on rank 0
    device: str = "auto"  # auto | cpu | cuda
    # ranks per CUDA device: local rank r runs on cuda:(r // ranks_per_device). > 1 shares a GPU between ranks
    # (gloo; a test and debugging mode, not a speed mode)
    ranks_per_device: int = 1
    rec_weight: float = 1.0  # weight of the linear-blend reconstruction loss


@dataclass
class CheckpointConfig:
    every: int = 0  # save every N steps (0: only when the run ends)
    resume: str | None = None  # a checkpoint path, a run dir, or "auto" (the run dir's latest checkpoint)
    save_final: bool = True  # a checkpoint when the run ends
    keep: int = 3  # complete checkpoints kept in <run_dir>/checkpoints (the newest; 0: all)


@dataclass
class ReliabilityConfig:
    """Faults and divergence (morpho_dist/reliability.py; README "Failure behaviour")."""

    skip_nonfinite: bool = True  # a step whose host loss is non-finite changes no parameter (device-side flag)
    # host divergence: an interval's mean loss above all of floor x the first interval's mean, factor x the recent
    # mean, the recent mean + sigmas x its spread (divergence_factor 0: only non-finite losses); see
    # reliability.DivergenceMonitor
    divergence_factor: float = 10.0
    divergence_floor: float = 0.5
    divergence_sigmas: float = 6.0
    window: int = 20  # good intervals in the recent mean and spread
    max_rollbacks: int = 3  # restores of the last good checkpoint before the run stops
    collective_timeout_s: float = 600.0  # process-group timeout: a lost or desynchronised rank never hangs


@dataclass
class Config:
    seed: int = 0  # seed of the data order, the init and every blueprint draw
    run_dir: str | None = None  # set by the CLI from Hydra's run dir; in-process callers may set it
    model: Any = MISSING
    data: Any = MISSING
    task: Any = MISSING
    seeds: SeedsConfig = field(default_factory=SeedsConfig)
    grafting: GraftingConfig = field(default_factory=GraftingConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    controller: Any = MISSING
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    kernel: KernelConfig = field(default_factory=KernelConfig)
    logger: Any = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    reliability: ReliabilityConfig = field(default_factory=ReliabilityConfig)


SCHEMAS: dict[str, Any] = {
    "model/mlp": MLPConfig,
    "model/cnn": CNNConfig,
    "model/transformer": TransformerConfig,
    "model/gpt": GPTConfig,
    "model/hf_llama": HFLlamaConfig,
    "data/digits": DigitsConfig,
    "data/synthetic": SyntheticConfig,
    "data/cifar10": Cifar10Config,
    "data/text": TextConfig,
    "task/classification": ClassificationTaskConfig,
    "task/causal_lm": CausalLMTaskConfig,
    "seeds/seeds": SeedsConfig,
    "grafting/grafting": GraftingConfig,
    "schedule/schedule": ScheduleConfig,
    "sharding/sharding": ShardingConfig,
    "kernel/kernel": KernelConfig,
    "logger/wandb": WandbLoggerConfig,
    "logger/jsonl": JsonlLoggerConfig,
    "logger/none": NoneLoggerConfig,
    "optim/optim": OptimConfig,
}


def steps_fraction(fraction: Any, _root_: Any = None) -> int:
    """``${steps:0.05}``: 5% of train.steps as a whole number of steps (at least 1), so that dwell times and
    budgets scale with the run length."""
    steps = int(_root_.train.steps)
    return max(1, int(round(float(fraction) * steps)))


def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent): the root as ``base_config``, the groups' schemas
    under ``schema/<group>`` (kept out of the groups themselves so that Hydra's list of options stays clean);
    each option yaml of conf/ names its schema first in its defaults list."""
    from morpho_dist.controller import ControllerConfig

    OmegaConf.register_new_resolver("steps", steps_fraction, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for path, node in {**SCHEMAS, "controller/controller": ControllerConfig}.items():
        group, name = path.split("/")
        cs.store(group=f"schema/{group}", name=name, node=node)


# ---- value validation ------------------------------------------------------------------------------------------
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

# One rule per numeric field of every schema (tests/unit/test_validation_rules.py checks that none is missing):
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
    """RULES plus the controller's (its schema lives in morpho_dist.controller, which imports this module)."""
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
