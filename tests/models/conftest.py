"""tests/models: timm made importable next to the CPU torch before anything imports it.

The registry's torchvision wheel (which timm imports) is built for the CUDA torch; against the
CPU torch its native library does not load and its import dies on the undefined
``torchvision::nms`` / ``torchvision::qnms`` schemas. ``pydl.models._timm.import_timm`` defines
them first (only when the library does not load). Tests that need timm take the ``timm``
fixture and are skipped, with the reason, when timm is not installed.
"""

from __future__ import annotations

import pytest
import torch

from pydl.models._timm import import_timm

try:
    TIMM = import_timm()
    TIMM_ERROR = None
except ImportError as exc:  # timm not installed: the timm tests skip
    TIMM, TIMM_ERROR = None, exc


@pytest.fixture(scope="session")
def timm():
    if TIMM is None:
        pytest.skip(f"timm is not importable: {TIMM_ERROR}")
    return TIMM


@pytest.fixture(scope="package", autouse=True)
def _one_thread():
    """These tests run small inputs through big models: one intra-op thread is as fast and, on a
    shared 2-core machine, avoids OpenMP barriers stalling behind other processes (5-10× slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
