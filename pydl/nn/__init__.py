"""Drop-in ``nn.Module`` replacements backed by pydl operators."""

from .attention import MultiheadAttention
from .layer_norm import LayerNorm, LayerNorm2d, LayerNormGELU
from .rms_norm import RMSNorm

__all__ = ["LayerNorm", "LayerNorm2d", "LayerNormGELU", "MultiheadAttention", "RMSNorm"]
