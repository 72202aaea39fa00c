"""Models we did not write (transformers' Llama and GPT-2, random init from small configs) and a convnet written
here, each grown by morpho_dist.Morphogenesis in a hand-written PyTorch loop with short dwell times: at least one
seed goes through the whole lifecycle to FOSSILIZED, and the events say why at every move."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import morpho_dist
from tests.fast_growth import FAST_CONTROLLER, rule_tokens

transformers = pytest.importorskip("transformers")

PATH = ["GERMINATED", "TRAINING", "GRAFTING", "STABILIZATION", "EVALUATING", "FINE_TUNING", "FOSSILIZED"]
MAX_STEPS = 200


def grow(model, seeds, batch, loss_fn, val_batch, max_steps=None):
    """A plain training loop; the lines that mention ``morph`` are the plugin's. Stops at the first FOSSILIZED seed."""
    morph = morpho_dist.Morphogenesis(model, seeds=seeds, controller=FAST_CONTROLLER, schedule={"ramp_steps": 5})
    opt = torch.optim.AdamW(morph.host_parameters(), lr=3e-3)

    @torch.no_grad()
    def val_loss() -> float:
        model.eval()
        out = float(loss_fn(model, *val_batch))
        model.train()
        return out

    model.train()
    for step in range(max_steps or MAX_STEPS):
        loss = morph.loss(loss_fn(model, *batch(step)))
        loss.backward()
        morph.step(opt, evaluate=val_loss)
        opt.zero_grad()
        if any(e["to"] == "FOSSILIZED" for e in morph.events):
            break
    return morph


def check_lifecycle(morph):
    fossil = next((e for e in morph.events if e["to"] == "FOSSILIZED"), None)
    assert fossil is not None, [(e["step"], e["layer"], e["seed"], e["command"], e["reason"]) for e in morph.events]
    mine = [e for e in morph.events if (e["layer"], e["seed"]) == (fossil["layer"], fossil["seed"])]
    assert [e["to"] for e in mine][-len(PATH) :] == PATH  # the whole main path, in order
    last = mine[-len(PATH) :]
    assert last[0]["reason"].startswith("capacity short") and last[0]["signals"]["grad_rms"] > 0
    assert last[2]["reason"].startswith("useful for") and last[3]["reason"].startswith("alpha reached")
    for e in (last[5], last[6]):  # EVALUATING -> FINE_TUNING -> FOSSILIZED on the measured counterfactual
        sig = e["signals"]
        assert e["reason"].startswith("val loss improvement")
        assert (
            sig["improvement"] == pytest.approx(sig["loss_at_zero"] - sig["loss_at_alpha"]) and sig["improvement"] > 0
        )
    layer = morph.layers[fossil["layer"]]
    assert int(layer.stage[fossil["seed"]]) == 7 and float(layer.alpha[fossil["seed"]]) == 1.0
    assert morph.summary()["stage_counts"]["FOSSILIZED"] >= 1


def token_batches(vocab: int, seq: int, rows: int):
    """Sequences with a rule to learn: x[t+1] = (3 x[t] + 1) mod vocab, from a random start."""
    g = torch.Generator().manual_seed(1)

    def batch(step: int):
        return (rule_tokens(rows, seq, vocab, g),)

    return batch


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def test_llama_in_a_hand_written_loop():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    model = transformers.LlamaForCausalLM(cfg)
    batch = token_batches(32, 16, 16)
    morph = grow(model, {"targets": ["mlp.up_proj"], "per_layer": 2, "rank": 8}, batch, lm_loss, batch(-1))
    assert list(morph.layers) == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    check_lifecycle(morph)


def test_gpt2_in_a_hand_written_loop():
    # GPT-2's MLP projections are transformers.pytorch_utils.Conv1D (y = x @ W + b, W [in, out])
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=32, n_embd=32, n_layer=2, n_head=2, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg)
    batch = token_batches(32, 16, 16)
    morph = grow(model, {"targets": ["mlp.c_fc"], "per_layer": 2, "rank": 8}, batch, lm_loss, batch(-1))
    assert type(morph.layers["transformer.h.0.mlp.c_fc"]).__name__ == "SeededLayer"
    assert type(model.transformer.h[0].mlp.c_fc.original).__name__ == "Conv1D"
    check_lifecycle(morph)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(F.max_pool2d(x, 2)))
        return self.head(x.mean((2, 3)))


def test_convnet_in_a_hand_written_loop():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)

    def batch(step: int):  # the label: which quadrant of channel 0 is brightest
        x = torch.randn(32, 3, 8, 8, generator=g)
        quads = torch.stack([x[:, 0, :4, :4], x[:, 0, :4, 4:], x[:, 0, 4:, :4], x[:, 0, 4:, 4:]], 1)
        return x, quads.mean((2, 3)).argmax(1)

    loss_fn = lambda model, x, y: F.cross_entropy(model(x), y)  # noqa: E731
    morph = grow(ConvNet(), {"targets": ["conv2"], "per_layer": 2, "rank": 8}, batch, loss_fn, batch(-1))
    check_lifecycle(morph)
