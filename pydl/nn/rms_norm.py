"""Drop-in RMSNorm module backed by pydl.ops.rms_norm.

``RMSNorm`` subclasses ``torch.nn.RMSNorm``: same constructor arguments
(``normalized_shape, eps=None, elementwise_affine=True, device, dtype``), parameter, state_dict
key and ``extra_repr``, so it loads a torch checkpoint unchanged. A multi-dim
``normalized_shape`` is flattened into the one dim the kernels normalize.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.rms_norm import rms_norm
from ._params import params


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` computed by pydl's kernels.

    Input (..., *normalized_shape) -> output of the same shape; eps None means torch's default
    (float32's epsilon; float64's for float64 input). Autocast dtypes are torch's (float32 inside a CUDA
    autocast region, the input's dtype under CPU autocast).
    """

    def forward(self, x: Tensor) -> Tensor:
        shape = self.normalized_shape
        if x.shape[-len(shape):] != shape:  # also when x has fewer dims than normalized_shape
            raise ValueError(f"RMSNorm: input of shape {tuple(x.shape)} does not end with "
                             f"normalized_shape {tuple(shape)}")
        (weight,) = params(self, "weight")
        if len(shape) == 1:
            return rms_norm(x, weight, self.eps)
        weight = None if weight is None else weight.reshape(-1)
        return rms_norm(x.flatten(x.dim() - len(shape)), weight, self.eps).view(x.shape)
