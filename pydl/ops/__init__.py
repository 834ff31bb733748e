"""Public functional API: PyTorch custom ops with native, Triton and torch backends.

Each op's module (e.g. ``pydl.ops.layer_norm``, importable as
``from pydl.ops.layer_norm import ...``) also holds its float64 reference ``<op>_ref``.
"""

from .attention import attention, attention_ref
from .attention_varlen import attention_varlen, attention_varlen_ref
from .decode_attention import decode_attention, decode_attention_ref
from .layer_norm import add_layer_norm, add_layer_norm_ref, layer_norm, layer_norm_gelu, layer_norm_ref
from .rms_norm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref

__all__ = ["attention", "attention_ref", "attention_varlen", "attention_varlen_ref", "decode_attention", "decode_attention_ref", "add_layer_norm", "add_layer_norm_ref", "add_rms_norm", "add_rms_norm_ref", "layer_norm",
           "layer_norm_gelu", "layer_norm_ref", "rms_norm", "rms_norm_ref"]
