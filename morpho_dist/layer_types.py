"""The layer types ``wrap`` can seed, and the registration for more (PEFT's custom-module mapping is the model).

A seeded layer watches the features of a module's OUTPUT. For each type, a ``LayerType`` says how many features
that output has and in which dim they lie, and (optionally) how to fold a per-feature affine map
``y -> scale * y + shift`` into the module's own weights, which is how ``export`` merges fossilized diagonal seeds
with an additive or linear blend into the model. Built in:

- ``nn.Linear``: out_features, last dim; folds into weight rows and bias.
- ``nn.Conv1d/2d/3d``: out_channels, dim -(spatial dims + 1) (batched or not, channels-first or channels_last
  memory); folds into the filters (dim 0) and bias.
- ``transformers.pytorch_utils.Conv1D`` (GPT-2's projections, ``y = x @ W + b`` with W [nx, nf]): nf, last dim;
  folds into weight columns and bias. Recognised once transformers is imported by the user's model; this module
  never imports it.

Another type is one call before ``wrap``; ``fold`` may be left out (its fossilized seeds then stay as modules)::

    morpho_dist.register_layer_type(
        nn.BatchNorm2d, LayerType(features=lambda m: m.num_features, feature_dim=1, fold=fold_affine())
    )

Lookup walks the module's class hierarchy, so a subclass of a registered type is that type unless registered
itself.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

FoldFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], bool]


@dataclass(frozen=True)
class LayerType:
    """How to seed one module type.

    features: the module -> the size of the feature dim of its output (the seeds split it into chunks).
    feature_dim: that dim of the output (negative counts from the end, which lets a convolution take batched and
        unbatched inputs alike), or a function of the module returning it.
    fold: ``fold(module, scale, shift) -> bool`` rewrites the module's parameters in place so that its output
        becomes ``scale * y + shift`` per feature (scale, shift: float64 [features]); it returns False, having
        changed nothing, where the module cannot represent it (for example a shift on a module without bias).
        None: seeds on this type never fold.
    """

    features: Callable[[nn.Module], int]
    feature_dim: int | Callable[[nn.Module], int] = -1
    fold: FoldFn | None = None

    def dim_of(self, module: nn.Module) -> int:
        dim = self.feature_dim(module) if callable(self.feature_dim) else self.feature_dim
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise ValueError(f"feature_dim of {type(module).__name__} must be an int, got {dim!r}")
        return dim


def fold_affine(weight: str = "weight", bias: str | None = "bias", out_dim: int = 0) -> FoldFn:
    """A ``fold`` for modules computing ``y = W (.) x + b`` where W's dim ``out_dim`` indexes the output features:
    W's slices along it are scaled, b becomes ``scale * b + shift``. The products are rounded once from float64."""

    def fold(module: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> bool:
        w = getattr(module, weight, None)
        b = getattr(module, bias, None) if bias is not None else None
        if w is None or (b is None and bool((shift != 0).any())):
            return False
        with torch.no_grad():
            shape = [1] * w.dim()
            shape[out_dim] = -1
            s = scale.to(w.device, torch.float64)
            w.copy_((w.to(torch.float64) * s.view(shape)).to(w.dtype))
            if b is not None:
                b.copy_((b.to(torch.float64) * s + shift.to(b.device, torch.float64)).to(b.dtype))
        return True

    return fold


def _conv_dim(module: nn.Module) -> int:
    return -(len(module.kernel_size) + 1)


_REGISTRY: dict[type, LayerType] = {
    nn.Linear: LayerType(lambda m: m.out_features, -1, fold_affine()),
    nn.Conv1d: LayerType(lambda m: m.out_channels, _conv_dim, fold_affine()),
    nn.Conv2d: LayerType(lambda m: m.out_channels, _conv_dim, fold_affine()),
    nn.Conv3d: LayerType(lambda m: m.out_channels, _conv_dim, fold_affine()),
}
_HF_CONV1D = LayerType(lambda m: m.nf, -1, fold_affine(out_dim=1))


def register_layer_type(cls: type, layer_type: LayerType) -> None:
    """Let ``wrap`` seed modules of ``cls`` (and its subclasses not registered themselves); replaces an earlier
    registration of ``cls``."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"register_layer_type: cls must be an nn.Module subclass, got {cls!r}")
    if not isinstance(layer_type, LayerType):
        raise ValueError(f"register_layer_type: layer_type must be a morpho_dist.LayerType, got {layer_type!r}")
    _REGISTRY[cls] = layer_type


def _hf_conv1d() -> type | None:
    # Only present when the user's model (or anything else) imported transformers' pytorch_utils.
    utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(utils, "Conv1D", None)


def layer_type_of(module: nn.Module) -> LayerType | None:
    """The registered LayerType of ``module``'s class or its nearest registered base; None if not seedable."""
    hf = _hf_conv1d()
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
        if hf is not None and cls is hf:
            return _HF_CONV1D
    return None


def supported_type_names() -> list[str]:
    return [cls.__name__ for cls in _REGISTRY] + ["transformers.pytorch_utils.Conv1D"]
