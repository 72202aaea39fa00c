"""Save a grown model and load it into a FRESH instance of its own class, with its outputs (issue 23, point 5).

Models the project does not ship (a transformers Llama and GPT-2 from small configs, random init; a convnet
written here) grow seeds through the lifecycle commands in a hand-written loop: foldable ones (diagonal,
additive / linear blend: merged into the weights) and ones that stay as adapters (diagonal multiplicative,
lowrank). A fresh instance plus the saved files gives the grown model's eval outputs within 1e-6 (fp32;
relative where outputs exceed 1); where
everything merged, the exported state_dict loads with strict=True and no adapter file is written.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import morpho_dist
from morpho_dist import commands
from morpho_dist.export_modules import FossilizedOutput
from morpho_dist.grown import ADAPTER_FILE, WEIGHTS_FILE
from morpho_dist.lifecycle import BLENDED_STAGES, Stage
from morpho_dist.wrap import seeded_layers, wrap
from tests.fast_growth import FAST_CONTROLLER, rule_tokens

transformers = pytest.importorskip("transformers")

TOL = 1e-6


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(torch.relu(self.fc(h.mean((2, 3)))))


def llama(**overrides):
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**cfg, **overrides}))


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg)


def _outputs(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


# name -> (make a fresh model, a batch, a loss of the outputs, diagonal targets, lowrank targets)
def _tokens(seed):
    return torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(seed))


MODELS = {
    "llama": (
        lambda: llama(mlp_bias=True),
        _tokens,
        lambda out, x: nn.functional.cross_entropy(out[:, :-1].reshape(-1, 64), x[:, 1:].reshape(-1)),
        ["mlp.up_proj"],
        ["mlp.down_proj"],
    ),
    "gpt2": (
        gpt2,
        _tokens,
        lambda out, x: nn.functional.cross_entropy(out[:, :-1].reshape(-1, 64), x[:, 1:].reshape(-1)),
        ["mlp.c_fc"],
        ["attn.c_proj"],
    ),
    "convnet": (
        ConvNet,
        lambda seed: torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(seed)),
        lambda out, x: (out**2).mean(),
        ["conv1", "fc"],
        ["conv2"],
    ),
}


def grow(model, make_batch, loss_fn, plan: dict[str, list[str | None]], steps_per_stage: int = 2):
    """Take the seeds named in ``plan`` (layer -> a blend per seed, None: stays DORMANT) through GERMINATED ..
    FOSSILIZED with the lifecycle commands, training host and banks in between; returns the step count."""
    layers = seeded_layers(model)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    step = 0

    def train(n):
        nonlocal step
        for _ in range(n):
            x = make_batch(step)
            loss = loss_fn(_outputs(model, x), x)
            loss = loss + sum(layer.rec_loss for layer in layers.values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            commands.tick_(layers)
            step += 1

    chosen = [(layers[name], i, b) for name, blends in plan.items() for i, b in enumerate(blends) if b is not None]
    for layer, i, blend in chosen:
        commands.germinate(layer, i, step, blend)
        commands.advance(layer, i, step)  # -> TRAINING
    train(steps_per_stage)
    for layer, i, _ in chosen:
        commands.advance(layer, i, step)  # -> GRAFTING
    for alpha in (0.3, 0.6, 0.9):  # the ramp, as a schedule would move it
        for layer, i, _ in chosen:
            layer.alpha[i] = alpha
        train(1)
    for layer, i, _ in chosen:
        for _ in range(3):  # -> STABILIZATION -> EVALUATING -> FINE_TUNING
            commands.advance(layer, i, step)
    train(steps_per_stage)
    for layer, i, _ in chosen:
        assert commands.advance(layer, i, step) == Stage.FOSSILIZED
    return step


def grown_model(name: str, mixed: bool):
    """A grown model: with ``mixed``, fossilized seeds of both kinds (merged: diagonal additive and linear; adapter:
    diagonal multiplicative and lowrank), else only merged ones."""
    make, make_batch, loss_fn, diagonal, lowrank = MODELS[name]
    torch.manual_seed(0)
    model = make()
    wrap(model, dict(targets=diagonal, per_layer=4, kind="diagonal"), backend="reference")
    if mixed:
        wrap(model, dict(targets=lowrank, per_layer=2, kind="lowrank", rank=4), backend="reference")
    plan = {}
    for key, layer in seeded_layers(model).items():
        if layer.kind == "diagonal":
            plan[key] = ["additive", "multiplicative" if mixed else "linear", None, "linear"]
        else:
            plan[key] = ["additive", None]
    grow(model, make_batch, loss_fn, plan)
    model.eval()
    return model, make, make_batch


def _max_diff(a, b):
    return float((a - b).abs().max())


def _within_tol(got, want) -> bool:
    """|got - want| <= 1e-6, relative to the outputs' scale where it exceeds 1 (fp32 keeps 7 digits: logits of 30
    are 4e-6 apart at their last bit)."""
    return _max_diff(got, want) <= TOL * max(1.0, float(want.abs().max()))


@pytest.mark.parametrize("name", list(MODELS))
def test_save_grown_load_grown_into_a_fresh_instance(name, tmp_path):
    model, make, make_batch = grown_model(name, mixed=True)
    layers = seeded_layers(model)
    stages = {k: layer.stages() for k, layer in layers.items()}
    assert sum(s.count(Stage.FOSSILIZED) for s in stages.values()) >= 5
    x = make_batch(1000)
    with torch.no_grad():
        want = _outputs(model, x)
        host = _outputs(morpho_dist.export(model, merge=False).apply(_strip_seeds), x)
    assert _max_diff(want, host) > 1e-3  # the grown seeds change the outputs

    morpho_dist.save_grown(model, tmp_path)
    assert (tmp_path / ADAPTER_FILE).exists()
    torch.manual_seed(123)  # a fresh instance: other weights
    fresh = make().eval()
    morpho_dist.load_grown(fresh, tmp_path)
    with torch.no_grad():
        got = _outputs(fresh, x)
    assert _within_tol(got, want)
    adapters = {n for n, m in fresh.named_modules() if isinstance(m, FossilizedOutput)}
    kinds = {layers[n].kind for n in adapters}
    assert kinds == {"diagonal", "lowrank"}  # multiplicative diagonal seeds and lowrank ones stay adapters
    folded = [n for n, layer in layers.items() if layer.kind == "diagonal"]
    for n in folded:  # their additive / linear seeds were merged: the adapter keeps the multiplicative seed only
        seeds = fresh.get_submodule(n).seeds
        assert [(s.start, s.end, s.blend) for s in seeds] == [(layers[n].chunk, 2 * layers[n].chunk, 1)]


def _strip_seeds(module):
    """export(..., merge=False) keeps every fossilized seed as FossilizedOutput: drop them (the plain host)."""
    for name, child in list(module.named_children()):
        if isinstance(child, FossilizedOutput):
            setattr(module, name, child.original)


@pytest.mark.parametrize("name", list(MODELS))
def test_merged_model_loads_strictly_into_a_fresh_instance(name, tmp_path):
    model, make, make_batch = grown_model(name, mixed=False)
    x = make_batch(1000)
    with torch.no_grad():
        want = _outputs(model, x)
    plain = morpho_dist.export(model)
    assert not any(isinstance(m, FossilizedOutput) for m in plain.modules())  # everything merged
    fresh = make().eval()
    fresh.load_state_dict(plain.state_dict(), strict=True)
    with torch.no_grad():
        assert _within_tol(_outputs(fresh, x), want)
    morpho_dist.save_grown(model, tmp_path)
    assert (tmp_path / WEIGHTS_FILE).exists() and not (tmp_path / ADAPTER_FILE).exists()


def test_hf_save_pretrained_from_pretrained_and_the_loader(tmp_path):
    """The transformers path: save_pretrained files, from_pretrained into the class, then load_grown."""
    model, _, make_batch = grown_model("llama", mixed=True)
    x = make_batch(1000)
    with torch.no_grad():
        want = _outputs(model, x)
    exported = morpho_dist.export(model)
    with pytest.raises(ValueError, match=r"save_pretrained cannot represent .*morpho_dist\.save_grown"):
        exported.save_pretrained(tmp_path / "refused")
    assert not (tmp_path / "refused").exists()

    morpho_dist.save_grown(model, tmp_path / "grown")  # a transformers model: its own save_pretrained files
    assert (tmp_path / "grown" / "config.json").exists()
    fresh = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "grown").eval()
    morpho_dist.load_grown(fresh, tmp_path / "grown")
    with torch.no_grad():
        assert _within_tol(_outputs(fresh, x), want)

    merged, _, _ = grown_model("gpt2", mixed=False)  # all merged: plain save_pretrained / from_pretrained suffice
    with torch.no_grad():
        want = _outputs(merged, x)
    morpho_dist.export(merged).save_pretrained(tmp_path / "merged")
    fresh = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert _within_tol(_outputs(fresh, x), want)


def test_standard_llama_without_biases_keeps_shifted_seeds_as_adapters(tmp_path):
    """Llama's projections have no bias: an additive seed's shift cannot fold, so it is saved as an adapter."""
    torch.manual_seed(0)
    model = llama()
    wrap(model, dict(targets=["mlp.up_proj"], per_layer=2, kind="diagonal"), backend="reference")
    grow(model, _tokens, MODELS["llama"][2], {k: ["additive", None] for k in seeded_layers(model)})
    model.eval()
    x = _tokens(1000)
    with torch.no_grad():
        want = _outputs(model, x)
    morpho_dist.save_grown(model, tmp_path)
    fresh = morpho_dist.load_grown(llama().eval(), tmp_path)
    assert sum(isinstance(m, FossilizedOutput) for m in fresh.modules()) == 2
    with torch.no_grad():
        assert _within_tol(_outputs(fresh, x), want)


def test_load_grown_refuses_another_class_and_changes_nothing(tmp_path):
    model, _, _ = grown_model("convnet", mixed=True)
    morpho_dist.save_grown(model, tmp_path)
    other = nn.Sequential(nn.Linear(3, 4))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="has no module 'conv1'"):
        morpho_dist.load_grown(other, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    fresh = morpho_dist.load_grown(ConvNet(), tmp_path)
    with pytest.raises(ValueError, match="already carries loaded seeds"):
        morpho_dist.load_grown(fresh, tmp_path)
    with pytest.raises(ValueError, match="holds neither"):
        morpho_dist.load_grown(ConvNet(), tmp_path / "missing")


def end_growth(model, step: int) -> None:
    """Growth ends here: seeds blended into the output but not FOSSILIZED are culled (export would drop them)."""
    for layer in seeded_layers(model).values():
        for i, stage in enumerate(layer.stages()):
            if stage in BLENDED_STAGES and stage != Stage.FOSSILIZED:
                commands.cull(layer, layer.seed_offset + i, step)


@pytest.mark.parametrize("kind", ["diagonal", "lowrank"])
def test_engine_grown_convnet_saves_and_loads(kind, tmp_path):
    """The user's path end to end: Morphogenesis in a plain loop grows the convnet, save_grown, a fresh ConvNet,
    load_grown. Diagonal additive seeds all merge (the state_dict loads strictly); lowrank ones come back as
    adapters."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = ConvNet()
    seeds = {"targets": ["conv2", "fc"], "per_layer": 2, "kind": kind, "rank": 4, "blend": "additive"}
    morph = morpho_dist.Morphogenesis(
        model, seeds=seeds, controller=FAST_CONTROLLER, schedule={"ramp_steps": 5}, kernel={"backend": "reference"}
    )
    opt = torch.optim.AdamW(morph.host_parameters(), lr=1e-2)
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()

    def val_loss():
        model.eval()
        with torch.no_grad():
            loss = float(F.cross_entropy(model(x), y))
        model.train()
        return loss

    for _ in range(80):
        morph.loss(F.cross_entropy(model(x), y)).backward()
        morph.step(opt, evaluate=val_loss)
        opt.zero_grad()
    assert any(e["to"] == "FOSSILIZED" for e in morph.events)
    end_growth(model, morph.steps)
    model.eval()
    with torch.no_grad():
        want = model(x)
    morpho_dist.save_grown(model, tmp_path)
    fresh = morpho_dist.load_grown(ConvNet().eval(), tmp_path)
    with torch.no_grad():
        assert _within_tol(fresh(x), want)
    adapters = [n for n, m in fresh.named_modules() if isinstance(m, FossilizedOutput)]
    if kind == "diagonal":
        assert not adapters and not (tmp_path / ADAPTER_FILE).exists()
        strict = ConvNet().eval()
        strict.load_state_dict(morpho_dist.export(model).state_dict(), strict=True)
        with torch.no_grad():
            assert _within_tol(strict(x), want)
    else:
        assert adapters


def _rule_tokens(step: int):
    return rule_tokens(16, 16, 64, torch.Generator().manual_seed(step))


@pytest.mark.parametrize("name,kind", [("llama", "lowrank"), ("gpt2", "diagonal")])
def test_engine_grown_transformers_model_round_trip(name, kind, tmp_path):
    """Morphogenesis grows a Llama (lowrank seeds: an adapter) or a GPT-2 (diagonal additive seeds on Conv1D:
    merged) until a seed is FOSSILIZED; save_grown, then from_pretrained into the class plus load_grown."""
    torch.manual_seed(0)
    model = llama() if name == "llama" else gpt2()
    seeds = {"targets": ["mlp.up_proj" if name == "llama" else "mlp.c_fc"], "per_layer": 2, "kind": kind, "rank": 8}
    morph = morpho_dist.Morphogenesis(model, seeds=seeds, controller=FAST_CONTROLLER, schedule={"ramp_steps": 5})
    opt = torch.optim.AdamW(morph.host_parameters(), lr=3e-3)
    val_ids = _rule_tokens(-1)

    @torch.no_grad()
    def val_loss():
        model.eval()
        loss = float(model(input_ids=val_ids, labels=val_ids).loss)
        model.train()
        return loss

    model.train()
    for step in range(200):
        ids = _rule_tokens(step)
        morph.loss(model(input_ids=ids, labels=ids).loss).backward()
        morph.step(opt, evaluate=val_loss)
        opt.zero_grad()
        if any(e["to"] == "FOSSILIZED" for e in morph.events):
            break
    assert any(e["to"] == "FOSSILIZED" for e in morph.events)
    end_growth(model, morph.steps)
    model.eval()
    with torch.no_grad():
        want = _outputs(model, val_ids)
    morpho_dist.save_grown(model, tmp_path)
    cls = type(model)
    fresh = morpho_dist.load_grown(cls.from_pretrained(tmp_path).eval(), tmp_path)
    with torch.no_grad():
        assert _within_tol(_outputs(fresh, val_ids), want)
    assert (tmp_path / ADAPTER_FILE).exists() == (kind == "lowrank")
    if kind == "diagonal":  # all merged: the plain transformers round trip is exact too
        morpho_dist.export(model).save_pretrained(tmp_path / "plain")
        with torch.no_grad():
            assert _within_tol(_outputs(cls.from_pretrained(tmp_path / "plain").eval(), val_ids), want)
