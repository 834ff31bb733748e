"""ResNet's residual blocks (He et al., 2016), built from injected layers.

``BasicBlock`` (ResNet-18/34): 3×3 conv → BN → ReLU → 3×3 conv → BN, (+) shortcut, ReLU.
``Bottleneck`` (ResNet-50+): 1×1 reduce → BN → ReLU → 3×3 (the stride) → BN → ReLU → 1×1
expand ×4 → BN, (+) shortcut, ReLU. The shortcut is the identity, or ``downsample`` (a 1×1 conv
with the block's stride + BN) when the shape changes.

Parameter names are timm's / torchvision's (``conv1``, ``bn1``, ..., ``downsample.0/1``), so
their checkpoints load unchanged. Layers are factories: ``conv_layer`` has ``nn.Conv2d``'s
constructor (pydl.nn.Conv2d is one), ``norm_layer(channels)``, ``act_layer()``.
``zero_init_last()`` zeroes the last BN's scale so a fresh block starts as the identity
(Goyal et al., 2017), as timm does by default.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor, nn

from .drop_path import DropPath


def _relu() -> nn.Module:
    return nn.ReLU(inplace=True)


def downsample_conv(in_channels: int, out_channels: int, stride: int, conv_layer: Callable[..., nn.Module],
                    norm_layer: Callable[[int], nn.Module]) -> nn.Sequential:
    """The projection shortcut: 1×1 conv (stride) + norm; keys ``0.weight``, ``1.*``."""
    return nn.Sequential(conv_layer(in_channels, out_channels, 1, stride=stride, bias=False),
                         norm_layer(out_channels))


class BasicBlock(nn.Module):
    """(N, inplanes, H, W) -> (N, planes, H/stride, W/stride)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 drop_path: float = 0.0, *, conv_layer: Callable[..., nn.Module] = nn.Conv2d,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
                 act_layer: Callable[[], nn.Module] = _relu):
        super().__init__()
        self.conv1 = conv_layer(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm_layer(planes)
        self.act1 = act_layer()
        self.conv2 = conv_layer(planes, planes, 3, padding=1, bias=False)
        self.bn2 = norm_layer(planes)
        self.act2 = act_layer()
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def zero_init_last(self) -> None:
        if getattr(self.bn2, "weight", None) is not None:
            nn.init.zeros_(self.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(self.drop_path(y) + shortcut)


class Bottleneck(nn.Module):
    """(N, inplanes, H, W) -> (N, 4·planes, H/stride, W/stride); the stride is on the 3×3 conv.

    groups / base_width give ResNeXt's grouped 3×3 (width = planes·base_width/64·groups).
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 drop_path: float = 0.0, groups: int = 1, base_width: int = 64, *,
                 conv_layer: Callable[..., nn.Module] = nn.Conv2d,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
                 act_layer: Callable[[], nn.Module] = _relu):
        super().__init__()
        width = int(planes * (base_width / 64)) * groups
        out = planes * self.expansion
        self.conv1 = conv_layer(inplanes, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.act1 = act_layer()
        self.conv2 = conv_layer(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = norm_layer(width)
        self.act2 = act_layer()
        self.conv3 = conv_layer(width, out, 1, bias=False)
        self.bn3 = norm_layer(out)
        self.act3 = act_layer()
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def zero_init_last(self) -> None:
        if getattr(self.bn3, "weight", None) is not None:
            nn.init.zeros_(self.bn3.weight)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.act1(self.bn1(self.conv1(x)))
        y = self.act2(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.act3(self.drop_path(y) + shortcut)
