"""Capability-based backend choice shared by every operator, cached per call class.

Each op declares, per backend, a function ``reasons(key) -> list[str]`` that explains why the
backend cannot run a call of class ``key`` (empty list: it can). The key is a small hashable
tuple the op builds from what decides capability — ``(device type, dtype, ...)`` — so the
choice is made once per class and then read from a dict: :class:`Dispatcher`.

``backend="..."`` on a public op forces a backend for that call; the environment variable
``PYDL_BACKEND`` forces one for the process. It is read once, at import (per-call environment
reads cost microseconds); :func:`reload_env` re-reads it. Forcing a backend that cannot run the
call raises :class:`BackendError` listing the reasons; an unknown name raises ``ValueError``
naming where it came from.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable, Hashable, Mapping, Optional, Sequence

import torch

from . import _native

BACKENDS = ("native", "triton", "torch")
ENV_VAR = "PYDL_BACKEND"

ReasonsFn = Callable[[tuple], list]


class BackendError(RuntimeError):
    """A forced backend cannot run the requested call (the message lists why)."""


# ---- the process-wide forced backend ($PYDL_BACKEND) ------------------------------------------

_ENV_FORCED: Optional[str] = None


def reload_env() -> None:
    """Re-read ``$PYDL_BACKEND`` (read once at import) and drop every cached choice."""
    global _ENV_FORCED
    _ENV_FORCED = os.environ.get(ENV_VAR) or None
    for d in Dispatcher.instances:
        d.cache.clear()


def env_backend() -> Optional[str]:
    """The backend ``$PYDL_BACKEND`` forces (as read at import / :func:`reload_env`), or None."""
    return _ENV_FORCED


def env_problem() -> Optional[str]:
    """Why ``$PYDL_BACKEND`` is unusable (an unknown name), or None."""
    if _ENV_FORCED is None or _ENV_FORCED in BACKENDS:
        return None
    return (f"environment variable {ENV_VAR}={_ENV_FORCED!r} is not a backend; expected one of "
            f"{', '.join(BACKENDS)} (or unset it)")


class Dispatcher:
    """Backend choice for one op, cached per ``(key, forced)``.

    candidates: backend name -> reasons function, called with the key.
    priority:   device type -> backend names in the order tried when nothing is forced
                (set from benchmarks; see docs/architecture.md).
    """

    instances: list = []  # every dispatcher, so reload_env() can clear their caches

    def __init__(self, op: str, candidates: Mapping[str, ReasonsFn],
                 priority: Mapping[str, Sequence[str]]):
        self.op = op
        self.candidates = dict(candidates)
        self.priority = {k: tuple(v) for k, v in priority.items()}
        self.cache: dict = {}
        Dispatcher.instances.append(self)

    def choose(self, key: tuple, forced: Optional[str] = None) -> str:
        """Name of the backend for a call of class ``key`` (``key[0]`` is the device type)."""
        forced = forced if forced is not None else _ENV_FORCED
        hit = self.cache.get((key, forced))
        if hit is None:
            hit = self.cache[(key, forced)] = self._decide(key, forced)
        if isinstance(hit, Exception):
            raise type(hit)(*hit.args)  # a fresh exception each call, no shared traceback
        return hit

    def reasons(self, backend: str, key: tuple) -> list:
        """Why ``backend`` cannot run a call of class ``key`` ([] if it can)."""
        return list(self.candidates[backend](key))

    def _decide(self, key: Hashable, forced: Optional[str]):
        if forced is not None:
            if forced not in BACKENDS:
                origin = "backend=" if forced != _ENV_FORCED else f"environment variable {ENV_VAR}="
                return ValueError(f"{self.op}: unknown backend {origin}{forced!r}; expected one of "
                                  f"{', '.join(BACKENDS)}")
            if forced not in self.candidates:
                return BackendError(f"{self.op}: backend {forced!r} does not implement this op")
            reasons = self.candidates[forced](key)
            if reasons:
                return BackendError(f"{self.op}: backend {forced!r} cannot run this call: "
                                    + "; ".join(reasons))
            return forced
        tried = []
        for name in self.priority.get(key[0], ("torch",)):
            reasons = self.candidates[name](key)
            if not reasons:
                return name
            tried.append(f"{name}: {'; '.join(reasons)}")
        return BackendError(f"{self.op}: no backend can run this call ({' | '.join(tried)})")


# ---- reusable capability checks (all take what a key holds: device type, dtype) ----------------

def native_reasons(device_type: str, dtype: torch.dtype, cpu_dtypes: Sequence[torch.dtype],
                   cuda_dtypes: Sequence[torch.dtype]) -> list:
    """Why the native core cannot take tensors of this device type and dtype; [] if it can."""
    err = _native.load_error()
    if err is not None:
        return [err]
    if device_type == "cpu":
        if dtype not in cpu_dtypes:
            return [f"the CPU kernel supports {_names(cpu_dtypes)}, got {_name(dtype)}"]
        return []
    if device_type == "cuda":
        if not _native.cuda_built():
            return ["pydl._C was built without CUDA (no nvcc at build time)"]
        if dtype not in cuda_dtypes:
            return [f"the CUDA kernel supports {_names(cuda_dtypes)}, got {_name(dtype)}"]
        return []
    return [f"no native kernel for device type {device_type!r}"]


_TRITON_STATE: Optional[tuple] = None  # (importable, interpreter on): fixed once triton is imported


def _triton_state() -> tuple:
    global _TRITON_STATE
    if _TRITON_STATE is None:
        _TRITON_STATE = (importlib.util.find_spec("triton") is not None,
                         os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))
    return _TRITON_STATE


def triton_importable() -> bool:
    return _triton_state()[0]


def triton_interpreter_enabled() -> bool:
    """TRITON_INTERPRET as seen at pydl's first Triton check (Triton reads it once, too)."""
    return _triton_state()[1]


def triton_reasons(device_type: str, dtype: torch.dtype, dtypes: Sequence[torch.dtype]) -> list:
    """Why the Triton kernels cannot take tensors of this device type and dtype; [] if they can.

    On CUDA tensors Triton compiles for the GPU; CPU tensors run only under the Triton
    interpreter (``TRITON_INTERPRET=1`` set before triton is imported; used by the tests).
    """
    if not triton_importable():
        return ["triton is not installed (pip install triton)"]
    reasons = []
    if device_type == "cpu" and not triton_interpreter_enabled():
        reasons.append("CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1)")
    elif device_type not in ("cpu", "cuda"):
        reasons.append(f"no Triton kernel for device type {device_type!r}")
    if dtype not in dtypes:
        reasons.append(f"the Triton kernel supports {_names(dtypes)}, got {_name(dtype)}")
    return reasons


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(_name(d) for d in dtypes)


reload_env()
