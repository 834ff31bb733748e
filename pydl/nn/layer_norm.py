"""Drop-in LayerNorm modules backed by pydl.ops.

``LayerNorm`` subclasses ``torch.nn.LayerNorm``: same constructor arguments, parameters,
state_dict keys and ``extra_repr``, so it loads a torch checkpoint unchanged. A multi-dim
``normalized_shape`` is handled by flattening those dims into the one the kernels normalize.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops.layer_norm import layer_norm, layer_norm_gelu


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` computed by pydl's fused kernels.

    Input (..., *normalized_shape) -> output of the same shape. Under autocast the module
    computes in float32, as ``torch.nn.LayerNorm`` does.
    """

    _activation: Optional[str] = None

    def forward(self, x: Tensor) -> Tensor:
        k = len(self.normalized_shape)
        if x.dim() < k or tuple(x.shape[x.dim() - k:]) != tuple(self.normalized_shape):
            raise ValueError(
                f"{type(self).__name__}: input of shape {tuple(x.shape)} does not end with "
                f"normalized_shape {tuple(self.normalized_shape)}")
        weight = self.weight.reshape(-1) if self.weight is not None else None
        bias = self.bias.reshape(-1) if self.bias is not None else None
        if torch.is_autocast_enabled(x.device.type):
            x = x.float()
            weight = weight.float() if weight is not None else None
            bias = bias.float() if bias is not None else None
        rows = x.flatten(x.dim() - k) if k > 1 else x
        if self._activation is None:
            y = layer_norm(rows, weight, bias, self.eps)
        else:
            y = layer_norm_gelu(rows, weight, bias, self.eps, approximate=self._activation)
        return y.view(x.shape) if k > 1 else y


class LayerNormGELU(LayerNorm):
    """GELU(LayerNorm(x)) in one fused kernel; ``approximate`` as in ``torch.nn.GELU``."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, approximate: str = "none", device=None, dtype=None):
        if approximate not in ("none", "tanh"):
            raise ValueError(f"LayerNormGELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)
        self.approximate = approximate
        self._activation = approximate

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, approximate={self.approximate!r}"
