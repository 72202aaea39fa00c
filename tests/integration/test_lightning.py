"""The Lightning Callback runs a short fit on the CPU: the seeds grow to FOSSILIZED, the module's optimizer holds
no bank, and the engine's state travels in Lightning's checkpoint."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from morpho_dist.integrations.lightning import MorphogenesisCallback  # noqa: E402
from tests.fast_growth import FAST_CONTROLLER  # noqa: E402

X = torch.randn(256, 16, generator=torch.Generator().manual_seed(5))
Y = X[:, :4].argmax(1)


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)  # all parameters: the callback takes the banks out


@torch.no_grad()
def val_loss(module) -> float:
    module.eval()
    out = float(F.cross_entropy(module.net(X), Y))
    module.train()
    return out


def fit(module, callback, steps, ckpt_path=None):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=64, shuffle=False)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


def test_lightning_callback_grows_the_module(tmp_path):
    torch.manual_seed(0)
    module = Classifier()
    grow = MorphogenesisCallback(
        seeds={"targets": ["net.0"], "per_layer": 2, "kind": "diagonal"},
        controller=FAST_CONTROLLER,
        schedule={"ramp_steps": 5},
        evaluate=val_loss,
    )
    trainer = fit(module, grow, 60)
    engine = grow.engine
    assert engine.steps == 60 and list(engine.layers) == ["net.0"]
    banks = {id(p) for p in engine.layers["net.0"].bank.parameters()}
    assert not any(id(p) in banks for g in trainer.optimizers[0].param_groups for p in g["params"])
    fossil = [e for e in engine.events if e["to"] == "FOSSILIZED"]
    assert fossil and fossil[0]["reason"].startswith("val loss improvement")
    assert "training_step" not in vars(module)  # teardown put the module's own method back

    path = tmp_path / "grown.ckpt"
    trainer.save_checkpoint(path)
    torch.manual_seed(1)
    again = MorphogenesisCallback(
        seeds={"targets": ["net.0"], "per_layer": 2, "kind": "diagonal"},
        controller=FAST_CONTROLLER,
        schedule={"ramp_steps": 5},
        evaluate=val_loss,
    )
    fit(Classifier(), again, 70, ckpt_path=str(path))  # resumes at step 60, runs 10 more
    assert again.engine.steps == 70
    assert [int(s) for s in again.engine.layers["net.0"].stage][fossil[0]["seed"]] == 7  # FOSSILIZED, restored
