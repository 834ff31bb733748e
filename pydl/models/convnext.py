"""ConvNeXt-T/S/B (Liu et al., 2022) with timm's layout: state_dicts load both ways unchanged.

    stem:    4×4/4 conv (dims[0]) → LayerNorm2d
    stage i: [downsample: LayerNorm2d → 2×2/2 conv (i > 0)] → ConvNeXtBlock × depths[i]
    head:    global average pool → LayerNorm → (dropout) → fc

Keys (``stem.0/1``, ``stages.N.downsample.0/1``, ``stages.N.blocks.M.{gamma,conv_dw,norm,mlp.fc1,
mlp.fc2}``, ``head.norm``, ``head.fc``), parameter counts (28.59M / 50.22M / 88.59M at 1000
classes) and outputs equal to ``timm.create_model("convnext_tiny/small/base")`` (timm's
``conv_mlp=False`` path). Every layer is a factory argument: the dense ``conv_layer`` (nn.Conv2d's
constructor; default ``pydl.nn.Conv2d``), ``dw_conv_layer`` (``pydl.nn.DepthwiseConv2d``),
``norm_layer`` (rows of C: ``pydl.nn.LayerNorm``), ``norm2d_layer`` (channels-first:
``pydl.nn.LayerNorm2d``), ``act_layer`` and ``linear_layer``.

Layout: channels_last end to end. ``channels_last=True`` (default) turns the input into
channels_last memory format once at the stem; from then on every tensor between layers is an
(N, C, H, W) tensor with NHWC strides, so the blocks' NHWC row views (LayerNorm, the MLP
GEMMs, layer scale + residual) are contiguous views and no layer transposes activations. Keeping
NHWC *tensors* (logical shape) between blocks instead would move exactly the same bytes (the
permutes are views either way), so the logical NCHW shape of timm/torch is kept. Measured on a
shared 2-core CPU (batch 8, 224², fp32): within noise of an NCHW-contiguous pydl model and
~1.0-1.13× timm's eager NCHW path; the GEMMs (addmm, ~60% of the time), GELU (~13%) and addmm's
bias copy (~15%) are the same in both, so the CPU gain is bounded by the depthwise conv, the
LayerNorms and the permute copies timm's NCHW path makes.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..nn.conv import Conv2d
from ..nn.convnext_block import ConvNeXtBlock
from ..nn.depthwise_conv2d import DepthwiseConv2d
from ..nn.layer_norm import LayerNorm, LayerNorm2d
from ._common import example_image

__all__ = ["ConvNeXt", "ConvNeXtStage", "ConvNeXtHead", "convnext_tiny", "convnext_small", "convnext_base"]


class ConvNeXtStage(nn.Module):
    """Optional downsampling (LayerNorm2d + 2×2/2 conv) then ``depth`` blocks; keys ``downsample.0/1``,
    ``blocks.M``. (N, in_chs, H, W) -> (N, out_chs, H/2, W/2) (or H, W without downsampling)."""

    def __init__(self, in_chs: int, out_chs: int, depth: int, downsample: bool, drop_path_rates: Sequence[float],
                 ls_init_value: Optional[float], *, conv_layer, norm2d_layer, **block_kw):
        super().__init__()
        if downsample or in_chs != out_chs:
            self.downsample = nn.Sequential(norm2d_layer(in_chs),
                                            conv_layer(in_chs, out_chs, 2 if downsample else 1,
                                                       stride=2 if downsample else 1, bias=True))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[ConvNeXtBlock(out_chs, drop_path_rates[j], ls_init_value, **block_kw)
                                      for j in range(depth)])

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


class ConvNeXtHead(nn.Module):
    """(N, C, H, W) -> logits: mean over H, W → ``norm`` → dropout → ``fc`` (keys ``norm``, ``fc``)."""

    def __init__(self, num_features: int, num_classes: int, norm_layer, drop_rate: float = 0.0):
        super().__init__()
        self.norm = norm_layer(num_features)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.drop(self.norm(x.mean((2, 3))))  # (N, C)
        return x if pre_logits else self.fc(x)


class ConvNeXt(nn.Module):
    """(N, in_chans, H, W) -> logits (N, num_classes); H, W >= 32 (the net downsamples by 32).

    depths / dims: blocks and channels per stage. drop_path_rate: stochastic depth, rising
    linearly from 0 at the first block to this at the last. ls_init_value: initial layer-scale
    gamma (None: no layer scale). head_init_scale: scales the initial fc weights and bias.
    num_classes=0: no fc, the forward returns the normed pooled features (N, dims[-1]).
    """

    def __init__(self, depths: Sequence[int] = (3, 3, 9, 3), dims: Sequence[int] = (96, 192, 384, 768),
                 num_classes: int = 1000, in_chans: int = 3, *, kernel_size: int = 7, mlp_ratio: float = 4.0,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, ls_init_value: Optional[float] = 1e-6,
                 head_init_scale: float = 1.0, channels_last: bool = True,
                 conv_layer: Callable[..., nn.Module] = Conv2d,
                 dw_conv_layer: Callable[..., nn.Module] = DepthwiseConv2d,
                 norm_layer: Callable[[int], nn.Module] = partial(LayerNorm, eps=1e-6),
                 norm2d_layer: Callable[[int], nn.Module] = partial(LayerNorm2d, eps=1e-6),
                 act_layer: Callable[[], nn.Module] = nn.GELU,
                 linear_layer: Callable[..., nn.Module] = nn.Linear):
        super().__init__()
        if len(depths) != len(dims) or not depths:
            raise ValueError(f"ConvNeXt: depths {tuple(depths)} and dims {tuple(dims)} must be non-empty "
                             "and of equal length")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"ConvNeXt: drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
        self.num_classes, self.in_chans, self.channels_last = num_classes, in_chans, channels_last
        self.num_features = dims[-1]
        self.stem = nn.Sequential(conv_layer(in_chans, dims[0], 4, stride=4, bias=True), norm2d_layer(dims[0]))
        n = sum(depths)
        rates = [drop_path_rate * k / max(n - 1, 1) for k in range(n)]
        block_kw = dict(kernel_size=kernel_size, mlp_ratio=mlp_ratio, dw_conv_layer=dw_conv_layer,
                        norm_layer=norm_layer, act_layer=act_layer, linear_layer=linear_layer)
        stages, prev, k = [], dims[0], 0
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            stages.append(ConvNeXtStage(prev, dim, depth, i > 0, rates[k:k + depth], ls_init_value,
                                        conv_layer=conv_layer, norm2d_layer=norm2d_layer, **block_kw))
            prev, k = dim, k + depth
        self.stages = nn.Sequential(*stages)
        self.head = ConvNeXtHead(dims[-1], num_classes, norm_layer, drop_rate)
        self._init_weights(head_init_scale)

    def _init_weights(self, head_init_scale: float) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if isinstance(self.head.fc, nn.Linear):
            with torch.no_grad():
                self.head.fc.weight.mul_(head_init_scale)
                self.head.fc.bias.mul_(head_init_scale)

    def forward_features(self, x: Tensor) -> Tensor:
        """(N, in_chans, H, W) -> (N, dims[-1], H/32, W/32)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.stages(self.stem(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head(x, pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def example_inputs(self, batch_size: int = 2, *, image_size: int = 32,
                       generator: Optional[torch.Generator] = None) -> tuple:
        """A small random image batch: ((batch_size, in_chans, image_size, image_size),)."""
        return example_image(self, batch_size, self.in_chans, image_size, generator)


# depths / dims may be overridden (the registry's small configs do).

def convnext_tiny(**kwargs) -> ConvNeXt:
    """ConvNeXt-T: depths (3, 3, 9, 3), dims (96, 192, 384, 768), 28.59M parameters."""
    return ConvNeXt(**{"depths": (3, 3, 9, 3), "dims": (96, 192, 384, 768), **kwargs})


def convnext_small(**kwargs) -> ConvNeXt:
    """ConvNeXt-S: depths (3, 3, 27, 3), dims (96, 192, 384, 768), 50.22M parameters."""
    return ConvNeXt(**{"depths": (3, 3, 27, 3), "dims": (96, 192, 384, 768), **kwargs})


def convnext_base(**kwargs) -> ConvNeXt:
    """ConvNeXt-B: depths (3, 3, 27, 3), dims (128, 256, 512, 1024), 88.59M parameters."""
    return ConvNeXt(**{"depths": (3, 3, 27, 3), "dims": (128, 256, 512, 1024), **kwargs})
