"""Tasks (losses, bits per byte), ``_target_`` models/data/tasks, the gpt host and FLOP accounting."""

import math

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from morpho_dist.cli import CONF_DIR
from morpho_dist.config import register_configs
from morpho_dist.config_rules import validate
from morpho_dist.data import DataSpec
from morpho_dist.errors import ConfigError
from morpho_dist.flops import FlopMeter, measure_host, seed_forward_flops
from morpho_dist.gpt import GPT
from morpho_dist.lifecycle import Stage
from morpho_dist.models import build_model
from morpho_dist.task import CausalLMTask, ClassificationTask, LossTask, build_task

register_configs()


class TinyNet(nn.Module):
    """A user's class: only ``width`` and ``num_classes`` are its own arguments."""

    def __init__(self, width: int, num_classes: int, in_features: int) -> None:
        super().__init__()
        self.body = nn.Linear(in_features, width)
        self.out = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.out(torch.relu(self.body(x.flatten(1))))


def scaled_l1(output, target, scale=1.0):
    return scale * (output.float().mean() - target.float().mean()).abs()


def _compose(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_causal_lm_loss_and_bits_per_byte():
    task = CausalLMTask()
    logits = torch.zeros(2, 5, 256)  # uniform over bytes: ln 256 nats = exactly 8 bits per byte
    target = torch.randint(0, 256, (2, 5))
    assert math.isclose(float(task.loss(logits, target)), math.log(256), rel_tol=1e-6)
    model = lambda x: torch.zeros(*x.shape, 256)  # noqa: E731
    model.eval = model.train = lambda *a: None
    model.training = False
    out = task.evaluate(model, [(target, target)])
    assert math.isclose(out["bpb"], 8.0, rel_tol=1e-6) and math.isclose(out["loss"], math.log(256), rel_tol=1e-6)
    assert math.isclose(CausalLMTask(bytes_per_token=4.0).bits_per_byte(math.log(2) * 8), 2.0)
    logits = torch.randn(3, 4, 7)
    target = torch.randint(0, 7, (3, 4))
    by_hand = -torch.log_softmax(logits, -1).gather(-1, target[..., None]).mean()
    assert torch.allclose(task.loss(logits, target), by_hand)
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        task.loss(torch.zeros(3, 7), target)


def test_classification_metrics():
    task = ClassificationTask()
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    y = torch.tensor([0, 0, 0])
    net = nn.Identity()
    out = task.evaluate(net, [(x[:2], y[:2]), (x[2:], y[2:])])
    assert out["acc"] == pytest.approx(2 / 3)
    assert out["loss"] == pytest.approx(float(F.cross_entropy(x, y)))


def test_user_losses_through_target():
    fn = build_task(OmegaConf.create({"_target_": f"{__name__}.scaled_l1", "name": "x", "scale": 2.0}))
    assert isinstance(fn, LossTask)
    assert float(fn.loss(torch.ones(2, 3), torch.zeros(2))) == pytest.approx(2.0)
    cls = build_task(OmegaConf.create({"_target_": "torch.nn.CrossEntropyLoss", "label_smoothing": 0.0}))
    logits, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    assert torch.allclose(cls.loss(logits, y), F.cross_entropy(logits, y))
    assert isinstance(build_task(OmegaConf.create({"_target_": "morpho_dist.task.CausalLMTask"})), CausalLMTask)
    with pytest.raises(ConfigError, match="task._target_='nowhere.loss' cannot be imported"):
        build_task(OmegaConf.create({"_target_": "nowhere.loss"}))


def test_builtin_models_are_targets_and_user_classes_get_data_arguments():
    cfg = _compose("model=gpt", "data=text", "task=causal_lm", "model.width=32", "model.mlp_width=64")
    assert cfg.model._target_ == "morpho_dist.models.GPT" and cfg.data._target_ == "morpho_dist.corpus.stdlib_text"
    spec = DataSpec("tokens", (16,), vocab_size=256, seq_len=16)
    gpt = build_model(cfg.model, spec)
    assert isinstance(gpt, GPT) and gpt.blocks[0].mlp.fc1.out_features == 64 and gpt.pos.num_embeddings == 16
    user = _compose(f"model._target_={__name__}.TinyNet", "+model.width=12", "seeds.enabled=false")
    validate(user)  # the mlp's own keys (embed, hidden, act) are not TinyNet's: left out, no error
    net = build_model(user.model, DataSpec("labelled", (1, 8, 8), 10))
    assert isinstance(net, TinyNet) and net.body.in_features == 64 and net.out.out_features == 10
    assert net.body.out_features == 12


def test_unknown_keys_name_the_key():
    bad = _compose(f"model._target_={__name__}.TinyNet", "+model.width=12", "+model.depth=3", "seeds.enabled=false")
    with pytest.raises(ConfigError, match="model.depth: TinyNet takes no argument 'depth'"):
        build_model(bad.model, DataSpec("labelled", (1, 8, 8), 10))
    with pytest.raises(ConfigError, match="model.depth is not a known key"):
        validate(_compose("+model.depth=3"))
    with pytest.raises(ConfigError, match="model._target_='mypkg.Nope' cannot be imported"):
        validate(_compose("model._target_=mypkg.Nope", "seeds.enabled=false"))


def test_task_must_fit_the_data():
    with pytest.raises(ConfigError, match="task=classification needs labelled data.*use task=causal_lm"):
        validate(_compose("data=text", "model=gpt"))
    with pytest.raises(ConfigError, match="task=causal_lm needs token data"):
        validate(_compose("task=causal_lm"))
    validate(_compose("data=text", "model=gpt", "task=causal_lm"))


def test_steps_resolver_scales_with_the_run_length():
    cfg = _compose("train.steps=1000", "+controller.x=${steps:0.05}")
    assert cfg.controller.x == 50
    assert _compose("train.steps=10", "+controller.x=${steps:0.001}").controller.x == 1


def test_gpt_is_causal_and_both_mlps_run():
    torch.manual_seed(0)
    for mlp in ("gelu", "swiglu"):
        model = GPT(vocab_size=50, seq_len=12, width=16, depth=2, heads=2, mlp_width=24, mlp=mlp).eval()
        x = torch.randint(0, 50, (2, 12))
        y = model(x)
        x2 = x.clone()
        x2[:, 7:] = (x2[:, 7:] + 1) % 50
        assert y.shape == (2, 12, 50)
        assert torch.allclose(model(x2)[:, :7], y[:, :7], atol=1e-6) and not torch.allclose(model(x2), y)
    assert model.head.weight is model.tok.weight
    with pytest.raises(ConfigError, match="model.heads=3 must divide model.width=16"):
        GPT(width=16, heads=3)
    with pytest.raises(ConfigError, match="model.mlp='relu'"):
        GPT(mlp="relu")


def test_host_flops_and_seed_flops():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    per_step, rows = measure_host(model, torch.zeros(7, 10), ["0"])
    # forward 2*B*(10*20 + 20*5); backward twice that, minus the input gradient of the first layer
    fwd = 2 * 7 * (10 * 20 + 20 * 5)
    assert per_step == pytest.approx(3 * fwd - 2 * 7 * 10 * 20)
    assert rows == {"0": 7}
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert seed_forward_flops("lowrank", rows=100, chunk=16, rank=8) == 4 * 100 * 16 * 8
    meter = FlopMeter(1000.0, {"a": 10.0})
    meter.step({"a": [Stage.DORMANT, Stage.TRAINING, Stage.FOSSILIZED, Stage.CULLED]})
    assert meter.total == 1000 + 3 * 10 + 2 * 10 and meter.seed_total == 50
    meter.step({})
    assert meter.total == 2050
