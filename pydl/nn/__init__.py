"""Drop-in ``nn.Module`` replacements backed by pydl operators."""

from .layer_norm import LayerNorm, LayerNorm2d, LayerNormGELU
from .rms_norm import RMSNorm

__all__ = ["LayerNorm", "LayerNorm2d", "LayerNormGELU", "RMSNorm"]
