"""pydl: fast fused deep-learning operators (CUDA C++, Triton, C++) as PyTorch custom ops.

    import pydl
    y = pydl.ops.layer_norm_gelu(x, weight, bias)      # functional ops
    ln = pydl.nn.LayerNorm(768)                        # drop-in modules
    pydl.info()                                        # what was built, which backends run
    pydl.models.create("convnext_tiny")                # models, generation, train: imported on first use
    report = pydl.patch(model, verify=x)               # pydl's ops swapped into an existing model
    pydl.unpatch(model)
"""

import importlib

from . import nn, ops
from ._version import __version__
from .backends import BackendError
from .patch import PatchReport, patch, unpatch


def info() -> dict:
    """Build and runtime facts: native core, CUDA, Triton (see ``python -m pydl info``)."""
    from .__main__ import collect_info

    return collect_info()


_LAZY = ("generation", "models", "train")


def __getattr__(name: str):
    """pydl.models / pydl.generation / pydl.train, imported on first access (import pydl stays cheap)."""
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'pydl' has no attribute {name!r}")


__all__ = ["BackendError", "PatchReport", "generation", "info", "models", "nn", "ops", "patch", "train", "unpatch",
           "__version__"]
