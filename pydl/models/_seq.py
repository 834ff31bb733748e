"""Pieces shared by the sequence models (transformer.py, gpt.py, bert.py): activations by their
Hugging Face names, mask conversions, the injected blocks (their check and the residual add + norm
step), Hugging Face's weight initialisation, and self-attention over a ``pydl.generation.KVCache``.

The blocks a sequence model takes as keyword-only constructor arguments (defaults: pydl's):

- ``norm_layer(dim, eps=eps) -> nn.Module`` (default ``pydl.nn.LayerNorm``): every norm of the model,
  called with the width and the model's own eps (its config field or constructor argument, so the
  config stays the one source of eps; ``torch.nn.LayerNorm`` and ``torch.nn.RMSNorm`` fit, and
  ``functools.partial`` fixes any other argument). The norm's parameters take its attribute name
  (``ln_1.weight``, ``LayerNorm.bias``, ``norm1.weight``), so a norm with LayerNorm's parameters keeps
  the state_dict keys. Each residual add + norm goes through :func:`add_norm`: fused only for pydl's
  LayerNorm.
- ``attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False)``
  (default ``pydl.ops.attention``): ``F.scaled_dot_product_attention``'s signature and semantics, so
  that function itself fits. The models call it with q, k, v (B, H, T, D) and keywords ``attn_mask``
  (None or bool, True = attend, broadcast to (B, H, Tq, Tk)), ``dropout_p`` (0 in eval),
  ``is_causal`` (top-left) and ``scale``.
- ``decode_attention(q, k_cache, v_cache, cache_seqlens, scale=None)`` (models with a KV cache; default
  ``pydl.ops.decode_attention``): one query per row, q (B, H, 1, D), over each row's first
  ``cache_seqlens[b]`` cached positions of k_cache, v_cache (B, H, Lmax, D) -> (B, H, 1, D). The
  positions past a row's length are uninitialised memory (possibly NaN): a function must not read
  them, and masking is not enough (a masked NaN value still gives 0 * NaN = NaN).

A callable is stored on the layers that call it (an ``nn.Module`` becomes a submodule of each).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.layer_norm import LayerNorm
from ..ops.layer_norm import add_layer_norm

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


NormLayer = Callable[..., nn.Module]  # norm_layer(dim, eps=eps) -> a norm over the last dim
AttentionFn = Callable[..., Tensor]  # F.scaled_dot_product_attention's (or decode_attention's) signature


def check_sizes(owner: str, **sizes) -> None:
    """ValueError naming the size (``n_embd=...``) that is not a positive int."""
    for name, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{owner}: {name} must be a positive int, got {v!r}")


def check_blocks(owner: str, **blocks) -> None:
    """TypeError naming the argument when an injected block (``norm_layer=...``) is not callable."""
    for name, block in blocks.items():
        if not callable(block):
            raise TypeError(f"{owner}: {name} must be callable, got {block!r} of type {type(block).__name__}")


# pydl.nn.LayerNorm's activation (None; LayerNormGELU's approximate) -> add_layer_norm's
_FUSED_ACTIVATION = {None: None, "none": "gelu", "tanh": "gelu_tanh"}


def add_norm(x: Tensor, residual: Tensor, norm: nn.Module) -> tuple[Tensor, Tensor]:
    """The residual step: h = x + residual -> (norm(h), h), both of x's shape (..., dim).

    One fused ``pydl.ops.add_layer_norm`` pass (h is read once) when ``norm`` is a ``pydl.nn.LayerNorm``
    or ``LayerNormGELU`` over the last dim with pydl's own forward, so that the fused kernel computes
    what the module would; any other norm (``torch.nn.LayerNorm``, ``RMSNorm``, a user module, a pydl
    subclass with its own forward such as ``LayerNorm2d``) runs unfused: ``h = x + residual; norm(h)``."""
    cls = type(norm)
    if (isinstance(norm, LayerNorm) and cls.forward is LayerNorm.forward and cls._normalize is LayerNorm._normalize
            and len(norm.normalized_shape) == 1):
        return add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps, _FUSED_ACTIVATION[norm._activation])
    h = x + residual
    return norm(h), h


def init_weights(module: nn.Module, std: float) -> None:
    """Hugging Face's GPT-2 / BERT initialisation of every layer in ``module``: N(0, std) Linear and
    Embedding weights (an embedding's padding row zeroed), zero biases, LayerNorm / RMSNorm reset
    (unit weight, zero bias); other (injected) modules keep their own initialisation."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
            m.reset_parameters()


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


def cached_self_attention(q: Tensor, k: Tensor, v: Tensor, cache, layer: int, scale: Optional[float] = None, *,
                          attention: AttentionFn, decode_attention: AttentionFn) -> Tensor:
    """Causal self-attention of T new tokens per row through ``cache`` (a pydl.generation.KVCache).

    q, k, v (N, H, T, D): the new tokens' projections; token t of row n sits at position
    ``cache.lengths[n] + t``. Appends k, v to layer ``layer`` (lengths are not advanced) and returns
    (N, H, T, D) in q's dtype. T == 1: ``decode_attention``; T > 1 (prefill): ``attention`` over the
    filled prefix with a per-row causal mask (the model's injected blocks, see the module docstring)."""
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
