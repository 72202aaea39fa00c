"""torchvision's and timm's resnet18 on the GPU (Triton backend): idle seeds are bit-identical to the unwrapped
model, and a grown model saves and loads back into a fresh resnet18 with its outputs (issue 23, points 2 / 5 / 6
on models the project does not ship; torchvision and timm do not install in CI, so this runs on the device).

    TRITON_INTERPRET=0 python -m pytest -q -m gpu tests/gpu/test_grown_vision_gpu.py
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import morpho_dist
from morpho_dist import commands, layer_types
from morpho_dist.export_modules import FossilizedOutput
from morpho_dist.layer_types import LayerType, fold_affine, register_layer_type
from morpho_dist.lifecycle import Stage
from morpho_dist.wrap import seeded_layers, wrap

pytestmark = pytest.mark.gpu

CONVS = ["layer1.0.conv1", "layer2.0.conv2", "layer3.1.conv1"]  # bias-free convolutions before BatchNorm
NORMS = ["layer1.0.bn2", "layer2.1.bn1", "layer4.0.bn2"]  # BatchNorm2d, registered below (it folds exactly)


def resnet18(source: str) -> nn.Module:
    if source == "torchvision":
        models = pytest.importorskip("torchvision.models")
        return models.resnet18(weights=None)
    timm = pytest.importorskip("timm")
    return timm.create_model("resnet18", pretrained=False)


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 without TF32 and deterministic cuDNN, so that two runs of one model agree bit for bit."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32)  # fmt: skip
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
     torch.backends.cuda.matmul.allow_tf32) = saved  # fmt: skip


def _run(model, x, gy):
    x = x.detach().clone().requires_grad_()
    y = model(x)
    y.backward(gy)
    return y, x.grad, [p.grad for n, p in model.named_parameters() if ".bank." not in n]


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_idle_seeds_bit_identical_on_resnet18(source, memory_format):
    torch.manual_seed(0)
    host = resnet18(source).cuda().to(memory_format=memory_format)
    wrapped = copy.deepcopy(host)
    wrap(wrapped, dict(targets=CONVS + ["fc"], per_layer=4, kind="diagonal"), backend="triton")
    x = torch.randn(4, 3, 64, 64, device="cuda").contiguous(memory_format=memory_format)
    gy = torch.randn(4, 1000, device="cuda")
    y0, dx0, g0 = _run(host, x, gy)
    again = _run(copy.deepcopy(host), x, gy)
    if not (torch.equal(again[0], y0) and all(torch.equal(a, b) for a, b in zip(again[2], g0))):
        pytest.skip("this GPU's kernels are not deterministic run to run: bit-identity cannot be observed")
    y1, dx1, g1 = _run(wrapped, x, gy)
    assert torch.equal(y0, y1) and torch.equal(dx0, dx1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert all(float(layer.telemetry[:, 0].sum()) > 0 for layer in seeded_layers(wrapped).values())


def grow(model, plan, steps=2):
    """Take the seeds in ``plan`` (layer -> blend per seed, None: DORMANT) through the lifecycle commands to
    FOSSILIZED, training host and banks on random images in between."""
    layers = seeded_layers(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    gen = torch.Generator(device="cuda").manual_seed(0)
    chosen = [(layers[n], i, b) for n, blends in plan.items() for i, b in enumerate(blends) if b is not None]

    def train(n):
        for _ in range(n):
            x = torch.randn(8, 3, 64, 64, device="cuda", generator=gen)
            loss = model(x).logsumexp(-1).mean() + sum(layer.rec_loss for layer in layers.values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            commands.tick_(layers)

    for layer, i, blend in chosen:
        commands.germinate(layer, i, 0, blend)
        commands.advance(layer, i, 0)  # TRAINING
    train(steps)
    for layer, i, _ in chosen:
        commands.advance(layer, i, 0)  # GRAFTING
        layer.alpha[i] = 0.8
    train(steps)
    for layer, i, _ in chosen:
        for _ in range(4):  # STABILIZATION, EVALUATING, FINE_TUNING, FOSSILIZED
            commands.advance(layer, i, 0)
    train(steps)  # FINE_TUNING trained before; now frozen: the step leaves them as they are
    assert all(layer.stages()[i] == Stage.FOSSILIZED for layer, i, _ in chosen)
    model.eval()


def _close(got, want):
    diff = float((got - want).abs().max())
    assert diff <= 1e-5 * max(1.0, float(want.abs().max())), diff


@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_grown_resnet18_saves_and_loads_into_a_fresh_instance(source, tmp_path):
    torch.manual_seed(0)
    model = resnet18(source).cuda()
    wrap(model, dict(targets=CONVS + ["fc"], per_layer=4, kind="diagonal"), backend="triton")
    wrap(model, dict(targets=["layer3.0.conv2"], per_layer=4, kind="lowrank", rank=8), backend="triton")
    plan = {n: ["additive", "multiplicative", None, "linear"] for n in CONVS + ["fc"]}
    plan["layer3.0.conv2"] = ["additive", None, None, None]
    grow(model, plan)
    x = torch.randn(4, 3, 64, 64, device="cuda")
    with torch.no_grad():
        want = model(x)
    morpho_dist.save_grown(model, tmp_path)
    fresh = morpho_dist.load_grown(resnet18(source).cuda().eval(), tmp_path)
    assert sum(isinstance(m, FossilizedOutput) for m in fresh.modules()) == len(CONVS) + 2
    with torch.no_grad():
        _close(fresh(x), want)


@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_merged_resnet18_state_dict_loads_strictly(source, monkeypatch):
    """BatchNorm2d, registered as a layer type, takes a diagonal seed's scale and shift exactly, like fc: the
    exported state_dict is the class's own and loads with strict=True."""
    monkeypatch.setitem(layer_types._REGISTRY, nn.BatchNorm2d, None)  # the registration ends with the test
    register_layer_type(nn.BatchNorm2d, LayerType(features=lambda m: m.num_features, feature_dim=1, fold=fold_affine()))
    torch.manual_seed(0)
    model = resnet18(source).cuda()
    wrap(model, dict(targets=NORMS + ["fc"], per_layer=4, kind="diagonal"), backend="triton")
    grow(model, {n: ["additive", None, "linear", "additive"] for n in NORMS + ["fc"]})
    x = torch.randn(4, 3, 64, 64, device="cuda")
    with torch.no_grad():
        want = model(x)
    plain = morpho_dist.export(model)
    assert not any(isinstance(m, FossilizedOutput) for m in plain.modules())
    fresh = resnet18(source).cuda().eval()
    fresh.load_state_dict(plain.state_dict(), strict=True)
    with torch.no_grad():
        _close(fresh(x), want)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_idle_transformers_models_bit_identical_on_the_gpu(name):
    """A transformers Llama / GPT-2 with every projection seeded (Triton backend), every seed idle: logits and
    host gradients equal the unwrapped model's bit for bit."""
    transformers = pytest.importorskip("transformers")
    if name == "llama":
        sizes = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
        cfg = transformers.LlamaConfig(**sizes, num_key_value_heads=2, attn_implementation="eager")
        make, targets = (lambda: transformers.LlamaForCausalLM(cfg)), r".*(proj|lm_head)"
    else:
        cfg = transformers.GPT2Config(vocab_size=256, n_embd=128, n_layer=2, n_head=4, attn_implementation="eager")
        make, targets = (lambda: transformers.GPT2LMHeadModel(cfg)), r".*(c_attn|c_proj|c_fc|lm_head)"
    torch.manual_seed(0)
    host = make().cuda()
    wrapped = wrap(copy.deepcopy(host), dict(targets=targets, per_layer=4, kind="lowrank", rank=8), backend="triton")
    tokens = torch.randint(0, 256, (4, 64), device="cuda")
    gy = torch.randn(4, 64, 256, device="cuda")
    results = []
    for model in (host, copy.deepcopy(host), wrapped):
        torch.manual_seed(1)
        logits = model(tokens).logits
        logits.backward(gy)
        results.append((logits, [p.grad for n, p in model.named_parameters() if ".bank." not in n]))
    (y0, g0), (y_again, g_again), (y1, g1) = results
    if not (torch.equal(y0, y_again) and all(torch.equal(a, b) for a, b in zip(g0, g_again))):
        pytest.skip("this GPU's kernels are not deterministic run to run: bit-identity cannot be observed")
    assert torch.equal(y0, y1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
