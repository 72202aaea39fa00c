"""wrap / unwrap / export / seeded_layers on a hand-written model with Conv2d and Linear targets."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import morpho_dist.export_modules as export_modules
from morpho_dist.export_modules import FossilizedSeed
from morpho_dist.layer import SeededLayer
from morpho_dist.lifecycle import Stage
from morpho_dist.wrap import SeededOutput, export, find_targets, seeded_layers, unwrap, wrap


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.xfc1 = nn.Linear(32, 32)  # must not match the suffix target "fc1"
        self.fc2 = nn.Linear(32, 32)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h + torch.tanh(self.xfc1(h)))


class Net(nn.Module):
    """A model the project does not ship: conv -> pool -> block -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.encoder = Block()
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h = self.pool(torch.relu(self.conv1(x))).flatten(1)
        return self.head(torch.relu(self.encoder(h)))


def cfg(targets, exclude=None, per_layer=1, kind="lowrank", blend="additive", rank=4):
    return SimpleNamespace(
        targets=targets,
        exclude=exclude,
        per_layer=per_layer,
        kind=kind,
        rank=rank,
        act="relu",
        blend=blend,
        dead_eps=1e-6,
    )


def make(targets, **kw):
    torch.manual_seed(0)
    return wrap(Net(), cfg(targets, **kw), backend="reference")


def test_list_targets_match_exact_or_dot_suffix():
    assert find_targets(Net(), ["fc1"]) == ["encoder.fc1"]
    assert find_targets(Net(), ["conv1", "encoder.fc2", "head"]) == ["conv1", "encoder.fc2", "head"]
    with pytest.raises(ValueError):
        find_targets(Net(), ["c1"])  # "xfc1"/"fc1" end with "c1" but not at a '.' boundary


def test_regex_targets_fullmatch_and_exclude():
    assert find_targets(Net(), r"encoder\..*") == ["encoder.fc1", "encoder.xfc1", "encoder.fc2"]
    assert find_targets(Net(), r"encoder\..*", exclude=["fc2"]) == ["encoder.fc1", "encoder.xfc1"]
    assert find_targets(Net(), r"enc.*") == ["encoder.fc1", "encoder.xfc1", "encoder.fc2"]  # container skipped
    assert find_targets(Net(), r".*fc1", exclude=r".*x.*") == ["encoder.fc1"]
    with pytest.raises(ValueError):
        find_targets(Net(), r"fc1")  # fullmatch: "fc1" is not the whole of "encoder.fc1"


def test_no_match_lists_module_names():
    with pytest.raises(ValueError) as err:
        wrap(Net(), cfg(["nope"]), backend="reference")
    msg = str(err.value)
    for name in ("conv1", "encoder.fc1", "encoder.xfc1", "encoder.fc2", "head"):
        assert name in msg


def test_unsupported_listed_target_and_bad_per_layer_and_double_wrap():
    with pytest.raises(ValueError, match="Block"):
        find_targets(Net(), ["encoder"])
    with pytest.raises(ValueError, match="encoder.fc1"):
        wrap(Net(), cfg(["fc1"], per_layer=3, kind="diagonal"), backend="reference")
    model = make(["head"], kind="diagonal", per_layer=2)
    with pytest.raises(ValueError, match="'head' is already seeded"):
        wrap(model, cfg(["head", "conv1"]), backend="reference")
    assert list(seeded_layers(model)) == ["head"]  # the refused call changed nothing
    wrap(model, cfg(r".*1"), backend="reference")  # a second kind elsewhere; the regex skips the seeded internals
    layers = seeded_layers(model)
    assert list(layers) == ["conv1", "encoder.fc1", "encoder.xfc1", "head"]
    assert [layers[k].kind for k in layers] == ["lowrank", "lowrank", "lowrank", "diagonal"]


def test_seeded_layers_in_module_order_with_features():
    model = make(["head", "conv1", "fc1"], kind="diagonal", per_layer=2)
    layers = seeded_layers(model)
    assert list(layers) == ["conv1", "encoder.fc1", "head"]
    assert all(isinstance(layer, SeededLayer) for layer in layers.values())
    assert [layers[k].hidden for k in layers] == [16, 32, 10]
    assert [layers[k].layer_key for k in layers] == list(layers)
    assert isinstance(model.conv1, SeededOutput) and model.conv1.channel_dim == -3


def test_wrap_preserves_function_and_unwrap_is_exact():
    torch.manual_seed(0)
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    originals = {n: m for n, m in model.named_modules()}
    x = torch.randn(4, 3, 8, 8)
    ref = model(x)
    wrap(model, cfg(["conv1", "fc1", "head"], per_layer=2, kind="diagonal"), backend="reference")
    assert torch.equal(model(x), ref)  # all seeds DORMANT: identity
    model(x).sum().backward()  # training-mode forward/backward touches telemetry only
    unwrap(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(originals[n] is m for n, m in model.named_modules())
    assert not seeded_layers(model)


def _randomize(layer: SeededLayer, gen: torch.Generator) -> None:
    with torch.no_grad():
        layer.bank.p0.copy_(torch.randn(layer.bank.p0.shape, generator=gen) * 0.5)
        layer.bank.p1.copy_(torch.randn(layer.bank.p1.shape, generator=gen) * 0.5)


def _set(layer: SeededLayer, i: int, stage: Stage, alpha: float, blend: int) -> None:
    layer.stage[i], layer.alpha[i], layer.blend[i] = int(stage), alpha, blend


@pytest.mark.parametrize("kind,per_layer", [("lowrank", 1), ("diagonal", 4)])
def test_export_equals_wrapped_eval_with_idle_and_fossilized_seeds(kind, per_layer):
    model = make(["conv1", "fc1", "fc2"], kind=kind, per_layer=per_layer)
    gen = torch.Generator().manual_seed(1)
    layers = seeded_layers(model)
    for layer in layers.values():
        _randomize(layer, gen)
    _set(layers["conv1"], 0, Stage.FOSSILIZED, 1.0, 0)  # additive, alpha = 1
    fc1, fc2 = layers["encoder.fc1"], layers["encoder.fc2"]
    _set(fc1, 0, Stage.FOSSILIZED, 0.4, 1)  # multiplicative, alpha < 1
    _set(fc2, 0, Stage.FOSSILIZED, 0.7, 2)  # linear, alpha < 1
    if per_layer > 1:
        _set(fc1, 1, Stage.CULLED, 0.0, 0)
        _set(fc1, 3, Stage.FOSSILIZED, 1.0, 2)
        _set(fc2, 2, Stage.ROLLED_BACK, 0.0, 1)
    model.eval()
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
        plain = export(model)
        got = plain(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not seeded_layers(plain) and seeded_layers(model)  # a copy; the wrapped model is untouched
    n_fossil = sum(isinstance(m, FossilizedSeed) for m in plain.modules())
    # diagonal additive / linear seeds fold into the weights: only fc1's multiplicative seed stays a module
    assert n_fossil == (1 if kind == "diagonal" else 3)
    unmerged = export(model, merge=False)
    assert sum(isinstance(m, FossilizedSeed) for m in unmerged.modules()) == (4 if per_layer > 1 else 3)
    with torch.no_grad():
        torch.testing.assert_close(unmerged(x), want, rtol=1e-5, atol=1e-5)
    assert all(not p.requires_grad for m in plain.modules() if isinstance(m, FossilizedSeed) for p in m.parameters())
    # the fossilized seeds matter: without them the output differs
    with torch.no_grad():
        base = unwrap(model)(x)
    assert not torch.allclose(base, got, atol=1e-3)


def test_export_drops_non_fossilized_seeds():
    model = make(["fc1", "head"], kind="diagonal", per_layer=2)
    gen = torch.Generator().manual_seed(2)
    layers = seeded_layers(model)
    for layer in layers.values():
        _randomize(layer, gen)
    fc1, head = layers["encoder.fc1"], layers["head"]
    _set(fc1, 0, Stage.FOSSILIZED, 1.0, 0)
    _set(fc1, 1, Stage.GRAFTING, 0.5, 0)
    _set(head, 0, Stage.EVALUATING, 1.0, 1)
    _set(head, 1, Stage.FINE_TUNING, 1.0, 2)
    model.eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad(), pytest.warns(UserWarning, match=r"'encoder\.fc1\[1\]', 'head\[0\]', 'head\[1\]'") as warned:
        plain = export(model)
        blended = model(x)
        got = plain(x)
        for layer, i in ((fc1, 1), (head, 0), (head, 1)):
            layer.stage[i] = int(Stage.DORMANT)
        want = model(x)
    assert not torch.allclose(got, blended, atol=1e-4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(warned) == 1
    assert sum(isinstance(m, FossilizedSeed) for m in plain.modules()) == 0  # fc1's additive seed is folded
    assert isinstance(plain.head, nn.Linear) and isinstance(plain.encoder.fc1, nn.Linear)


def test_export_modules_import_torch_only():
    tree = ast.parse(Path(export_modules.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0])
    assert roots <= {"torch", "__future__"}


def test_exported_model_runs_without_triton_or_morpho_dist_runtime(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 32))
    wrap(model, cfg(["0", "3"], per_layer=1), backend="reference")
    layers = seeded_layers(model)
    gen = torch.Generator().manual_seed(3)
    for layer in layers.values():
        _randomize(layer, gen)
        _set(layer, 0, Stage.FOSSILIZED, 0.6, 1)
    model.eval()
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        want = model(x)
    torch.save({"model": export(model), "x": x, "want": want}, tmp_path / "m.pt")
    code = (
        "import sys\n"
        "for name in ('triton', 'morpho_dist.ops', 'morpho_dist.kernels', 'morpho_dist.layer', 'morpho_dist.wrap'):\n"
        "    sys.modules[name] = None\n"
        "import torch\n"
        f"d = torch.load({str(tmp_path / 'm.pt')!r}, weights_only=False)\n"
        "with torch.no_grad():\n"
        "    got = d['model'](d['x'])\n"
        "torch.testing.assert_close(got, d['want'], rtol=1e-5, atol=1e-5)\n"
        "assert not any(m.startswith('triton') for m in sys.modules if sys.modules[m] is not None)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


@pytest.mark.parametrize("form", ["dict", "dataclass", "omegaconf", "structured", "namespace"])
def test_wrap_takes_dict_dataclass_and_omegaconf(form):
    from omegaconf import OmegaConf

    from morpho_dist.config import SeedsConfig

    keys = dict(targets=["fc1", "head"], exclude=["xfc1"], per_layer=2, kind="diagonal", rank=4, blend="linear")
    seeds = {
        "dict": lambda: dict(keys),
        "dataclass": lambda: SeedsConfig(**keys),
        "omegaconf": lambda: OmegaConf.create(keys),
        "structured": lambda: OmegaConf.structured(SeedsConfig(**keys)),
        "namespace": lambda: SimpleNamespace(**keys),
    }[form]()
    model = wrap(Net(), seeds, backend="reference")
    layers = seeded_layers(model)
    assert list(layers) == ["encoder.fc1", "head"]
    assert all(layer.num_seeds == 2 and layer.kind == "diagonal" for layer in layers.values())
    assert all(layer.blend.tolist() == [2, 2] for layer in layers.values())  # linear = 2


def test_wrap_bad_keys_name_the_key_and_change_nothing():
    model = Net()
    for bad, match in (
        (dict(targets=["fc1"], per_layr=2), r"seeds\.per_layr is not a seeds key"),
        (dict(targets=["fc1"], per_layer=0), r"seeds\.per_layer=0 must be an integer >= 1"),
        (dict(targets=["fc1"], rank="4"), r"seeds\.rank='4'"),
        (dict(per_layer=2), r"seeds\.targets is required"),
        (dict(targets=["fc1"], kind="dense"), r"kind='dense'.*allowed values"),
    ):
        with pytest.raises(ValueError, match=match):
            wrap(model, bad, backend="reference")
        assert not seeded_layers(model)
    assert wrap(model, dict(targets=["fc1"], enabled=False)) is model and not seeded_layers(model)


def test_wrap_defaults_are_the_seeds_schema_defaults():
    import dataclasses

    from morpho_dist.config import SeedsConfig
    from morpho_dist.wrap import SEEDS_DEFAULTS

    fields = {f.name: f for f in dataclasses.fields(SeedsConfig)}
    assert set(SEEDS_DEFAULTS) == set(fields)
    for key, value in SEEDS_DEFAULTS.items():
        f = fields[key]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if isinstance(default, str) and default.startswith("${"):
            continue  # interpolated from another group (model.seed_targets, grafting.blend)
        assert value == default or (value is None and default == []), key


def test_export_and_pickle_after_forward_and_backward(tmp_path):
    model = make(["conv1", "fc1"], kind="lowrank", per_layer=1)
    x = torch.randn(2, 3, 8, 8)
    loss = model(x).sum() + sum(layer.rec_loss for layer in seeded_layers(model).values())
    loss.backward()  # the layers keep this forward's rec_loss, with its graph
    assert all(layer.rec_loss is not None for layer in seeded_layers(model).values())
    plain = export(model)
    torch.save(model, tmp_path / "wrapped.pt")  # pickling the wrapped model works too
    back = torch.load(tmp_path / "wrapped.pt", weights_only=False)
    assert all(layer.rec_loss is None and layer.known_idle() for layer in seeded_layers(back).values())
    model.eval()
    back.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), model(x)) and torch.equal(back(x), model(x))


def test_seeded_output_reads_the_original_modules_attributes():
    model = make(["head"], kind="diagonal", per_layer=2)
    assert model.head.weight is model.head.original.weight and model.head.out_features == 10
    with pytest.raises(AttributeError):
        model.head.no_such_attribute  # noqa: B018
