"""morpho_dist: distributed training plugin for morphogenetic networks (seeded layers grown while training)."""

import importlib

__version__ = "0.1.0"

# Public names, imported on first use: ``import morpho_dist`` stays light, and an exported model (which needs
# morpho_dist.export_modules only) unpickles without the op, the kernels or Triton.
_LAZY = {
    "Morphogenesis": "morpho_dist.engine",
    "export": "morpho_dist.wrap",
    "unwrap": "morpho_dist.wrap",
    "seeded_layers": "morpho_dist.wrap",
    "save_grown": "morpho_dist.grown",
    "load_grown": "morpho_dist.grown",
    "LayerType": "morpho_dist.layer_types",
    "fold_affine": "morpho_dist.layer_types",
    "register_layer_type": "morpho_dist.layer_types",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'morpho_dist' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
