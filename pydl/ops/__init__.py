"""Public functional API: PyTorch custom ops with native, Triton and torch backends.

Each op's module (e.g. ``pydl.ops.layer_norm``, importable as
``from pydl.ops.layer_norm import ...``) also holds its float64 reference ``<op>_ref``.
"""

from .attention import attention, attention_ref
from .attention_varlen import attention_varlen, attention_varlen_ref
from .beam_search_step import beam_search_step, beam_search_step_ref
from .conv2d import conv2d, conv2d_ref
from .decode_attention import decode_attention, decode_attention_ref
from .depthwise_conv2d import depthwise_conv2d, depthwise_conv2d_ref
from .layer_norm import add_layer_norm, add_layer_norm_ref, layer_norm, layer_norm_gelu, layer_norm_ref
from .rms_norm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref

__all__ = ["attention", "attention_ref", "attention_varlen", "attention_varlen_ref", "beam_search_step", "beam_search_step_ref", "conv2d", "conv2d_ref", "decode_attention", "decode_attention_ref", "depthwise_conv2d", "depthwise_conv2d_ref",
           "add_layer_norm", "add_layer_norm_ref", "add_rms_norm", "add_rms_norm_ref", "layer_norm",
           "layer_norm_gelu", "layer_norm_ref", "rms_norm", "rms_norm_ref"]
