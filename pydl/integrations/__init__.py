"""Optional adapters to other libraries (import-guarded: each module imports its library on first
use, and pydl imports none of them unless asked).

    pydl.integrations.transformers   Hugging Face: from_transformers / to_transformers, the "pydl"
                                     attention implementation, pydl.patch rules (RMSNorm families)
    pydl.integrations.timm           pydl.patch rules for timm's LayerNorm, LayerNorm2d, ViT Attention
"""
