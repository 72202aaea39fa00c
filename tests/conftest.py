"""Shared pytest setup.

TRITON_INTERPRET=1 must be set before anything imports triton (``@triton.jit`` reads it when a kernel is
defined), so it is set here, at conftest import time, unless the caller chose a value. On a GPU machine run
``TRITON_INTERPRET=0 python -m pytest -m gpu`` to compile the real kernels.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Without CUDA, ``gpu`` tests are skipped, except those also marked ``interpret``: they run their kernels in
    Triton's interpreter on the CPU (and ``-m gpu`` selects them on a GPU machine)."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not ("interpret" in item.keywords and os.environ["TRITON_INTERPRET"] == "1"):
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> torch.device:
    """CUDA when there is a GPU, CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
