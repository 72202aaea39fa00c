"""Save a grown model and load it back into a fresh instance of the user's own class, with its exact outputs
(peft's save_pretrained / from_pretrained round trip)::

    morpho_dist.save_grown(model, "out")     # model: wrapped and grown (wrap / Morphogenesis)
    fresh = MyModel()                        # or MyHFModel.from_pretrained("out")
    morpho_dist.load_grown(fresh, "out")     # fresh computes what model computes in eval mode

The folder holds
- the host weights, with the fossilized seeds that fold merged into them (``wrap.export``): a ``transformers``
  model's own ``save_pretrained`` files (config.json, model.safetensors), otherwise ``model.safetensors`` with the
  state_dict keys of the user's class (tied weights stored once);
- ``morpho_adapter.safetensors`` (only where there are any): the fossilized seeds that do not fold (lowrank kind,
  multiplicative blend, or a layer whose type or weights cannot take them), each with its parameters and alpha;
  its metadata ``morpho_dist`` is JSON: per layer its feature dim, per seed its feature range, kind, act, blend.

``load_grown`` loads the weights strictly (every key of the class, nothing else; a tied weight may be stored
once), then puts each adapter layer's seeds after its module as ``export_modules.FossilizedOutput``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from morpho_dist.export_modules import (
    BLEND_FORMULAS,
    DiagonalBlueprint,
    FossilizedOutput,
    FossilizedSeed,
    lowrank_blueprint,
)
from morpho_dist.layer_types import layer_type_of
from morpho_dist.wrap import _set_submodule, export

ADAPTER_FILE = "morpho_adapter.safetensors"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
FORMAT = "morpho_dist.adapter/1"


def _seed_spec(seed: FossilizedSeed) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(metadata, p0, p1) of an exported seed, p0/p1 as the op's (g, b) or (A, B)."""
    bp = seed.blueprint
    spec = {"start": seed.start, "end": seed.end, "blend": BLEND_FORMULAS[seed.blend]}
    if isinstance(bp, DiagonalBlueprint):
        return {**spec, "kind": "diagonal", "act": None}, bp.g.detach(), bp.b.detach()
    down, activation, up = bp
    act = "relu" if isinstance(activation, nn.ReLU) else "gelu_tanh"
    return {**spec, "kind": "lowrank", "act": act}, down.weight.detach().t(), up.weight.detach().t()


def _split_adapters(plain: nn.Module) -> dict[str, FossilizedOutput]:
    """Take every FossilizedOutput out of ``plain`` (its original module back in place); returns them by name."""
    found = {n: m for n, m in plain.named_modules() if isinstance(m, FossilizedOutput)}
    for name, module in found.items():
        _set_submodule(plain, name, module.original)
    plain.__dict__.pop("save_pretrained", None)  # export's refusal: the class can represent what is left
    return found


def _write_adapters(adapters: dict[str, FossilizedOutput], file: Path) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    layers = {}
    for name, module in adapters.items():
        seeds = []
        for j, seed in enumerate(module.seeds):
            spec, p0, p1 = _seed_spec(seed)
            seeds.append(spec)
            tensors[f"{name}.seeds.{j}.p0"] = p0.float().cpu().contiguous()
            tensors[f"{name}.seeds.{j}.p1"] = p1.float().cpu().contiguous()
            tensors[f"{name}.seeds.{j}.alpha"] = seed.alpha.detach().float().cpu().reshape(1)
        layers[name] = {"feature_dim": module.channel_dim, "seeds": seeds}
    meta = {"format": FORMAT, "layers": layers}
    save_file(tensors, str(file), metadata={"format": "pt", "morpho_dist": json.dumps(meta)})


def save_grown(model: nn.Module, path: str | Path, **save_pretrained_kwargs) -> Path:
    """Write the grown ``model`` (wrapped; not changed) to the folder ``path``: merged host weights plus, if any
    seeds do not fold, the adapter file. A ``transformers`` model is saved with its own ``save_pretrained``
    (``save_pretrained_kwargs`` go there), so ``from_pretrained`` reads the folder. Returns the folder."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    plain = export(model)
    adapters = _split_adapters(plain)
    if callable(getattr(plain, "save_pretrained", None)):
        plain.save_pretrained(str(folder), **save_pretrained_kwargs)
    else:
        if save_pretrained_kwargs:
            raise ValueError(
                f"save_grown: {sorted(save_pretrained_kwargs)} are save_pretrained arguments, and "
                f"{type(plain).__name__} has no save_pretrained"
            )
        from safetensors.torch import save_model

        save_model(plain, str(folder / WEIGHTS_FILE))
    adapter_file = folder / ADAPTER_FILE
    if adapters:
        _write_adapters(adapters, adapter_file)
    elif adapter_file.exists():
        adapter_file.unlink()  # an earlier save's adapters would be loaded with these weights
    return folder


def _weight_files(folder: Path) -> list[Path]:
    if (folder / WEIGHTS_FILE).exists():
        return [folder / WEIGHTS_FILE]
    index = folder / WEIGHTS_INDEX
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    return []


def load_weights_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "state") -> None:
    """``model.load_state_dict(state, strict=True)``, except that a key missing from ``state`` is accepted where its
    tensor is tied to (shares memory with) a key that is there, as safetensors and save_pretrained store ties once.
    A mismatch raises before anything is loaded."""
    own = model.state_dict()
    loaded = {own[k].untyped_storage().data_ptr() for k in state if k in own}
    missing = [k for k in own if k not in state and own[k].untyped_storage().data_ptr() not in loaded]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in state
        if k in own and own[k].shape != state[k].shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{source} does not match {type(model).__name__}: missing keys {missing[:8]}, unexpected keys "
            f"{unexpected[:8]}, shapes {shapes[:4]}; load it into a fresh instance of the class it was saved from"
        )
    model.load_state_dict(state, strict=False)


def _read_adapters(model: nn.Module, file: Path) -> dict[str, tuple[nn.Module, list[FossilizedSeed], int]]:
    """Target name -> (its module in ``model``, the seeds to put after it, feature dim); checks everything first."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("morpho_dist", "{}"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{file} is not a morpho_dist adapter file of format {FORMAT!r}")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    modules = dict(model.named_modules())
    built = {}
    for name, spec in meta["layers"].items():  # check every layer before changing the model
        module = modules.get(name)
        if module is None or isinstance(module, FossilizedOutput):
            state = "has no module" if module is None else "already carries loaded seeds at"
            raise ValueError(f"{file}: {type(model).__name__} {state} {name!r}")
        layer_type = layer_type_of(module)
        width = int(layer_type.features(module)) if layer_type is not None else None
        seeds = []
        for j, s in enumerate(spec["seeds"]):
            if width is not None and not 0 <= s["start"] < s["end"] <= width:
                raise ValueError(
                    f"{file}: seed {j} of {name!r} covers features {s['start']}..{s['end']}, not in 0..{width}"
                )
            p0, p1 = tensors[f"{name}.seeds.{j}.p0"], tensors[f"{name}.seeds.{j}.p1"]
            bp = DiagonalBlueprint(p0, p1) if s["kind"] == "diagonal" else lowrank_blueprint(p0, p1, s["act"])
            alpha = float(tensors[f"{name}.seeds.{j}.alpha"][0])
            seeds.append(FossilizedSeed(s["start"], s["end"], bp, BLEND_FORMULAS.index(s["blend"]), alpha))
        built[name] = (module, seeds, int(spec["feature_dim"]))
    return built


def _install_adapters(model: nn.Module, built: dict[str, tuple[nn.Module, list[FossilizedSeed], int]]) -> None:
    for name, (module, seeds, dim) in built.items():
        adapter = FossilizedOutput(module, seeds, dim)
        param = next(module.parameters(), None)
        if param is not None:
            adapter.seeds.to(param.device)
        _set_submodule(model, name, adapter)


def load_grown(model: nn.Module, path: str | Path) -> nn.Module:
    """Load what ``save_grown`` wrote into ``model``, a fresh instance of the saved model's class (in place;
    returns ``model``): the weights strictly, then the adapter seeds after their modules."""
    folder = Path(path)
    files = _weight_files(folder)
    adapter = folder / ADAPTER_FILE
    if not files and not adapter.exists():
        raise ValueError(
            f"load_grown: {folder} holds neither {WEIGHTS_FILE} nor {ADAPTER_FILE} (save_grown writes them)"
        )
    built = _read_adapters(model, adapter) if adapter.exists() else {}
    if files:
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for file in files:
            state.update(load_file(str(file)))
        load_weights_strict(model, state, str(files[0]))
    _install_adapters(model, built)
    return model
