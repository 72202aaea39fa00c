"""``python -m morpho_dist.train --help``: the user's groups and their options, and every key with its current
value and a one-line description.

The descriptions are the schema dataclasses' own: a field's trailing ``# comment`` in its class body, else the
first line of the class docstring for the group. The config is composed with the overrides given beside
``--help``, so ``model=gpt --help`` lists gpt's keys.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import os
import tokenize
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

USAGE = """\
morpho_dist: grow a network while it trains. README.md explains the run; docs/design.md the semantics.

  python -m morpho_dist.train [group=option ...] [key=value ...]
  python -m morpho_dist.torchrun --nproc_per_node=N [group=option ...] [key=value ...]
  python -m morpho_dist.train -m key=a,b [...]      a sweep: one run per combination, under multirun/
  python -m morpho_dist.train --cfg job [...]       print the composed config and exit
"""


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the ``# comment`` that ends its line in the class body ('' when it has none)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    line_field: dict[int, str] = {}
    for lineno, line in enumerate(source.splitlines(), 1):
        head = line.strip().split(":", 1)[0]
        if head in names and line.startswith("    ") and not line.startswith("     "):
            line_field[lineno] = head
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and tok.start[0] in line_field:
            out[line_field[tok.start[0]]] = tok.string.lstrip("# ").strip()
    return out


def _doc(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    if not doc or doc.startswith(cls.__name__ + "("):  # dataclass' generated signature, not a description
        return ""
    return doc.split("\n\n")[0].replace("\n", " ").split(". ")[0].rstrip(".") + "."


def _show(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value)


def key_lines(cfg: DictConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, value, description) of every leaf of ``cfg`` that a schema declares, in schema order."""
    rows: list[tuple[str, str, str]] = []
    schema = OmegaConf.get_type(cfg)
    comments = field_comments(schema) if dataclasses.is_dataclass(schema) else {}
    for key in cfg:
        node = cfg._get_node(key)
        name = f"{prefix}{key}"
        if isinstance(node, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(node)):
            rows.append((f"[{name}]", "", _doc(OmegaConf.get_type(node))))
            rows.extend(key_lines(node, f"{name}."))
        elif node is not None and not (isinstance(node, DictConfig) and node._is_missing()):
            value = node._value() if node._is_interpolation() else cfg[key] if not node._is_missing() else "???"
            rows.append((name, _show(value), comments.get(str(key), "")))
    return rows


def group_lines(conf_dir: str, groups: tuple[str, ...]) -> list[str]:
    defaults = {}
    for item in OmegaConf.load(os.path.join(conf_dir, "config.yaml")).get("defaults", []):
        if isinstance(item, DictConfig):
            defaults.update({str(k): str(v) for k, v in item.items()})
    out = []
    for group in groups:
        options = sorted(f[:-5] for f in os.listdir(os.path.join(conf_dir, group)) if f.endswith(".yaml"))
        shown = [f"{o}*" if o == defaults.get(group) else o for o in options]
        out.append(f"  {group:<12}{', '.join(shown)}")
    return out


def help_text(cfg: DictConfig, conf_dir: str, groups: tuple[str, ...]) -> str:
    lines = [USAGE, "Groups (group=option; * marks the default):", *group_lines(conf_dir, groups), ""]
    lines.append("Keys (key=value: the value with these overrides, and what it does):")
    for key, value, doc in key_lines(cfg):
        if key.startswith("["):
            lines.append(f"\n  {key} {doc}".rstrip())
            continue
        entry = f"  {key}={value}"
        lines.append(f"{entry:<44} {doc}".rstrip() if doc else entry)
    lines.append("\nHydra's own options: --hydra-help.")
    return "\n".join(lines)
