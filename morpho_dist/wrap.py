"""Inject SeededLayers at the outputs of chosen modules of any model; unwrap and export.

Targeting follows peft: ``targets`` as a list matches a module name exactly or as a '.'-bounded suffix
(``"fc1"`` matches ``"encoder.fc1"``, not ``"encoder.xfc1"``); as a string it is a regular expression that
must match the whole name. ``exclude`` uses the same rules and wins over ``targets``. Supported targets:
nn.Linear (features = out_features, last dim) and nn.Conv1d/2d/3d (channels = out_channels, moved to the last
dim for the op and back).

    model = wrap(model, cfg.seeds, backend="reference")
    layers = seeded_layers(model)          # {"fc1": SeededLayer, ...}
    plain = export(model)                  # fossilized seeds baked in as ordinary modules
    model = unwrap(model)                  # the original modules, untouched
"""

from __future__ import annotations

import copy
import re
from typing import Any

from torch import nn

from morpho_dist.export_modules import DiagonalBlueprint, FossilizedOutput, FossilizedSeed, lowrank_blueprint
from morpho_dist.kernels.options import KernelOptions
from morpho_dist.layer import SeededLayer
from morpho_dist.lifecycle import Stage

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class SeededOutput(nn.Module):
    """``seeded(original(x))``: the original module untouched, then its output's seed population."""

    def __init__(self, original: nn.Module, seeded: SeededLayer, channel_dim: int = -1) -> None:
        super().__init__()
        self.original = original
        self.seeded = seeded
        self.channel_dim = int(channel_dim)

    def forward(self, *args, **kwargs):
        y = self.original(*args, **kwargs)
        if self.channel_dim == -1:
            return self.seeded(y)
        h = self.seeded(y.movedim(self.channel_dim, -1).contiguous())
        return h.movedim(-1, self.channel_dim)


def _get(cfg: Any, name: str, default: Any) -> Any:
    value = getattr(cfg, name, default)
    return default if value is None else value


def _matcher(patterns: Any):
    """A predicate over module names: list -> exact or '.'-suffix match, str -> regex full match."""
    if patterns is None:
        return lambda name: False
    if isinstance(patterns, str):
        regex = re.compile(patterns)
        return lambda name: regex.fullmatch(name) is not None
    keys = [str(p) for p in patterns]
    return lambda name: any(name == k or name.endswith("." + k) for k in keys)


def _feature_spec(module: nn.Module) -> tuple[int, int]:
    """(features, channel dim) of a supported module's output: Linear -> last dim, ConvKd -> dim -(K + 1)."""
    if isinstance(module, nn.Linear):
        return module.out_features, -1
    spatial = len(module.kernel_size)  # Conv1d/2d/3d
    return module.out_channels, -(spatial + 1)


def find_targets(model: nn.Module, targets: Any, exclude: Any = None) -> list[str]:
    """Names of the modules ``wrap`` would seed, in module order (ValueError listing names if none)."""
    if any(isinstance(m, SeededOutput) for m in model.modules()):
        raise ValueError("model is already wrapped (it contains SeededOutput modules); unwrap it first")
    is_target, is_excluded = _matcher(targets), _matcher(exclude)
    regex = isinstance(targets, str)
    chosen = []
    for name, module in model.named_modules():
        if not name or not is_target(name) or is_excluded(name):
            continue
        if not isinstance(module, SUPPORTED):
            if regex:
                continue  # a pattern sweeps over every module; keep the supported ones
            raise ValueError(
                f"target {name!r} is a {type(module).__name__}; supported target types: "
                f"{[c.__name__ for c in SUPPORTED]}"
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


def wrap(
    model: nn.Module,
    seeds_cfg: Any,
    *,
    kernel: KernelOptions | None = None,
    backend: str = "auto",
    base_seed: int = 0,
) -> nn.Module:
    """Insert a SeededLayer at the output of every target module (in place; returns ``model``).

    ``seeds_cfg`` needs: targets, exclude, per_layer, kind, rank, act, blend, dead_eps. Each layer's key is
    its target's module name; its state lives on the target's device."""
    names = find_targets(model, _get(seeds_cfg, "targets", None), _get(seeds_cfg, "exclude", None))
    per_layer = int(_get(seeds_cfg, "per_layer", 1))
    for name in names:
        original = model.get_submodule(name)
        features, channel_dim = _feature_spec(original)
        try:
            layer = SeededLayer(
                features,
                per_layer,
                kind=str(_get(seeds_cfg, "kind", "lowrank")),
                rank=int(_get(seeds_cfg, "rank", 8)),
                act=str(_get(seeds_cfg, "act", "relu")),
                blend=str(_get(seeds_cfg, "blend", "additive")),
                dead_eps=float(_get(seeds_cfg, "dead_eps", 1e-6)),
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
    return model


def seeded_layers(model: nn.Module) -> dict[str, SeededLayer]:
    """Target module name -> its SeededLayer, in module order."""
    return {name: m.seeded for name, m in model.named_modules() if isinstance(m, SeededOutput)}


def unwrap(model: nn.Module) -> nn.Module:
    """Put every original module back in place of its SeededOutput (in place; returns ``model``)."""
    for name in [n for n, m in model.named_modules() if isinstance(m, SeededOutput)]:
        _set_submodule(model, name, model.get_submodule(name).original)
    return model


def _fossilized(layer: SeededLayer) -> list[FossilizedSeed]:
    stages, blends, alphas = layer.stage.tolist(), layer.blend.tolist(), layer.alpha.tolist()
    out = []
    for i, st in enumerate(stages):
        if st != Stage.FOSSILIZED:
            continue
        p0, p1 = layer.bank.p0[i].detach().cpu(), layer.bank.p1[i].detach().cpu()
        bp = lowrank_blueprint(p0, p1, layer.act) if layer.kind == "lowrank" else DiagonalBlueprint(p0, p1)
        out.append(FossilizedSeed(i * layer.chunk, (i + 1) * layer.chunk, bp, blends[i], alphas[i]))
    return out


def export(model: nn.Module) -> nn.Module:
    """A deep copy with no morpho_dist runtime in it: each seeded target becomes its original module, followed
    (if it has FOSSILIZED seeds) by those seeds as ordinary frozen modules (morpho_dist.export_modules, which
    imports torch only). Every other seed is dropped. Equals the wrapped model's eval output when all seeds are
    DORMANT/idle or FOSSILIZED. Seed-sharded models export their local shard; gather first for the full model."""
    plain = copy.deepcopy(model)
    for name in [n for n, m in plain.named_modules() if isinstance(m, SeededOutput)]:
        wrapper: SeededOutput = plain.get_submodule(name)
        seeds = _fossilized(wrapper.seeded)
        replacement: nn.Module = wrapper.original
        if seeds:
            param = next(wrapper.original.parameters(), None)
            replacement = FossilizedOutput(wrapper.original, seeds, wrapper.channel_dim)
            if param is not None:
                replacement.seeds.to(param.device)
        _set_submodule(plain, name, replacement)
    return plain
