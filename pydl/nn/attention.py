"""Drop-in ``torch.nn.MultiheadAttention`` on pydl's attention op.

``MultiheadAttention`` subclasses ``torch.nn.MultiheadAttention``: same constructor, parameters,
state_dict keys (``in_proj_weight`` / ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``,
``in_proj_bias``, ``bias_k``, ``bias_v``, ``out_proj.*``), ``extra_repr`` and pickling, so a torch
checkpoint loads unchanged and a torch module can be swapped for it. ``need_weights=False`` runs
pydl's fast path (below); everything else is torch's own forward.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.attention import attention


class MultiheadAttention(torch.nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` whose ``need_weights=False`` forward runs ``pydl.ops.attention``.

    Same constructor, forward signature, mask conventions (``key_padding_mask`` (B, S) and
    ``attn_mask`` (L, S) / (B * num_heads, L, S): bool True = *not* allowed, or additive float;
    ``is_causal`` a hint that needs ``attn_mask``), errors and outputs as torch's module.

    The fast path (``need_weights=False``): the input projection with ``F.linear`` (one fused
    matmul when query is key is value, one for k and v when key is value), heads as views
    (B, N, H, D) -> (B, H, N, D) of the projections (no copies), the two masks merged into one
    mask broadcast through strides (key padding as (B, 1, 1, S), a 2-D attn_mask as (L, S); bool
    stays bool), ``pydl.ops.attention`` (dropout ``self.dropout`` in training only), ``out_proj``.
    With ``is_causal=True`` and no ``key_padding_mask``, attn_mask is replaced by the op's causal
    flag, as torch does.

    Falls back to torch's own forward (``super().forward``, same results, torch's speed):
    ``need_weights=True`` (torch's default; the weights come from torch's computation),
    ``add_bias_kv=True``, ``add_zero_attn=True`` and nested-tensor inputs.

    Where torch's own paths disagree, this module follows torch's ``need_weights=False`` path
    (F.multi_head_attention_forward + SDPA) in every mode: torch's inference fast path (eval,
    no grad, batch_first self-attention) gives NaN for a fully masked query row where SDPA (and
    pydl) give 0 attention, and it silently ignores ``is_causal=True`` without an ``attn_mask``,
    where this module raises torch's "Need attn_mask" error.

    pydl-specific: the keyword-only constructor argument ``backend`` (default None: pydl's
    choice) is passed to ``pydl.ops.attention`` ("triton", "torch"); it is not in the state_dict.
    """

    backend: Optional[str] = None  # class default: also for modules unpickled from older versions

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
                 add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None, dtype=None,
                 *, backend: Optional[str] = None) -> None:
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)
        self.backend = backend

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        if (need_weights or self.bias_k is not None or self.bias_v is not None or self.add_zero_attn
                or query.is_nested or key.is_nested or value.is_nested):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        return self._fast_forward(query, key, value, key_padding_mask, attn_mask, is_causal), None

    # ---- the fast path ---------------------------------------------------------------------------

    def _fast_forward(self, query, key, value, key_padding_mask, attn_mask, is_causal) -> Tensor:
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        _check_mask_dtype(key_padding_mask, "key_padding_mask", attn_mask, "attn_mask")
        _check_mask_dtype(attn_mask, "attn_mask")
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                               "module method `generate_square_subsequent_mask` to create this mask.")
        self._check_dims(query, key, value)
        if not is_batched:  # a batch of one, batch first (torch ignores batch_first for unbatched input)
            query, key, value = _same_map(lambda t: t.unsqueeze(0), query, key, value)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        seq_first = is_batched and not self.batch_first
        bdim = 1 if seq_first else 0
        B, L, S = query.shape[bdim], query.shape[1 - bdim], key.shape[1 - bdim]
        if is_causal and key_padding_mask is None:
            attn_mask = None  # the hint: the op's top-left causal mask replaces it (as torch's SDPA call)
        else:
            is_causal = False
        mask = self._merged_mask(key_padding_mask, attn_mask, B, L, S, query.dtype)

        q, k, v = (self._heads(t, seq_first) for t in self._project(query, key, value))  # (B, H, N, D)
        dropout_p = self.dropout if self.training else 0.0
        o = attention(q, k, v, mask, dropout_p, is_causal, backend=self.backend)  # (B, H, L, D)
        if seq_first:
            o = o.permute(2, 0, 1, 3).reshape(L, B, self.embed_dim)
        else:
            o = o.transpose(1, 2).reshape(B, L, self.embed_dim)
        out = F.linear(o, self.out_proj.weight, self.out_proj.bias)
        return out if is_batched else out.squeeze(0)

    def _check_dims(self, query, key, value) -> None:
        """torch's embedding-dim checks, with its exception types and messages."""
        if query.shape[-1] != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {query.shape[-1]}")
        if self._qkv_same_embed_dim:
            if key.shape != value.shape:
                raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
            return
        if key.shape[:-1] != value.shape[:-1]:
            raise AssertionError(f"key's sequence and batch dims {key.shape[:-1]} do not match value's "
                                 f"{value.shape[:-1]}")
        for what, t, w in (("key", key, self.k_proj_weight), ("value", value, self.v_proj_weight)):
            if t.shape[-1] != w.shape[1]:
                raise AssertionError(f"expecting {what} weights shape of {(self.embed_dim, t.shape[-1])}, "
                                     f"but got {w.shape}")

    def _project(self, query, key, value) -> tuple:
        """q, k, v projections (..., E) in the inputs' own layout; fused matmuls where inputs are shared."""
        E, b = self.embed_dim, self.in_proj_bias
        if not self._qkv_same_embed_dim:
            bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
            return (F.linear(query, self.q_proj_weight, bq), F.linear(key, self.k_proj_weight, bk),
                    F.linear(value, self.v_proj_weight, bv))
        w = self.in_proj_weight
        if key is value and query is key:  # self-attention: one (…, 3E) matmul, split as views
            return F.linear(query, w, b).unflatten(-1, (3, E)).unbind(-2)
        if key is value:  # encoder-decoder: q, and one (…, 2E) matmul for k and v
            wq, wkv = w.split([E, 2 * E])
            bq, bkv = (None, None) if b is None else b.split([E, 2 * E])
            return (F.linear(query, wq, bq), *F.linear(key, wkv, bkv).unflatten(-1, (2, E)).unbind(-2))
        bs = (None, None, None) if b is None else b.chunk(3)
        return tuple(F.linear(x, w_, b_) for x, w_, b_ in zip((query, key, value), w.chunk(3), bs))

    def _heads(self, t: Tensor, seq_first: bool) -> Tensor:
        """(B, N, E) or (N, B, E) -> a (B, H, N, D) view."""
        t = t.unflatten(-1, (self.num_heads, self.head_dim))  # (B, N, H, D) or (N, B, H, D)
        return t.permute(1, 2, 0, 3) if seq_first else t.transpose(1, 2)

    def _merged_mask(self, key_padding_mask, attn_mask, B, L, S, dtype) -> Optional[Tensor]:
        """One mask broadcastable to (B, H, L, S) in the op's convention (bool True = takes part,
        or additive float), from torch's (bool True = masked out, or additive float) masks."""
        H = self.num_heads
        if attn_mask is not None:
            if attn_mask.dim() == 2 and attn_mask.shape != (L, S):
                raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(L, S)}.")
            if attn_mask.dim() == 3:
                if attn_mask.shape != (B * H, L, S):
                    raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                                       f"{(B * H, L, S)}.")
                attn_mask = attn_mask.unflatten(0, (B, H))  # (B, H, L, S), a view
        if key_padding_mask is not None:
            if key_padding_mask.shape[0] != B:
                raise AssertionError(f"Expected key_padded_mask.shape[0] to be {B}, but got "
                                     f"{key_padding_mask.shape[0]}")
            if key_padding_mask.shape[1] != S:
                raise AssertionError(f"Expected key_padded_mask.shape[1] to be {S}, but got "
                                     f"{key_padding_mask.shape[1]}")
            key_padding_mask = key_padding_mask[:, None, None, :]  # (B, 1, 1, S), a view
        masks = [m for m in (attn_mask, key_padding_mask) if m is not None]
        if not masks:
            return None
        if all(m.dtype == torch.bool for m in masks):
            return torch.logical_not(masks[0] if len(masks) == 1 else masks[0] | masks[1])
        additive = [m if m.is_floating_point() else torch.zeros_like(m, dtype=dtype).masked_fill_(m, float("-inf"))
                    for m in masks]
        return additive[0] if len(additive) == 1 else additive[0] + additive[1]


def _check_mask_dtype(mask: Optional[Tensor], name: str, other: Optional[Tensor] = None, other_name: str = "") -> None:
    """torch's mask dtype rules (``F._canonical_mask``): bool or floating, a warning when they differ."""
    if mask is None:
        return
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise AssertionError(f"only bool and floating types of {name} are supported")
    if other is not None and mask.dtype != other.dtype:
        warnings.warn(f"Support for mismatched {name} and {other_name} is deprecated. Use same type for both "
                      "instead.", stacklevel=2)


def _same_map(fn, query: Tensor, key: Tensor, value: Tensor) -> tuple:
    """fn applied to each distinct tensor once, so that ``query is key`` / ``key is value`` survive."""
    q = fn(query)
    k = q if key is query else fn(key)
    v = k if value is key else q if value is query else fn(value)
    return q, k, v
