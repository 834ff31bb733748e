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
from ._params import params


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` computed by pydl's fused kernels.

    Input (..., *normalized_shape) -> output of the same shape. Under autocast the output dtype
    is torch's: float32 inside a CUDA autocast region (layer_norm is on CUDA autocast's float32
    list), the input's dtype under CPU autocast (which leaves layer_norm alone). float32
    parameters with a float16/bfloat16 input (mixed precision) run in the fused kernels, output
    in the input's dtype.
    """

    _activation: Optional[str] = None

    def forward(self, x: Tensor) -> Tensor:
        shape = self.normalized_shape
        if x.shape[-len(shape):] != shape:  # also when x has fewer dims than normalized_shape
            raise ValueError(
                f"{type(self).__name__}: input of shape {tuple(x.shape)} does not end with "
                f"normalized_shape {tuple(shape)}")
        weight, bias = params(self, "weight", "bias")
        if len(shape) == 1:
            return self._normalize(x, weight, bias)
        flat = lambda t: None if t is None else t.reshape(-1)  # noqa: E731
        y = self._normalize(x.flatten(x.dim() - len(shape)), flat(weight), flat(bias))
        return y.view(x.shape)

    def _normalize(self, rows: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
        if self._activation is None:
            return layer_norm(rows, weight, bias, self.eps)
        return layer_norm_gelu(rows, weight, bias, self.eps, approximate=self._activation)


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


class LayerNorm2d(LayerNorm):
    """timm's ``LayerNorm2d``: LayerNorm over the channels C of an (N, C, H, W) tensor.

    Same constructor (``num_channels, eps=1e-6, affine=True``, plus ``nn.LayerNorm``'s keyword
    arguments such as ``device``/``dtype``), parameters and state_dict keys as
    ``timm.layers.LayerNorm2d``, so a timm checkpoint loads unchanged (ConvNeXt's stem and
    downsampling layers use it). The output has timm's layout: channels_last strides.

    Zero-copy for a channels_last input (its NHWC view is contiguous rows of C); an NCHW input
    is transposed once into rows by the kernel's input path.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True, **kwargs):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        c = self.normalized_shape[0]
        if x.dim() != 4 or x.shape[1] != c:
            raise ValueError(f"LayerNorm2d: expected an (N, {c}, H, W) input, got shape {tuple(x.shape)}")
        return self._normalize(x.permute(0, 2, 3, 1), *params(self, "weight", "bias")).permute(0, 3, 1, 2)
