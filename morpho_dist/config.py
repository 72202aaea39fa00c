"""Config schemas, registered in Hydra's ConfigStore.

Every group of conf/ starts its defaults list with its schema from here (``- mlp_schema``), so a typo in a key
or a value of the wrong type fails at compose time naming the key. What types cannot check (ranges, choices,
relations between keys) is morpho_dist.config_rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from morpho_dist.kernels.options import KernelOptions
from morpho_dist.schedules import ScheduleConfig


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
