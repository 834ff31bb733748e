"""Drop-in ``nn.Module`` replacements backed by pydl operators."""

from .attention import MultiheadAttention
from .conv import Conv2d
from .convnext_block import ConvNeXtBlock
from .depthwise_conv2d import DepthwiseConv2d
from .drop_path import DropPath, drop_path
from .layer_norm import LayerNorm, LayerNorm2d, LayerNormGELU
from .mlp import Mlp
from .resnet_block import BasicBlock, Bottleneck
from .rms_norm import RMSNorm

__all__ = ["BasicBlock", "Bottleneck", "Conv2d", "ConvNeXtBlock", "DepthwiseConv2d", "DropPath", "LayerNorm", "LayerNorm2d",
           "LayerNormGELU", "Mlp", "MultiheadAttention", "RMSNorm", "drop_path"]
