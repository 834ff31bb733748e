"""Drop-in ``nn.Module`` replacements backed by pydl operators."""

from .layer_norm import LayerNorm, LayerNormGELU

__all__ = ["LayerNorm", "LayerNormGELU"]
