"""Capability-based backend choice shared by every operator.

Each op declares, per backend, a function ``reasons(...) -> list[str]`` that explains why the
backend cannot run a call (empty list: it can). :func:`choose` takes the first backend of the
op's priority list with no reasons. ``backend="..."`` on a public op, or the environment
variable ``PYDL_BACKEND``, forces a backend; forcing one that cannot run the call raises
:class:`BackendError` listing the reasons.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable, Mapping, Sequence

import torch

from . import _native

BACKENDS = ("native", "triton", "torch")
ENV_VAR = "PYDL_BACKEND"

ReasonsFn = Callable[..., list]


class BackendError(RuntimeError):
    """A forced backend cannot run the requested call (the message lists why)."""


def choose(op: str, candidates: Mapping[str, ReasonsFn], priority: Sequence[str], forced: str | None,
           *args) -> str:
    """Name of the backend that runs ``op(*args)``.

    candidates: backend name -> reasons function, called with ``*args``.
    priority:   order tried when nothing is forced (normally per device, from benchmarks).
    forced:     the op's ``backend=`` argument; falls back to ``$PYDL_BACKEND``.
    """
    forced = forced if forced is not None else (os.environ.get(ENV_VAR) or None)
    if forced is not None:
        if forced not in BACKENDS:
            raise ValueError(f"{op}: unknown backend {forced!r}; expected one of {', '.join(BACKENDS)}")
        if forced not in candidates:
            raise BackendError(f"{op}: backend {forced!r} does not implement this op")
        reasons = candidates[forced](*args)
        if reasons:
            raise BackendError(f"{op}: backend {forced!r} cannot run this call: " + "; ".join(reasons))
        return forced
    tried = []
    for name in priority:
        reasons = candidates[name](*args)
        if not reasons:
            return name
        tried.append(f"{name}: {'; '.join(reasons)}")
    raise BackendError(f"{op}: no backend can run this call ({' | '.join(tried)})")


# ---- reusable capability checks ----------------------------------------------------------------

def native_reasons(tensors: Sequence[torch.Tensor], cpu_dtypes: Sequence[torch.dtype],
                   cuda_dtypes: Sequence[torch.dtype]) -> list:
    """Why the native core cannot take these tensors (device/dtype/build); [] if it can."""
    err = _native.load_error()
    if err is not None:
        return [err]
    reasons = []
    device = tensors[0].device
    dtype = tensors[0].dtype
    if device.type == "cpu":
        if dtype not in cpu_dtypes:
            reasons.append(f"the CPU kernel supports {_names(cpu_dtypes)}, got {_name(dtype)}")
    elif device.type == "cuda":
        if not _native.cuda_built():
            reasons.append("pydl._C was built without CUDA (no nvcc at build time)")
        elif dtype not in cuda_dtypes:
            reasons.append(f"the CUDA kernel supports {_names(cuda_dtypes)}, got {_name(dtype)}")
    else:
        reasons.append(f"no native kernel for device type {device.type!r}")
    return reasons


_TRITON_IMPORTABLE: bool | None = None  # a global, not lru_cache: Dynamo traces this


def triton_importable() -> bool:
    global _TRITON_IMPORTABLE
    if _TRITON_IMPORTABLE is None:
        _TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None
    return _TRITON_IMPORTABLE


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_reasons(tensors: Sequence[torch.Tensor], dtypes: Sequence[torch.dtype]) -> list:
    """Why the Triton kernels cannot take these tensors; [] if they can.

    On CUDA tensors Triton compiles for the GPU; CPU tensors run only under the Triton
    interpreter (``TRITON_INTERPRET=1`` set before triton is imported; used by the tests).
    """
    if not triton_importable():
        return ["triton is not installed (pip install triton)"]
    reasons = []
    device = tensors[0].device
    if device.type == "cpu" and not triton_interpreter_enabled():
        reasons.append("CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1)")
    elif device.type not in ("cpu", "cuda"):
        reasons.append(f"no Triton kernel for device type {device.type!r}")
    if tensors[0].dtype not in dtypes:
        reasons.append(f"the Triton kernel supports {_names(dtypes)}, got {_name(tensors[0].dtype)}")
    return reasons


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(_name(d) for d in dtypes)
