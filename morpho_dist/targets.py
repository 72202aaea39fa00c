"""``_target_`` nodes of the ``model``, ``data`` and ``task`` groups, built with ``hydra.utils.instantiate``.

The built-in options name their class or function the same way a user does (``conf/model/gpt.yaml`` has
``_target_: morpho_dist.models.GPT``), so ``model._target_=mypkg.MyNet +model.width=512`` swaps the class and
keeps the rest of the run. Rules:

- keys ``name`` and ``seed_targets`` are labels for the run, never arguments;
- a key of the composed option that the chosen callable does not take is dropped when it belongs to the option's
  schema (``model._target_=mypkg.MyNet`` on top of the default ``model=mlp`` leaves the mlp's ``embed`` out), and
  is an error naming the key otherwise (a ``+model.<key>`` the class does not accept);
- ``provided`` values (what the data says about itself: ``input_shape``, ``num_classes``, ``vocab_size``,
  ``seq_len``, the run ``seed``) are passed when the callable's signature names them and the config does not set
  them.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from omegaconf import DictConfig, OmegaConf

from morpho_dist.errors import ConfigError

RESERVED = ("_target_", "name", "seed_targets")


def locate_target(cfg: Any, group: str) -> Any:
    """The callable named by ``cfg._target_`` (ConfigError naming ``<group>._target_`` if it cannot be imported)."""
    from hydra.utils import get_object

    path = cfg.get("_target_")
    if not path:
        raise ConfigError(f"{group}._target_ is not set")
    try:
        return get_object(str(path))
    except Exception as err:  # ImportError, AttributeError, hydra's wrappers of them
        reason = " ".join(str(err).split())
        raise ConfigError(f"{group}._target_={path!r} cannot be imported ({reason})") from None


def _schema_keys(cfg: Any) -> set[str]:
    schema = OmegaConf.get_type(cfg) if isinstance(cfg, DictConfig) else None
    return {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else set()


def call_arguments(cfg: Any, group: str, target: Any, provided: dict | None = None) -> dict:
    """The keyword arguments ``target`` gets from ``cfg`` and ``provided`` (the rules of the module doc)."""
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):  # a builtin without a signature: pass the config as is
        params = {}
    takes_any = not params or any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = {n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    schema = _schema_keys(cfg)
    values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key in RESERVED:
            continue
        if takes_any or key in named:
            kwargs[key] = value
        elif key not in schema:
            name = getattr(target, "__qualname__", str(target))
            raise ConfigError(f"{group}.{key}: {name} takes no argument {key!r}; its arguments: {sorted(named)}")
    for key, value in (provided or {}).items():
        if key not in kwargs and key in named:
            kwargs[key] = value
    return kwargs


def instantiate_target(cfg: Any, group: str, provided: dict | None = None) -> Any:
    """``hydra.utils.instantiate`` of ``cfg`` with the arguments of ``call_arguments`` (nested ``_target_`` values
    are built too). A ConfigError raised inside the callable comes out as itself; other failures become one
    ConfigError naming ``<group>._target_``."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    target = locate_target(cfg, group)
    kwargs = call_arguments(cfg, group, target, provided)
    node = OmegaConf.create({"_target_": str(cfg._target_), **kwargs})
    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as err:
        cause = err.__cause__
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        reason = " ".join(str(cause if cause is not None else err).split())
        raise ConfigError(f"{group}._target_={cfg._target_!r}: {reason}") from None
