"""README's "Your own training loop": its Python block, run verbatim, grows a seed to FOSSILIZED, and it is a plain
PyTorch loop plus at most three lines (taking those out leaves a loop that runs and trains by itself)."""

from __future__ import annotations

import difflib
import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "README.md")


def section_block(title: str) -> str:
    with open(README) as fh:
        text = fh.read()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    body = text[start : end if end != -1 else len(text)]
    (block,) = re.findall(r"\n```python\n(.*?)\n```", body, flags=re.S)
    return block + "\n"


def plain_loop(block: str) -> str:
    """The block without the plugin: no engine line, ``morph.loss(e)`` -> ``e``, ``morph.step(...)`` ->
    ``opt.step()``."""
    lines = []
    for line in block.splitlines():
        if line.strip() == "import morpho_dist" or "morpho_dist.Morphogenesis(" in line:
            continue
        if "morph.loss(" in line:
            head, _, rest = line.partition("morph.loss(")
            inner, depth = "", 1
            for i, ch in enumerate(rest):
                depth += {"(": 1, ")": -1}.get(ch, 0)
                if depth == 0:
                    inner, rest = rest[:i], rest[i + 1 :]
                    break
            line = head + inner + rest.split("  #")[0].rstrip()
        if "morph.step(" in line:
            line = line[: line.index("morph.step(")] + "opt.step()"
        lines.append(line)
    return "\n".join(lines) + "\n"


def test_block_runs_verbatim_and_grows():
    block = section_block("Your own training loop")
    space: dict = {}
    exec(compile(block, "README.md:Your own training loop", "exec"), space)  # as written
    morph = space["morph"]
    assert morph.summary()["stage_counts"]["FOSSILIZED"] >= 1
    fossil = [e for e in morph.events if e["to"] == "FOSSILIZED"]
    assert all(e["reason"].startswith("val loss improvement") for e in fossil)


def test_block_is_a_plain_loop_plus_three_lines():
    block = section_block("Your own training loop")
    plain = plain_loop(block)
    assert "morph" not in plain
    changed = [
        line
        for line in difflib.unified_diff(plain.splitlines(), block.splitlines(), lineterm="", n=0)
        if line.startswith("+") and not line.startswith("+++") and line.strip() != "+import morpho_dist"
    ]
    assert len(changed) <= 3, changed
    space: dict = {}
    exec(compile(plain, "plain loop", "exec"), space)  # the loop without the plugin trains on its own
    assert space["val_loss"]() < 1.3  # below the chance level of 4 classes (ln 4 = 1.386)
