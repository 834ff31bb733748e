"""``DepthwiseConv2d``: an ``nn.Conv2d(groups=channels)`` computed by ``pydl.ops.depthwise_conv2d``.

It subclasses ``torch.nn.Conv2d`` (in_channels = channels, out_channels = channels * multiplier,
groups = channels), so its parameters, state_dict keys (``weight`` (C*m, 1, KH, KW), ``bias``
(C*m,)), initialization and ``extra_repr`` are torch's, and it loads an ``nn.Conv2d(groups=C)``
checkpoint unchanged. ``padding_mode`` other than "zeros" pads with ``F.pad`` first (as nn.Conv2d
does), then runs the pydl kernel with no padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.depthwise_conv2d import depthwise_conv2d
from ._params import params


class DepthwiseConv2d(torch.nn.Conv2d):
    """Depthwise convolution (N, C, H, W) -> (N, C*multiplier, Ho, Wo); see pydl.ops.depthwise_conv2d."""

    def __init__(self, channels: int, kernel_size, stride=1, padding=0, dilation=1, bias: bool = True,
                 multiplier: int = 1, padding_mode: str = "zeros", device=None, dtype=None):
        if isinstance(multiplier, bool) or not isinstance(multiplier, int) or multiplier < 1:
            raise ValueError(f"DepthwiseConv2d: multiplier must be an int >= 1, got {multiplier!r}")
        super().__init__(channels, channels * multiplier, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=channels, bias=bias, padding_mode=padding_mode,
                         device=device, dtype=dtype)
        self.multiplier = multiplier

    @classmethod
    def from_conv(cls, conv: torch.nn.Conv2d) -> "DepthwiseConv2d":
        """A DepthwiseConv2d sharing ``conv``'s parameters (an nn.Conv2d with groups == in_channels)."""
        if conv.groups != conv.in_channels or conv.out_channels % conv.in_channels:
            raise ValueError(f"DepthwiseConv2d.from_conv: {conv} is not depthwise (groups must equal in_channels)")
        new = cls.__new__(cls)
        new.__dict__.update(conv.__dict__)
        new.multiplier = conv.out_channels // conv.in_channels
        return new

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = params(self, "weight", "bias")
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return depthwise_conv2d(x, weight, bias, self.stride, 0, self.dilation)
        return depthwise_conv2d(x, weight, bias, self.stride, self.padding, self.dilation)
