"""A Lightning Callback that grows the LightningModule's target layers with morpho_dist.Morphogenesis.

    from morpho_dist.integrations.lightning import MorphogenesisCallback

    grow = MorphogenesisCallback(seeds={"targets": ["net.0"], "per_layer": 4}, evaluate=lambda module: val_loss)
    trainer = lightning.pytorch.Trainer(callbacks=[grow], max_steps=1000)
    trainer.fit(module, loaders)

- ``setup`` (stage "fit", before Lightning moves the module, wraps it in DDP or builds the optimizers) wraps the
  module's targets in place; keyword arguments are Morphogenesis's (seeds, controller, schedule, ...).
- what ``training_step`` returns (a loss tensor, or a dict with "loss") gets the seeds' reconstruction losses
  (``engine.loss``); ``on_fit_start`` takes the blueprint banks out of the optimizers ``configure_optimizers``
  built over ``self.parameters()`` (the seeds have their own optimizer);
- after each optimizer step, ``engine.step(optimizer, host_step=False)`` runs the seeds' lifecycle (Lightning
  steps the host optimizer itself, so a non-finite step is guarded for the seeds, not the host);
- ``evaluate(module) -> float``: the validation loss for the counterfactuals (needed once a seed is EVALUATING);
- the engine's state saves with Lightning's checkpoint (``state_dict`` / ``load_state_dict``).
Automatic optimization with one optimizer; with manual optimization call the engine (``callback.engine``) yourself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl

from morpho_dist.engine import Morphogenesis


class MorphogenesisCallback(pl.Callback):
    def __init__(self, *, evaluate: Callable[[pl.LightningModule], float] | None = None, **engine_kwargs: Any):
        self.evaluate, self.engine_kwargs = evaluate, engine_kwargs
        self.engine: Morphogenesis | None = None
        self._pending_state: dict | None = None
        self._stepped: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.engine is not None:
            return
        self.engine = Morphogenesis(pl_module, **self.engine_kwargs)
        engine, training_step = self.engine, pl_module.training_step

        def with_rec_losses(*args: Any, **kwargs: Any) -> Any:
            out = training_step(*args, **kwargs)
            if isinstance(out, Mapping) and "loss" in out:
                return {**out, "loss": engine.loss(out["loss"])}
            return engine.loss(out) if out is not None else out

        pl_module.training_step = with_rec_losses  # instance attribute; teardown removes it
        if self._pending_state is not None:
            self.engine.load_state_dict(self._pending_state)
            self._pending_state = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and "training_step" in vars(pl_module):
            del pl_module.training_step

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.engine.follow_model_device()  # Lightning moved the module to its device after setup
        for optimizer in trainer.optimizers:
            self.engine.exclude_banks(optimizer)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._stepped = optimizer  # the step happens right after; the engine runs once it has

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._stepped is None:  # accumulating gradients: no optimizer step on this batch
            return
        optimizer, self._stepped = self._stepped, None
        evaluate = (lambda: self.evaluate(pl_module)) if self.evaluate is not None else None
        self.engine.step(optimizer, evaluate=evaluate, host_step=False)

    def state_dict(self) -> dict:
        return self.engine.state_dict() if self.engine is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        if self.engine is None:
            self._pending_state = state_dict
        else:
            self.engine.load_state_dict(state_dict)
