"""RMSNorm family: ``rms_norm`` and ``add_rms_norm``, with PyTorch's semantics:

    rms_norm(x, w, eps)         == F.rms_norm(x, (N,), w, eps)
    add_rms_norm(x, r, w, eps)  == (F.rms_norm(x + r, (N,), w, eps), x + r)

y = x / sqrt(mean(x^2) + eps) * w over the last dim (any size N, any leading shape). eps=None
is what torch computes with: the epsilon of the accumulation type, ``torch.finfo(torch.float32)``
for float16/bfloat16/float32 and float64's for float64 (torch's docs say x's dtype; its kernels,
and so pydl, use the accumulation type's). The family runs on the LayerNorm family's
kernels, custom ops, autograd and dispatch (pydl/ops/layer_norm.py) with the RMS
normalization code: one implementation of both norms on every backend.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .layer_norm import ACT_NONE, NORM_RMS, _forward


def _eps(x, eps: Optional[float]) -> float:
    if eps is not None:
        return eps
    if not isinstance(x, Tensor) or not x.is_floating_point():
        return 0.0  # _forward reports the bad x
    return _EPS64 if x.dtype == torch.float64 else _EPS32


_EPS32, _EPS64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps


def rms_norm(x: Tensor, weight: Optional[Tensor] = None, eps: Optional[float] = None, *,
             backend: Optional[str] = None) -> Tensor:
    """RMSNorm over the last dim.

    x: (..., N) floating tensor; weight: (N,) on x's device, of x's dtype or (mixed precision,
    float16/bfloat16 x) float32, or None; eps: None means torch's default (float32's epsilon;
    float64's for float64 x). Returns y of x's shape and dtype. ``backend`` forces "native",
    "triton" or "torch".
    """
    return _forward("rms_norm", x, None, weight, None, _eps(x, eps), ACT_NONE, backend, NORM_RMS)[0]


def add_rms_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor] = None,
                 eps: Optional[float] = None, *, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """The pre-norm residual stream step of LLaMA-style models: h = x + residual;
    y = RMSNorm(h). x, residual: (..., N); weight: (N,) or None (dtypes as in rms_norm). Returns
    (y, h) of x's shape and of the dtype of x + residual (type promotion, as torch; h is rounded to
    it before it is normalized, like the unfused torch code)."""
    if not isinstance(residual, Tensor):
        raise TypeError(f"add_rms_norm: residual must be a Tensor, got {type(residual).__name__}")
    return _forward("add_rms_norm", x, residual, weight, None, _eps(x, eps), ACT_NONE, backend, NORM_RMS)


def rms_norm_ref(x: Tensor, weight: Optional[Tensor] = None, eps: Optional[float] = None) -> Tensor:
    """float64 reference of rms_norm (eps None: the op's default for x's dtype)."""
    return F.rms_norm(x.double(), (x.shape[-1],), None if weight is None else weight.double(), _eps(x, eps))


def add_rms_norm_ref(x: Tensor, residual: Tensor, weight: Optional[Tensor] = None,
                     eps: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """float64 reference of add_rms_norm: (y, h) with h = x + residual."""
    h = x.double() + residual.double()
    return F.rms_norm(h, (h.shape[-1],), None if weight is None else weight.double(), _eps(x, eps)), h
