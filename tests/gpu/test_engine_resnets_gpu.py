"""torchvision's and timm's resnet18 (random init) grown by morpho_dist.Morphogenesis in a hand-written loop on
the GPU (Triton backend): a seed goes through the whole lifecycle to FOSSILIZED, and the events say why.
torchvision and timm cannot be installed beside the CPU torch of CI; the device machine has both."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tests.integration.test_engine_models import check_lifecycle, grow

pytestmark = pytest.mark.gpu


def image_batches(classes: int = 10):
    """32x32 images whose label is the brightest of ``classes`` vertical stripes of channel 0."""
    g = torch.Generator(device="cuda").manual_seed(3)

    def batch(step: int):
        x = torch.randn(64, 3, 32, 32, device="cuda", generator=g)
        stripes = x[:, 0, :, : classes * 3].reshape(64, 32, classes, 3).mean((1, 3))
        return x, stripes.argmax(1)

    return batch


def _grow_resnet(model):
    torch.manual_seed(0)
    model = model.cuda()
    batch = image_batches()
    loss_fn = lambda m, x, y: F.cross_entropy(m(x), y)  # noqa: E731
    seeds = {"targets": ["layer2.0.conv2", "layer3.0.conv2"], "per_layer": 4, "rank": 8}
    # a seed's measured gain on this task is small against the counterfactual's noise: some seeds are culled
    # before one fossilizes, so the loop gets more steps than the CPU models' (a step takes ~40 ms here)
    morph = grow(model, seeds, batch, loss_fn, batch(-1), max_steps=1000)
    assert all(layer.stage.is_cuda and layer.backend == "auto" for layer in morph.layers.values())
    print(json.dumps({"steps": morph.steps, "events": morph.events}, default=str))
    check_lifecycle(morph)
    return morph


def test_torchvision_resnet18_grows_on_the_gpu():
    torchvision = pytest.importorskip("torchvision")
    _grow_resnet(torchvision.models.resnet18(num_classes=10))


def test_timm_resnet18_grows_on_the_gpu():
    timm = pytest.importorskip("timm")
    _grow_resnet(timm.create_model("resnet18", pretrained=False, num_classes=10))
