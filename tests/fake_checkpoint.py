"""A checkpoint directory committed the way checkpoint.save() commits one, from given file contents (no DCP)."""

from __future__ import annotations

import os

from morpho_dist import checkpoint


def fake_checkpoint(root, step: int, files: dict[str, bytes], keep: int = 0, config: dict | None = None) -> str:
    """A checkpoint directory committed the way save() commits one: files in <path>.tmp, then _commit."""
    path = checkpoint.checkpoint_path(str(root), step)
    tmp = path + checkpoint.TMP_SUFFIX
    os.makedirs(tmp)
    for name, data in files.items():
        with open(os.path.join(tmp, name), "wb") as fh:
            fh.write(data)
    checkpoint._commit(tmp, path, step, keep, config)
    return path
