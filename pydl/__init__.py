"""pydl: fast fused deep-learning operators (CUDA C++, Triton, C++) as PyTorch custom ops.

    import pydl
    y = pydl.ops.layer_norm_gelu(x, weight, bias)      # functional ops
    ln = pydl.nn.LayerNorm(768)                        # drop-in modules
    pydl.info()                                        # what was built, which backends run
"""

from . import nn, ops
from ._version import __version__
from .backends import BackendError


def info() -> dict:
    """Build and runtime facts: native core, CUDA, Triton (see ``python -m pydl info``)."""
    from .__main__ import collect_info

    return collect_info()


__all__ = ["BackendError", "info", "nn", "ops", "__version__"]
