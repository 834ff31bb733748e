"""timm integration: the rules ``pydl.patch`` applies to timm's own layer classes.

    model = timm.create_model("convnext_tiny")
    pydl.patch(model)        # LayerNorm, LayerNorm2d, depthwise + dense convs -> pydl's kernels

timm's ConvNeXt, ResNet and ViT are made of torch layers (``nn.Conv2d``, ``nn.LayerNorm``,
``nn.GELU``; the generic rules of ``pydl.patch`` take those) and of timm classes that override
``forward``, which only this module knows the semantics of:

    timm.layers.LayerNorm     ``F.layer_norm`` over the last dim (timm's "fast norm" variant too)
                              -> ``pydl.nn.LayerNorm``
    timm.layers.LayerNorm2d   LayerNorm over C of an (N, C, H, W) tensor -> ``pydl.nn.LayerNorm2d``
    timm.layers.Attention     ViT's self-attention: qkv projection, optional q/k norms, SDPA (or
                              its explicit math), optional output norm and gate, proj ->
                              the same with ``pydl.ops.attention``

Import-guarded: ``pydl.patch`` consults this module only when timm is already imported, and this
module imports timm only when its rules are asked for.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..ops.attention import attention
from ..patch import Rule, Swap, mixed_class

# the attributes of timm's Attention this forward reads (timm >= 0.9); gate and norm are newer, optional
_ATTENTION_ATTRS = ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop")


class TimmAttention(nn.Module):
    """The forward of a patched ``timm.layers.Attention``: timm's computation with pydl's attention.

    x (B, N, C) -> (B, N, dim_out). ``attn_mask`` (bool True = attend, or additive float, broadcast
    to (B, H, N, N)) and ``is_causal`` as in ``F.scaled_dot_product_attention``; attention dropout
    ``attn_drop.p`` in training, as timm's fused path. timm's scale (head_dim^-0.5) is passed
    explicitly, so a model whose ``scale`` was changed keeps it.
    """

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        B, N, _ = x.shape
        gate = getattr(self, "gate", None)
        gate = gate(x).sigmoid() if gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, D) views
        q, k = self.q_norm(q), self.k_norm(k)
        o = attention(q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0,
                      is_causal=is_causal, scale=self.scale)  # (B, H, N, D)
        o = o.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        norm = getattr(self, "norm", None)
        if norm is not None:
            o = norm(o)
        if gate is not None:
            o = o * gate
        return self.proj_drop(self.proj(o))


def _exact(cls: type, target: type, skip_if=None):
    """A replace function for instances of exactly ``cls`` (subclasses may change forward)."""

    def replace(module: nn.Module):
        if type(module) is not cls:
            return None
        reason = skip_if(module) if skip_if is not None else None
        return reason or Swap(mixed_class(target, cls))
    return replace


def _attention_skip_reason(module: nn.Module) -> Optional[str]:
    missing = [a for a in _ATTENTION_ATTRS if not hasattr(module, a)]
    if missing:
        return f"timm Attention without {missing}: a timm version pydl does not know"
    return None


def patch_rules() -> list:
    """The ``pydl.patch`` rules for timm's classes (imports timm)."""
    from timm import layers

    from ..nn.layer_norm import LayerNorm, LayerNorm2d

    return [Rule("layer_norm", _exact(layers.LayerNorm, LayerNorm)),
            Rule("layer_norm", _exact(layers.LayerNorm2d, LayerNorm2d)),
            Rule("attention", _exact(layers.Attention, TimmAttention, _attention_skip_reason))]


__all__ = ["TimmAttention", "patch_rules"]
