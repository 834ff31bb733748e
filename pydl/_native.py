"""Loads the compiled core ``pydl._C`` and adapts torch tensors to its torch-free interface.

The native core never sees a torch tensor: the ops pass data pointers, dtype codes (below) and
strides, from which the bindings build their ``TensorView`` objects. Loading is lazy (first
use), cached, and refuses a build whose version differs from the Python package's, with the
command that rebuilds it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

import torch

from ._version import __version__

REBUILD_HINT = "rebuild it from the source tree with `pip install .` (or `python setup.py build_ext --inplace`)"

# dtype codes of csrc/include/pydl/dtype.h; never renumber.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
# index dtypes (e.g. decode attention's cache_seqlens)
INDEX_DTYPE_CODES = {torch.int32: 4, torch.int64: 5}


class NativeUnavailableError(RuntimeError):
    """pydl._C is missing, stale, or lacks the requested device support."""


def _import_core() -> ModuleType:
    """``pydl._C``, or the build named by $PYDL_NATIVE_LIB (e.g. the sanitizer build in CI)."""
    path = os.environ.get("PYDL_NATIVE_LIB")
    if not path:
        from . import _C  # type: ignore[attr-defined]

        return _C
    spec = importlib.util.spec_from_file_location("pydl._C", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"PYDL_NATIVE_LIB={path} is not a loadable extension")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules["pydl._C"] = mod
    return mod


_LOADED: tuple | None = None  # (module or None, error or None), set on first use


def _load() -> tuple[ModuleType | None, str | None]:
    # A plain global rather than functools.lru_cache: torch.compile traces backend choice, and
    # Dynamo reads a global without the warning it gives for lru_cache-wrapped functions.
    global _LOADED
    if _LOADED is None:
        _LOADED = _try_load()
    return _LOADED


def _try_load() -> tuple[ModuleType | None, str | None]:
    try:
        _C = _import_core()
    except ImportError as exc:
        return None, f"pydl._C could not be imported ({exc}); {REBUILD_HINT}"
    built = getattr(_C, "__version__", "?")
    if built != __version__:
        return None, f"pydl._C is a stale build (version {built}, package {__version__}); {REBUILD_HINT}"
    return _C, None


def load_error() -> str | None:
    """Why the native core cannot be used, or None when it can."""
    return _load()[1]


def module() -> ModuleType:
    """The loaded ``pydl._C``; raises :class:`NativeUnavailableError` with a rebuild hint."""
    mod, err = _load()
    if mod is None:
        raise NativeUnavailableError(err)
    return mod


def cuda_built() -> bool:
    mod, _ = _load()
    return bool(mod is not None and mod.cuda_built)


# torch's raw-stream query is a plain C function on CUDA builds of torch: ~0.1 us, against
# several for torch.cuda.current_stream(device).cuda_stream.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def cuda_stream(t: torch.Tensor) -> int:
    """The current CUDA stream of ``t``'s device as an integer handle for the launchers."""
    if _raw_stream is not None:
        return _raw_stream(t.get_device())
    return torch.cuda.current_stream(t.device).cuda_stream


class _NoGuard:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NO_GUARD = _NoGuard()


def cuda_device(t: torch.Tensor):
    """A context that makes ``t``'s device current for a launch: nothing to do (and nothing
    paid) when it already is, else ``torch.cuda.device``."""
    index = t.get_device()
    return _NO_GUARD if torch.cuda.current_device() == index else torch.cuda.device(index)


def num_threads() -> int:
    """CPU kernels use torch's intra-op thread count, so pydl never oversubscribes next to torch."""
    return torch.get_num_threads()


def info() -> dict:
    """What was built: version, CUDA support and architectures, or why the core is unusable."""
    mod, err = _load()
    if mod is None:
        return {"version": __version__, "native": False, "error": err, "cuda_built": False, "cuda_archs": ""}
    return {
        "version": mod.__version__,
        "native": True,
        "error": None,
        "cuda_built": bool(mod.cuda_built),
        "cuda_archs": mod.cuda_archs,
        "path": mod.__file__,
    }
