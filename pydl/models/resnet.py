"""ResNet-18/34/50 (He et al., 2016) with timm's layout: state_dicts load both ways unchanged.

    stem:   conv1 7×7/2 (64) → bn1 → ReLU → maxpool 3×3/2
    layer1..layer4: [BasicBlock | Bottleneck] × layers[i], widths 64·2^i, stride 2 from layer2 on
    head:   global average pool → (dropout) → fc

Keys, parameter counts (11.69M / 21.80M / 25.56M at 1000 classes) and outputs equal to
``timm.create_model("resnet18/34/50")``. The convolution, norm and activation are factories
(``conv_layer`` with nn.Conv2d's constructor, default ``pydl.nn.Conv2d``; ``norm_layer(C)``,
default BatchNorm2d; ``act_layer()``), handed down to every block.

``channels_last=True`` turns the input into channels_last memory format at the stem, so every
convolution runs NHWC (oneDNN's and cuDNN's fast layout); the logical shapes stay (N, C, H, W).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.conv import Conv2d
from ..nn.resnet_block import BasicBlock, Bottleneck, _relu, downsample_conv
from ._common import example_image

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "resnet18", "resnet34", "resnet50"]


class ResNet(nn.Module):
    """(N, in_chans, H, W) -> logits (N, num_classes); H, W >= 32 (the net downsamples by 32).

    block: BasicBlock or Bottleneck; layers: blocks per stage; widths: the planes of each stage
    (a Bottleneck stage outputs 4× that); stem_width: channels of the 7×7 stem. drop_rate: dropout before fc.
    drop_path_rate: stochastic depth, rising linearly from 0 to this over the blocks.
    zero_init_last: zero the last BN scale of every block (timm's default). num_classes=0: no
    fc, the forward returns the pooled features (N, num_features).
    """

    def __init__(self, block: Type[nn.Module], layers: Sequence[int], num_classes: int = 1000,
                 in_chans: int = 3, *, widths: Sequence[int] = (64, 128, 256, 512), stem_width: int = 64,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 zero_init_last: bool = True, channels_last: bool = True,
                 conv_layer: Callable[..., nn.Module] = Conv2d,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
                 act_layer: Callable[[], nn.Module] = _relu):
        super().__init__()
        if len(layers) != len(widths) or not layers:
            raise ValueError(f"ResNet: layers {tuple(layers)} and widths {tuple(widths)} must be non-empty "
                             "and of equal length")
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate
        self.channels_last = channels_last
        self.conv1 = conv_layer(in_chans, stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(stem_width)
        self.act1 = act_layer()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        n_blocks, k, inplanes = sum(layers), 0, stem_width
        layers_kw = dict(conv_layer=conv_layer, norm_layer=norm_layer, act_layer=act_layer)
        for i, depth in enumerate(layers):
            planes, stride = widths[i], 1 if i == 0 else 2
            blocks = []
            for j in range(depth):
                s = stride if j == 0 else 1
                out = planes * block.expansion
                down = (downsample_conv(inplanes, out, s, conv_layer, norm_layer)
                        if s != 1 or inplanes != out else None)
                dp = drop_path_rate * k / max(n_blocks - 1, 1)
                blocks.append(block(inplanes, planes, s, down, dp, **layers_kw))
                inplanes, k = out, k + 1
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.stage_names = tuple(f"layer{i + 1}" for i in range(len(layers)))
        self.num_features = inplanes
        self.fc = nn.Linear(inplanes, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights(zero_init_last)

    def _init_weights(self, zero_init_last: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if hasattr(m, "zero_init_last"):
                    m.zero_init_last()

    def forward_features(self, x: Tensor) -> Tensor:
        """(N, in_chans, H, W) -> (N, num_features, H/32, W/32)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean((2, 3))  # (N, C): global average pool
        if self.drop_rate > 0:
            x = F.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def example_inputs(self, batch_size: int = 2, *, image_size: int = 32,
                       generator: Optional[torch.Generator] = None) -> tuple:
        """A small random image batch: ((batch_size, in_chans, image_size, image_size),)."""
        return example_image(self, batch_size, self.in_chans, image_size, generator)


# block / layers / widths may be overridden (the registry's small configs do).

def resnet18(**kwargs) -> ResNet:
    """ResNet-18: BasicBlock × (2, 2, 2, 2), 11.69M parameters."""
    return ResNet(**{"block": BasicBlock, "layers": (2, 2, 2, 2), **kwargs})


def resnet34(**kwargs) -> ResNet:
    """ResNet-34: BasicBlock × (3, 4, 6, 3), 21.80M parameters."""
    return ResNet(**{"block": BasicBlock, "layers": (3, 4, 6, 3), **kwargs})


def resnet50(**kwargs) -> ResNet:
    """ResNet-50: Bottleneck × (3, 4, 6, 3), 25.56M parameters."""
    return ResNet(**{"block": Bottleneck, "layers": (3, 4, 6, 3), **kwargs})
