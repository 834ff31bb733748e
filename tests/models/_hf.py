"""Importing transformers in the tests: offline (nothing downloaded), torchvision made importable.

transformers imports torchvision when it is installed; the registry's torchvision wheel does not
load against the CPU torch unless its two schemas are defined first (pydl.models._timm does that,
for timm, the same way).
"""

from __future__ import annotations

import os
import sys

import pytest

from pydl.models._timm import _prepare_torchvision


def import_transformers():
    """transformers, offline (HF_HUB_OFFLINE=1), or skip the test module."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if "torchvision" not in sys.modules:
        _prepare_torchvision()
    tf = pytest.importorskip("transformers")
    tf.logging.set_verbosity_error()
    return tf
