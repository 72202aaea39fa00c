"""Tasks: what the loss is and what validation reports (the Hydra ``task`` group).

- ``classification``: cross-entropy of ``[B, K]`` logits against ``[B]`` labels; validation loss and accuracy.
- ``causal_lm``: next-token cross-entropy of ``[B, T, V]`` logits against the ``[B, T]`` next tokens (the data
  yields inputs and targets already shifted by one); validation loss in nats per token and bits per byte
  (``loss / ln 2 / bytes_per_token``).
- a user loss: ``task._target_=mypkg.losses.focal`` names a function ``loss(output, target) -> scalar`` (extra
  ``+task.<key>=`` values are bound as keyword arguments), a class whose instances are such callables
  (``torch.nn.CrossEntropyLoss``), or a ``Task`` subclass. Validation reports the mean loss over the validation
  batches, weighted by their rows.

Model outputs that are not tensors (``transformers``' ``CausalLMOutput`` objects, tuples) give their
``logits`` attribute, or their first element.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F

from morpho_dist.errors import ConfigError
from morpho_dist.targets import RESERVED, locate_target


def logits_of(output: Any) -> torch.Tensor:
    """The logits tensor of a model output (a tensor, an object with ``.logits``, or a tuple)."""
    if torch.is_tensor(output):
        return output
    logits = getattr(output, "logits", None)
    if logits is not None:
        return logits
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


class Task:
    """A loss over (model output, target) and the validation metrics over batches of (input, target)."""

    name = "task"
    data_kind: str | None = None  # the DataSpec.kind it needs ("labelled", "tokens"); None: any

    def loss(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict:
        """Validation metrics (keys without the ``val/`` prefix; always ``loss``), in eval mode."""
        was_training = model.training
        model.eval()
        try:
            return self._evaluate(model, batches)
        finally:
            model.train(was_training)

    def _evaluate(self, model, batches) -> dict:
        total, rows = 0.0, 0
        for x, y in batches:
            total += float(self.loss(model(x), y)) * len(y)
            rows += len(y)
        return {"loss": total / max(rows, 1)}

    def train_metrics(self, output: Any, target: torch.Tensor) -> dict:
        """Extra metrics of a training batch (cheap, device-side until logged)."""
        return {}


class ClassificationTask(Task):
    name = "classification"
    data_kind = "labelled"

    def loss(self, output, target):
        return F.cross_entropy(logits_of(output), target)

    def _evaluate(self, model, batches):
        loss, correct, rows = 0.0, 0, 0
        for x, y in batches:
            logits = logits_of(model(x))
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
            rows += len(y)
        return {"loss": loss / max(rows, 1), "acc": correct / max(rows, 1)}

    def train_metrics(self, output, target):
        return {"acc": float((logits_of(output).argmax(-1) == target).float().mean())}


class CausalLMTask(Task):
    """Next-token prediction; ``bytes_per_token`` turns nats per token into bits per byte (1 for byte tokens)."""

    name = "causal_lm"
    data_kind = "tokens"

    def __init__(self, bytes_per_token: float = 1.0) -> None:
        if not bytes_per_token > 0:
            raise ConfigError(f"task.bytes_per_token={bytes_per_token} must be > 0")
        self.bytes_per_token = float(bytes_per_token)

    def loss(self, output, target):
        logits = logits_of(output)
        if logits.dim() != 3 or logits.shape[:2] != target.shape:
            raise ValueError(
                f"task=causal_lm needs [B, T, V] logits for [B, T] targets; got {list(logits.shape)} and "
                f"{list(target.shape)}"
            )
        return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())

    def bits_per_byte(self, nats_per_token: float) -> float:
        return nats_per_token / math.log(2) / self.bytes_per_token

    def _evaluate(self, model, batches):
        total, tokens = 0.0, 0
        for x, y in batches:
            logits = logits_of(model(x))
            total += float(F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum"))
            tokens += y.numel()
        loss = total / max(tokens, 1)
        return {"loss": loss, "bpb": self.bits_per_byte(loss)}


class LossTask(Task):
    """A user's loss function ``fn(output, target) -> scalar``."""

    name = "loss"

    def __init__(self, fn: Callable[[Any, torch.Tensor], torch.Tensor]) -> None:
        self.fn = fn
        self.name = getattr(fn, "__name__", type(fn).__name__)

    def loss(self, output, target):
        return self.fn(output, target)


def build_task(task_cfg: Any) -> Task:
    """The task of a ``task`` config node (its ``_target_``), or ``classification`` when there is none."""
    if task_cfg is None or not task_cfg.get("_target_"):
        return ClassificationTask()
    target = locate_target(task_cfg, "task")
    extra = {k: v for k, v in task_cfg.items() if k not in RESERVED}
    if inspect.isfunction(target) or inspect.isbuiltin(target):
        return LossTask(functools.partial(target, **extra) if extra else target)
    from morpho_dist.targets import instantiate_target

    obj = instantiate_target(task_cfg, "task")
    if isinstance(obj, Task):
        return obj
    if callable(obj):
        return LossTask(obj)
    raise ConfigError(
        f"task._target_={task_cfg._target_!r} built a {type(obj).__name__}, which is neither a Task nor a "
        "callable loss(output, target)"
    )
