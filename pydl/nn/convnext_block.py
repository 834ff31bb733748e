"""The ConvNeXt block (Liu et al., 2022, "A ConvNet for the 2020s"), built from injected layers.

    x ─ dwconv 7×7 ─ LayerNorm(C) ─ Linear C→4C ─ GELU ─ Linear 4C→C ─ ·gamma ─ drop_path ─(+)─
    └──────────────────────────────────────────────────────────────────────────────────────┘

Input and output (N, C, H, W). The LayerNorm and the MLP act on the NHWC view
``x.permute(0, 2, 3, 1)``: for a channels_last tensor (what ``pydl.models.convnext`` feeds it)
that view is contiguous rows of C, so LayerNorm reads rows in place and each Linear is one GEMM
with no transposing copy; the result is handed back as an (N, C, H, W) tensor with channels_last
strides. An NCHW-contiguous input works too (the row view is then strided and costs copies).

Parameter names are timm's ``ConvNeXtBlock`` (``conv_mlp=False``): ``conv_dw``, ``norm``,
``mlp.fc1``, ``mlp.fc2``, ``gamma``, so timm checkpoints load unchanged. Every layer is a
factory argument — ``dw_conv_layer(channels, kernel_size, padding=, bias=)`` (DepthwiseConv2d's
constructor), ``norm_layer(channels)``, ``act_layer()``, ``linear_layer(in, out, bias=)`` — so
a kernel is swapped in one place, never hard-coded in the model.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .depthwise_conv2d import DepthwiseConv2d
from .drop_path import DropPath
from .layer_norm import LayerNorm
from .mlp import Mlp


def torch_depthwise_conv(channels: int, kernel_size, stride=1, padding=0, dilation=1, bias: bool = True,
                         **kwargs) -> nn.Conv2d:
    """A plain ``nn.Conv2d(groups=channels)`` with DepthwiseConv2d's constructor (a dw_conv_layer)."""
    return nn.Conv2d(channels, channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                     groups=channels, bias=bias, **kwargs)


class ConvNeXtBlock(nn.Module):
    """One ConvNeXt block, (N, C, H, W) -> (N, C, H, W) in the input's memory format.

    dim: channels C. mlp_ratio: hidden width of the MLP = mlp_ratio·C. ls_init_value: the
    initial layer-scale gamma (None: no layer scale, no ``gamma`` parameter). drop_path:
    stochastic-depth rate of this block.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, ls_init_value: Optional[float] = 1e-6,
                 mlp_ratio: float = 4.0, kernel_size: int = 7, *,
                 dw_conv_layer: Callable[..., nn.Module] = DepthwiseConv2d,
                 norm_layer: Callable[[int], nn.Module] = partial(LayerNorm, eps=1e-6),
                 act_layer: Callable[[], nn.Module] = nn.GELU,
                 linear_layer: Callable[..., nn.Module] = nn.Linear):
        super().__init__()
        # gamma first: the parameter order (and so state_dict order) of timm's block
        self.gamma = nn.Parameter(torch.full((dim,), float(ls_init_value))) if ls_init_value is not None else None
        self.conv_dw = dw_conv_layer(dim, kernel_size, padding=kernel_size // 2, bias=True)
        self.norm = norm_layer(dim)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), act_layer=act_layer, linear_layer=linear_layer)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x.permute(0, 2, 3, 1)                         # (N, H, W, C)
        y = self.mlp(self.norm(self.conv_dw(x).permute(0, 2, 3, 1)))  # (N, H, W, C)
        if isinstance(self.drop_path, DropPath) and self.training:
            if self.gamma is not None:
                y = y * self.gamma
            out = shortcut + self.drop_path(y)
        elif self.gamma is not None:
            out = torch.addcmul(shortcut, y, self.gamma)       # shortcut + gamma·y in one pass
        else:
            out = shortcut + y
        return out.permute(0, 3, 1, 2)                           # (N, C, H, W), channels_last strides
