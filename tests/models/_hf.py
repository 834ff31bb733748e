"""Importing transformers in the tests: offline (nothing downloaded), torchvision made importable.

transformers imports torchvision when it is installed; the registry's torchvision wheel does not
load against the CPU torch unless its two schemas are defined first (pydl.models._timm does that,
for timm, the same way).
"""

from __future__ import annotations

import os

import pytest

from pydl.models._timm import import_transformers as _import


def import_transformers():
    """transformers, offline (HF_HUB_OFFLINE=1), or skip the test module."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        tf = _import()
    except ImportError as exc:
        pytest.skip(str(exc))
    tf.logging.set_verbosity_error()
    return tf
