"""The transformers Trainer with morpho_dist.Morphogenesis: a Trainer subclass (the loss hook and the optimizer
without banks) and a TrainerCallback (the lifecycle after each optimizer step, the engine's state in checkpoints).

    from morpho_dist import Morphogenesis
    from morpho_dist.integrations.hf_trainer import MorphoTrainer

    morph = Morphogenesis(model, seeds={"targets": ["mlp.up_proj"], "per_layer": 4})   # wraps in place
    trainer = MorphoTrainer(morph=morph, evaluate=val_loss, model=model, args=args, train_dataset=data)
    trainer.train()

- ``compute_loss`` adds the seeds' reconstruction losses to the training loss (``morph.loss``; not in evaluation);
- ``create_optimizer`` builds the Trainer's optimizer and takes the blueprint banks out of it (the seeds have their
  own optimizer);
- ``MorphogenesisCallback.on_optimizer_step`` runs ``morph.step(optimizer, host_step=False)`` (the Trainer steps
  the host optimizer itself, so a non-finite step is guarded for the seeds, not the host);
- ``evaluate(model) -> float``: the validation loss for the counterfactuals (needed once a seed is EVALUATING);
- the engine's state is saved as ``morphogenesis.pt`` in every ``checkpoint-<step>`` folder and loaded when
  training resumes from one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from morpho_dist.engine import Morphogenesis

ENGINE_FILE = "morphogenesis.pt"


class MorphogenesisCallback(TrainerCallback):
    """The lifecycle after each optimizer step, and the engine's state beside each checkpoint."""

    def __init__(self, morph: Morphogenesis, evaluate: Callable[[torch.nn.Module], float] | None = None) -> None:
        self.morph, self.evaluate = morph, evaluate

    def on_optimizer_step(self, args, state, control, optimizer=None, model=None, **kwargs):
        evaluate = (lambda: self.evaluate(model)) if self.evaluate is not None else None
        self.morph.step(optimizer, evaluate=evaluate, host_step=False)

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            torch.save(self.morph.state_dict(), os.path.join(folder, ENGINE_FILE))


class MorphoTrainer(Trainer):
    """A Trainer whose model ``morph`` wraps; every other argument is the Trainer's."""

    def __init__(self, *args: Any, morph: Morphogenesis, evaluate: Callable | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # moves the model to its device
        self.morph = morph
        morph.follow_model_device()
        self.add_callback(MorphogenesisCallback(morph, evaluate))

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        if not model.training:  # evaluation and prediction: the plain loss
            return out
        if return_outputs:
            loss, outputs = out
            return self.morph.loss(loss), outputs
        return self.morph.loss(out)

    def create_optimizer(self, *args: Any, **kwargs: Any):
        optimizer = super().create_optimizer(*args, **kwargs)
        self.morph.exclude_banks(optimizer)
        return optimizer

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, ENGINE_FILE) if checkpoint else None
        if path is not None and os.path.isfile(path):
            self.morph.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
