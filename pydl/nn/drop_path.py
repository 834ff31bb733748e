"""Stochastic depth ("drop path"): drop a residual branch for whole samples at random.

``drop_path(x, p, training)`` zeroes the branch output ``x`` of each sample (dim 0) with
probability ``p`` and scales the survivors by ``1 / (1 - p)`` so the expectation is unchanged
(Huang et al., 2016, "Deep Networks with Stochastic Depth"; the per-sample form timm uses).
Identity in eval mode or at ``p == 0``. The module ``DropPath`` has no parameters and no state.
"""

from __future__ import annotations

import torch
from torch import Tensor


def drop_path(x: Tensor, p: float = 0.0, training: bool = False, scale_by_keep: bool = True) -> Tensor:
    """x (N, ...) -> x with whole samples zeroed with probability p (kept ones scaled by 1/(1-p))."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"drop_path: p must be in [0, 1), got {p!r}")
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)  # (N, 1, ..., 1)
    if scale_by_keep:
        mask.div_(keep)
    return x * mask


class DropPath(torch.nn.Module):
    """``drop_path`` as a module (no parameters): ``DropPath(p)``."""

    def __init__(self, p: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"DropPath: p must be in [0, 1), got {p!r}")
        self.p, self.scale_by_keep = float(p), scale_by_keep

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.p, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"
