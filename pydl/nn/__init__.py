"""Drop-in ``nn.Module`` replacements backed by pydl operators."""

from .layer_norm import LayerNorm, LayerNorm2d, LayerNormGELU

__all__ = ["LayerNorm", "LayerNorm2d", "LayerNormGELU"]
