"""Inject SeededLayers at the outputs of chosen modules of any model; unwrap and export.

Targeting follows peft: ``targets`` as a list matches a module name exactly or as a '.'-bounded suffix
(``"fc1"`` matches ``"encoder.fc1"``, not ``"encoder.xfc1"``); as a string it is a regular expression that
must match the whole name. ``exclude`` uses the same rules and wins over ``targets``. Target types and how
their output's features are found (and folded) are in morpho_dist.layer_types (register_layer_type for more).

    model = wrap(model, dict(targets=["fc1"], per_layer=4), backend="reference")
    layers = seeded_layers(model)          # {"fc1": SeededLayer, ...}
    plain = export(model)                  # fossilized seeds merged into the weights or kept as plain modules
    model = unwrap(model)                  # the original modules, untouched
"""

from __future__ import annotations

import copy
import dataclasses
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from morpho_dist.blends import Blend
from morpho_dist.export_modules import (
    DiagonalBlueprint,
    FossilizedOutput,
    FossilizedSeed,
    WrapsOriginal,
    lowrank_blueprint,
    refuse_save_pretrained,
)
from morpho_dist.kernels.options import KernelOptions
from morpho_dist.layer import SeededLayer
from morpho_dist.layer_types import layer_type_of, supported_type_names
from morpho_dist.lifecycle import BLENDED_STAGES, Stage


class _FeaturesLast(torch.autograd.Function):
    """y -> y with its feature dim last, contiguous (the op's layout); the gradient goes back in y's own layout,
    as the gradient of an unwrapped module's output would arrive (elementwise ops keep their input's layout)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, dim: int) -> torch.Tensor:
        ctx.dim, ctx.stride = dim, y.stride()
        return y.movedim(dim, -1).contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g = grad.movedim(-1, ctx.dim)
        if g.stride() != ctx.stride and _dense(g.shape, ctx.stride):
            g = torch.empty_strided(g.shape, ctx.stride, dtype=g.dtype, device=g.device).copy_(g)
        return g, None


def _dense(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Whether a tensor of ``shape`` with ``stride`` covers its memory exactly once (no overlap, no gaps)."""
    expected = 1
    for size, step in sorted(zip(shape, stride), key=lambda pair: pair[1]):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


class SeededOutput(WrapsOriginal):
    """``seeded(original(x))``: the original module untouched, then its output's seed population.

    The output keeps the original output's strides, and where the features are not the output's contiguous last
    dim the gradient reaches the original module in that layout too (channels_last stays channels_last,
    channels-first contiguous), so that with every seed idle the model computes exactly what it computes
    unwrapped, forward and backward. Attributes it does not have are read from ``original``
    (``model.lm_head.weight`` still works)."""

    def __init__(self, original: nn.Module, seeded: SeededLayer, channel_dim: int = -1) -> None:
        super().__init__()
        self.original = original
        self.seeded = seeded
        self.channel_dim = int(channel_dim)

    def forward(self, *args, **kwargs):
        y = self.original(*args, **kwargs)
        dim = self.channel_dim
        if dim == -1 and y.is_contiguous():  # the op's own layout (Linear, Conv1D): nothing to move, no copies
            return self.seeded(y)
        out = self.seeded(_FeaturesLast.apply(y, dim) if y.requires_grad else y.movedim(dim, -1).contiguous())
        out = out.movedim(-1, dim)
        if out.stride() != y.stride():
            out = torch.empty_like(y).copy_(out)  # y's own layout (empty_like keeps dense strides)
        return out


# The keys of the Hydra ``seeds`` group (config.SeedsConfig) and wrap's defaults for those a caller leaves out;
# tests/unit/test_wrap.py checks them against SeedsConfig's.
SEEDS_DEFAULTS: dict[str, Any] = {
    "enabled": True,
    "targets": None,
    "exclude": None,
    "per_layer": 2,
    "kind": "lowrank",
    "rank": 32,
    "act": "relu",
    "blend": "additive",
    "dead_eps": 1e-6,
}


def seeds_options(seeds_cfg: Any) -> dict[str, Any]:
    """The ``seeds`` keys from a dict, a dataclass, an OmegaConf node or an attribute object, defaults filled in;
    a key that is not a ``seeds`` key is a ValueError naming it."""
    if seeds_cfg is None:
        given: dict[str, Any] = {}
    elif isinstance(seeds_cfg, Mapping):  # dict, OmegaConf DictConfig
        given = {str(k): seeds_cfg[k] for k in seeds_cfg}
    elif dataclasses.is_dataclass(seeds_cfg) and not isinstance(seeds_cfg, type):
        given = {f.name: getattr(seeds_cfg, f.name) for f in dataclasses.fields(seeds_cfg)}
    elif hasattr(seeds_cfg, "__dict__"):
        given = {k: v for k, v in vars(seeds_cfg).items() if not k.startswith("_")}
    else:
        raise ValueError(f"seeds config must be a dict, a dataclass or an OmegaConf node, got {type(seeds_cfg)}")
    unknown = sorted(set(given) - set(SEEDS_DEFAULTS))
    if unknown:
        raise ValueError(f"seeds.{unknown[0]} is not a seeds key; allowed keys: {list(SEEDS_DEFAULTS)}")
    out = {k: (v if given.get(k) is None else given[k]) for k, v in SEEDS_DEFAULTS.items()}
    for key in ("per_layer", "rank"):
        value = out[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"seeds.{key}={value!r} must be an integer >= 1")
    return out


def _matcher(patterns: Any):
    """A predicate over module names: list -> exact or '.'-suffix match, str -> regex full match."""
    if patterns is None:
        return lambda name: False
    if isinstance(patterns, str):
        regex = re.compile(patterns)
        return lambda name: regex.fullmatch(name) is not None
    keys = [str(p) for p in patterns]
    return lambda name: any(name == k or name.endswith("." + k) for k in keys)


def find_targets(model: nn.Module, targets: Any, exclude: Any = None) -> list[str]:
    """Names of the modules ``wrap`` would seed, in module order (ValueError listing names if none).

    Modules inside an existing SeededOutput are not candidates; naming a seeded module again is an error."""
    if targets is None:
        raise ValueError("seeds.targets is required: a list of module names (exact or '.'-suffix) or a regex")
    is_target, is_excluded = _matcher(targets), _matcher(exclude)
    regex = isinstance(targets, str)
    seeded = [n for n, m in model.named_modules() if isinstance(m, SeededOutput)]
    chosen = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(s + ".") for s in seeded):
            continue
        if not is_target(name) or is_excluded(name):
            continue
        if isinstance(module, SeededOutput):
            raise ValueError(f"target {name!r} is already seeded (model is already wrapped there); unwrap it first")
        if layer_type_of(module) is None:
            if regex:
                continue  # a pattern sweeps over every module; keep the supported ones
            raise ValueError(
                f"target {name!r} is a {type(module).__name__}; supported target types: {supported_type_names()} "
                "(others: morpho_dist.register_layer_type)"
            )
        chosen.append(name)
    if not chosen:
        names = [n for n, _ in model.named_modules() if n]
        raise ValueError(
            f"seeds.targets={targets!r} (exclude={exclude!r}) matches no supported module of "
            f"{type(model).__name__}; its module names are: {names}"
        )
    return chosen


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def seeded_width(module: nn.Module) -> tuple[int, int]:
    """(features, feature dim) of a seedable module's output (ValueError for a type that is not registered)."""
    layer_type = layer_type_of(module)
    if layer_type is None:
        raise ValueError(f"{type(module).__name__} is not a seedable layer type; supported: {supported_type_names()}")
    return int(layer_type.features(module)), layer_type.dim_of(module)


def wrap(
    model: nn.Module,
    seeds_cfg: Any,
    *,
    kernel: KernelOptions | None = None,
    backend: str = "auto",
    base_seed: int = 0,
) -> nn.Module:
    """Insert a SeededLayer at the output of every target module (in place; returns ``model``).

    ``seeds_cfg``: the ``seeds`` keys (SEEDS_DEFAULTS) as a dict, dataclass or OmegaConf node; ``targets`` is
    required, ``enabled=False`` leaves the model as it is. Each layer's key is its target's module name; its
    state lives on the target's device. Wrapping again with other targets adds seeds there."""
    opts = seeds_options(seeds_cfg)
    if not opts["enabled"]:
        return model
    names = find_targets(model, opts["targets"], opts["exclude"])
    per_layer = opts["per_layer"]
    for name in names:
        original = model.get_submodule(name)
        features, channel_dim = seeded_width(original)
        try:
            layer = SeededLayer(
                features,
                per_layer,
                kind=str(opts["kind"]),
                rank=int(opts["rank"]),
                act=str(opts["act"]),
                blend=str(opts["blend"]),
                dead_eps=float(opts["dead_eps"]),
                backend=backend,
                kernel=kernel,
                layer_key=name,
                base_seed=base_seed,
                seed_offset=0,
            )
        except ValueError as err:
            raise ValueError(f"cannot seed target {name!r} ({features} features): {err}") from err
        layer.num_global_seeds = per_layer
        param = next(original.parameters(), None)
        if param is not None:
            layer.to(param.device)
        _set_submodule(model, name, SeededOutput(original, layer, channel_dim))
    _keep_seed_buffers_local(model)
    return model


def _keep_seed_buffers_local(model: nn.Module) -> None:
    """Name the seed layers' buffers in ``_ddp_params_and_buffers_to_ignore``, which DistributedDataParallel
    reads when it wraps ``model``: a user's plain ``DDP(model)`` (broadcast_buffers=True) then no longer
    overwrites each rank's telemetry accumulation with rank 0's at every forward. The seed state buffers stay
    equal across ranks without it (every rank applies the same decisions, checked by a checksum)."""
    names = [
        f"{name}.seeded.{buf}"
        for name, module in model.named_modules()
        if isinstance(module, SeededOutput)
        for buf, _ in module.seeded.named_buffers()
    ]
    ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    model._ddp_params_and_buffers_to_ignore = ignored + [n for n in names if n not in ignored]


def seeded_layers(model: nn.Module) -> dict[str, SeededLayer]:
    """Target module name -> its SeededLayer, in module order."""
    return {name: m.seeded for name, m in model.named_modules() if isinstance(m, SeededOutput)}


def unwrap(model: nn.Module) -> nn.Module:
    """Put every original module back in place of its SeededOutput (in place; returns ``model``)."""
    for name in [n for n, m in model.named_modules() if isinstance(m, SeededOutput)]:
        _set_submodule(model, name, model.get_submodule(name).original)
    return model


def _fossil_seeds(layer: SeededLayer) -> list[int]:
    return [i for i, st in enumerate(layer.stage.tolist()) if st == Stage.FOSSILIZED]


def _as_module(layer: SeededLayer, i: int) -> FossilizedSeed:
    p0, p1 = layer.bank.p0[i].detach().cpu(), layer.bank.p1[i].detach().cpu()
    bp = lowrank_blueprint(p0, p1, layer.act) if layer.kind == "lowrank" else DiagonalBlueprint(p0, p1)
    return FossilizedSeed(i * layer.chunk, (i + 1) * layer.chunk, bp, int(layer.blend[i]), float(layer.alpha[i]))


def _affine_map(layer: SeededLayer, seeds: list[int], features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (scale, shift) per feature with blend(y, g*y + b, a) = scale * y + shift on ``seeds``' chunks:
    additive y + a(g y + b), linear (1 - a) y + a(g y + b); identity elsewhere."""
    g, b = layer.bank.p0.detach().double().cpu(), layer.bank.p1.detach().double().cpu()
    alpha, blends = layer.alpha.detach().double().cpu(), layer.blend.tolist()
    scale, shift = torch.ones(features, dtype=torch.float64), torch.zeros(features, dtype=torch.float64)
    for i in seeds:
        a, cols = alpha[i], slice(i * layer.chunk, (i + 1) * layer.chunk)
        base = 1.0 if blends[i] == Blend.ADDITIVE else 1.0 - a
        scale[cols], shift[cols] = base + a * g[i], a * b[i]
    return scale, shift


def _fold(original: nn.Module, layer: SeededLayer, seeds: list[int]) -> list[int]:
    """Fold the seeds that are affine maps of the output (diagonal kind, additive or linear blend) into
    ``original``'s weights, in place; returns the seeds left (to keep as modules)."""
    layer_type = layer_type_of(original)
    if layer.kind != "diagonal" or layer_type is None or layer_type.fold is None:
        return seeds
    features, blends = int(layer_type.features(original)), layer.blend.tolist()
    foldable = [i for i in seeds if blends[i] in (Blend.ADDITIVE, Blend.LINEAR)]
    # where the module refuses (a shift without a bias to take it), fold the seeds that shift nothing
    unshifted = [i for i in foldable if not bool(_affine_map(layer, [i], features)[1].any())]
    for chosen in (foldable, unshifted):
        if chosen and layer_type.fold(original, *_affine_map(layer, chosen, features)):
            return [i for i in seeds if i not in chosen]
    return seeds


def _shared_parameters(model: nn.Module) -> set[int]:
    """ids of parameters reachable under more than one name (tied weights: folding one would change the other)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, n in seen.items() if n > 1}


def export(model: nn.Module, *, merge: bool = True) -> nn.Module:
    """A deep copy with no morpho_dist runtime in it (peft's ``merge_and_unload``); the model is not changed.

    Each seeded target becomes its original module. Its FOSSILIZED seeds are kept: with ``merge``, those that are
    affine maps of the output (diagonal kind, additive or linear blend) are folded into the module's weight and bias
    where its layer type can fold (not into weights tied to another module); the others become ordinary frozen
    modules after it (``FossilizedOutput``, morpho_dist.export_modules, which imports torch only). Every other seed
    is dropped, with a warning for seeds that are blended into the output now (GRAFTING .. FINE_TUNING). Equals the
    wrapped model's eval output when every seed is idle or FOSSILIZED. An exported ``transformers`` model that
    keeps FossilizedOutput modules refuses ``save_pretrained`` (its class cannot load them): use
    ``morpho_dist.save_grown``. Seed-sharded models export their local shard; gather first for the full model."""
    plain = copy.deepcopy(model)
    shared = _shared_parameters(plain)
    dropped, kept = [], []
    for name in [n for n, m in plain.named_modules() if isinstance(m, SeededOutput)]:
        wrapper: SeededOutput = plain.get_submodule(name)
        layer, original = wrapper.seeded, wrapper.original
        stages = layer.stage.tolist()
        dropped += [f"{name}[{i}]" for i, st in enumerate(stages) if st in BLENDED_STAGES and st != Stage.FOSSILIZED]
        seeds = _fossil_seeds(layer)
        if merge and seeds and not any(id(p) in shared for p in original.parameters()):
            seeds = _fold(original, layer, seeds)
        replacement: nn.Module = original
        if seeds:
            replacement = FossilizedOutput(original, [_as_module(layer, i) for i in seeds], wrapper.channel_dim)
            param = next(original.parameters(), None)
            if param is not None:
                replacement.seeds.to(param.device)
            kept.append(name)
        _set_submodule(plain, name, replacement)
    if dropped:
        warnings.warn(
            f"export drops seeds that are blended into the output but not FOSSILIZED: {dropped}; the exported "
            "model's outputs differ from the wrapped model's there",
            stacklevel=2,
        )
    if kept and hasattr(plain, "save_pretrained"):
        refuse_save_pretrained(plain, kept)
    return plain
