"""Pieces shared by the sequence models (transformer.py, gpt.py, bert.py): activations by their
Hugging Face names, mask conversions, and self-attention over a ``pydl.generation.KVCache``."""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.attention import attention
from ..ops.decode_attention import decode_attention

# Hugging Face's activation names (transformers' ACT2FN) that the models implement.
ACTIVATIONS: dict = {
    "gelu": functools.partial(F.gelu, approximate="none"),
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


def activation(name: str, what: str = "activation") -> Callable[[Tensor], Tensor]:
    fn = ACTIVATIONS.get(name) if isinstance(name, str) else None
    if fn is None:
        raise ValueError(f"{what} must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return fn


def check_ids(name: str, ids: Tensor) -> None:
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (torch.long), got dtype {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"{name} must have shape (batch_size, sequence_length), got shape {tuple(ids.shape)}")


def keep_mask(mask: Optional[Tensor], like: Tensor, name: str, *, true_means_keep: bool = True) -> Optional[Tensor]:
    """A (B, S) padding mask -> bool (B, S), True = a real token that takes part.

    ``true_means_keep``: Hugging Face's attention_mask (1 = real token); False for torch's
    ``key_padding_mask`` convention (True = padding)."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a Tensor or None, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(like.shape):
        raise ValueError(f"{name} must have shape {tuple(like.shape)} (batch_size, sequence_length), "
                         f"got {tuple(mask.shape)}")
    keep = mask.bool() if mask.dtype == torch.bool or not mask.is_floating_point() else mask != 0
    return keep if true_means_keep else ~keep


def all_true(mask: Tensor) -> bool:
    """Whether a bool mask is all True, answered in eager mode only (one host sync); under
    torch.compile it is False, so the traced graph keeps the mask and stays data-independent."""
    if torch.compiler.is_compiling():
        return False
    return bool(mask.all())


def causal_keep_mask(keep: Tensor) -> Tensor:
    """Causal self-attention over a (B, T) keep mask -> bool (B, 1, T, T): query i attends key j <= i
    that is a real token, and always itself (a padding query then attends only to itself instead of
    to nothing: its output is garbage either way, but never NaN, so no NaN reaches a gradient)."""
    T = keep.shape[1]
    i = torch.arange(T, device=keep.device)
    causal = i[None, :] <= i[:, None]  # (T, T)
    return (causal & keep[:, None, :]) | torch.eye(T, dtype=torch.bool, device=keep.device)  # (B, T, T)


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, T, H*D) -> a (B, H, T, D) view."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, T, D) -> (B, T, H*D)."""
    return x.transpose(1, 2).flatten(2)


def cached_self_attention(q: Tensor, k: Tensor, v: Tensor, cache, layer: int, scale: Optional[float] = None) -> Tensor:
    """Causal self-attention of T new tokens per row through ``cache`` (a pydl.generation.KVCache).

    q, k, v (N, H, T, D): the new tokens' projections; token t of row n sits at position
    ``cache.lengths[n] + t``. Appends k, v to layer ``layer`` (lengths are not advanced) and returns
    (N, H, T, D) in q's dtype. T == 1: ``pydl.ops.decode_attention``; T > 1 (prefill): the attention op
    over the filled prefix with a per-row causal mask."""
    kb, vb = cache.append(layer, k, v)  # (N, H, Lmax, D)
    qc = q.to(kb.dtype)
    T = q.shape[2]
    if T == 1:
        out = decode_attention(qc, kb, vb, cache.lengths + 1, scale)
    else:
        L = cache.filled + T
        pos = cache.lengths.to(torch.int64)[:, None] + torch.arange(T, device=q.device)  # (N, T)
        mask = torch.arange(L, device=q.device)[None, None, :] <= pos[:, :, None]  # (N, T, L)
        out = attention(qc, kb[:, :, :L], vb[:, :, :L], attn_mask=mask[:, None], scale=scale)
    return out.to(q.dtype)


def cache_positions(cache, T: int) -> Tensor:
    """Positions (N, T) int64 of T new tokens per row of ``cache``."""
    return cache.lengths.to(torch.int64)[:, None] + torch.arange(T, device=cache.lengths.device)
