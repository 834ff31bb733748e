"""A pre-allocated key/value cache for token-by-token decoding and beam search.

Layout (per layer ``l``)::

    keys[l]    (N, Hkv, Lmax, D)    N = batch_size * num_beams rows, beam-major (row b*K + k)
    values[l]  (N, Hkv, Lmax, Dv)
    lengths    (N,) int32           valid prefix of every row: what ``pydl.ops.decode_attention``
                                    takes as ``cache_seqlens``; positions >= lengths[n] are garbage

Self-attention: ``append(layer, k, v)`` writes the new tokens' keys/values in place at positions
``lengths[n] + t`` and returns the whole buffers; a model then calls ``decode_attention(q, k_cache,
v_cache, cache.lengths + T)`` (for T = 1) and, after its last layer, ``advance(T)``.

Beam reorder (``reorder(beam_idx)``) allocates nothing: every layer owns a second buffer of the same
shape (a scratch, allocated once with the cache), ``torch.index_select(..., out=scratch)`` gathers the
selected rows of the filled prefix ``[:, :, :filled]`` into it, and the two buffers swap roles (a
pointer swap). Cost: one copy of the filled prefix per step; memory: twice the cache.

Cross-attention (encoder-decoder): ``set_cross(layer, k, v, lengths)`` stores keys/values **per batch
item** ``(B, Hkv, S, D)``, not per beam. ``cross_attention(layer, q)`` serves the K beams of an item from
that one copy by folding the beams into the query-head dimension (``(B*K, H, 1, D)`` ->
``(B, H*K, 1, D)``, head h*K + k, which grouped-query attention maps to kv head h // (H / Hkv)): the
encoder states are never copied K times, and a beam reorder never touches them (the beams of one
item share them).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor


class KVCache:
    """Per-layer pre-allocated ``(N, Hkv, Lmax, D)`` key/value buffers plus the ``lengths`` vector.

    Args:
        num_layers: number of attention layers.
        batch_size: N, the number of rows (batch items x beams).
        num_kv_heads: Hkv.
        max_length: Lmax, positions per row.
        head_dim: D of the keys; ``v_head_dim`` (default ``head_dim``) of the values.
        num_beams: K, beams per batch item (rows b*K .. b*K+K-1 belong to item b); used by the
            cross-attention caches, which hold one entry per item.
        dtype, device: of the buffers.
        reorderable: allocate the scratch buffers that ``reorder`` swaps with (False halves the memory
            of a cache that is never reordered, e.g. for greedy search).
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_length: int, head_dim: int, *,
                 v_head_dim: Optional[int] = None, num_beams: int = 1, dtype: torch.dtype = torch.float32,
                 device=None, reorderable: bool = True) -> None:
        for name, v in (("num_layers", num_layers), ("batch_size", batch_size), ("num_kv_heads", num_kv_heads),
                        ("max_length", max_length), ("head_dim", head_dim), ("num_beams", num_beams)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"KVCache: {name} must be a positive int, got {v!r}")
        if batch_size % num_beams:
            raise ValueError(f"KVCache: batch_size ({batch_size}) must be a multiple of num_beams ({num_beams})")
        dv = head_dim if v_head_dim is None else v_head_dim
        shape_k = (batch_size, num_kv_heads, max_length, head_dim)
        shape_v = (batch_size, num_kv_heads, max_length, dv)
        self.keys: List[Tensor] = [torch.empty(shape_k, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values: List[Tensor] = [torch.empty(shape_v, dtype=dtype, device=device) for _ in range(num_layers)]
        self._scratch_k: Optional[List[Tensor]] = None
        self._scratch_v: Optional[List[Tensor]] = None
        if reorderable:
            self._scratch_k = [torch.empty_like(k) for k in self.keys]
            self._scratch_v = [torch.empty_like(v) for v in self.values]
        self.lengths = torch.zeros(batch_size, dtype=torch.int32, device=device)  # (N,)
        self.num_beams = num_beams
        self.max_length = max_length
        self.filled = 0  # host-side upper bound of max(lengths): the prefix a reorder copies
        # cross-attention, per batch item: (B, Hkv, S, D), (B, Hkv, S, Dv), lengths (B,) int32
        self.cross_keys: List[Optional[Tensor]] = [None] * num_layers
        self.cross_values: List[Optional[Tensor]] = [None] * num_layers
        self.cross_lengths: Optional[Tensor] = None
        self._parent: Optional[KVCache] = None

    # ---- shape -------------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    # ---- self-attention ------------------------------------------------------------------------------

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple:
        """Write T new positions of row n at ``lengths[n] + t``, in place; lengths are not advanced.

        k (N, Hkv, T, D), v (N, Hkv, T, Dv) -> (keys[layer], values[layer]), the whole buffers.
        """
        kb, vb = self.keys[layer], self.values[layer]
        N, T = k.shape[0], k.shape[2]
        if N != kb.shape[0] or k.shape[1] != kb.shape[1] or k.shape[3] != kb.shape[3]:
            raise ValueError(f"KVCache.append: k must have shape ({kb.shape[0]}, {kb.shape[1]}, T, {kb.shape[3]}), "
                             f"got {tuple(k.shape)}")
        if tuple(v.shape[:3]) != (N, kb.shape[1], T) or v.shape[3] != vb.shape[3]:
            raise ValueError(f"KVCache.append: v must have shape ({N}, {kb.shape[1]}, {T}, {vb.shape[3]}), "
                             f"got {tuple(v.shape)}")
        if self.filled + T > self.max_length:
            raise ValueError(f"KVCache.append: {T} more positions do not fit: up to {self.filled} are filled of "
                             f"max_length={self.max_length}")
        rows = torch.arange(N, device=kb.device)[:, None]  # (N, 1)
        pos = self.lengths.to(torch.int64)[:, None] + torch.arange(T, device=kb.device)  # (N, T)
        kb[rows, :, pos] = k.transpose(1, 2).to(kb.dtype)  # indexed view (N, T, Hkv, D)
        vb[rows, :, pos] = v.transpose(1, 2).to(vb.dtype)
        return kb, vb

    def advance(self, num_tokens: int = 1) -> None:
        """lengths += num_tokens (after every layer appended them)."""
        self.lengths += num_tokens
        self.filled += num_tokens
        if self._parent is not None:
            self._parent.filled = max(self._parent.filled, self.filled)

    def set_lengths(self, lengths: Tensor) -> None:
        """Set the valid prefix of every row (e.g. to roll back right padding after a prefill); one host read."""
        self.lengths.copy_(lengths)
        self.filled = int(lengths.max()) if lengths.numel() else 0
        if self._parent is not None:
            self._parent.filled = max(self._parent.filled, self.filled)

    def rows(self, n: int) -> "KVCache":
        """A cache over rows [0, n) that shares this one's storage (writes land here). Valid until the
        next ``reorder`` / ``expand_beams_`` of this cache (those swap buffers)."""
        view = KVCache.__new__(KVCache)
        view.keys = [k[:n] for k in self.keys]
        view.values = [v[:n] for v in self.values]
        view._scratch_k = view._scratch_v = None
        view.lengths = self.lengths[:n]
        view.num_beams = 1
        view.max_length = self.max_length
        view.filled = self.filled
        view.cross_keys, view.cross_values, view.cross_lengths = self.cross_keys, self.cross_values, self.cross_lengths
        view._parent = self
        return view

    def _gather_rows(self, index: Tensor) -> None:
        """rows <- rows[index] for every layer (and lengths), through the scratch buffers."""
        if self._scratch_k is None:
            raise RuntimeError("KVCache: this cache was created with reorderable=False (no scratch buffers)")
        L = self.filled
        index = index.to(device=self.lengths.device, dtype=torch.int64)
        for i in range(self.num_layers):
            if L:
                torch.index_select(self.keys[i][:, :, :L], 0, index, out=self._scratch_k[i][:, :, :L])
                torch.index_select(self.values[i][:, :, :L], 0, index, out=self._scratch_v[i][:, :, :L])
            self.keys[i], self._scratch_k[i] = self._scratch_k[i], self.keys[i]
            self.values[i], self._scratch_v[i] = self._scratch_v[i], self.values[i]
        self.lengths.copy_(self.lengths.index_select(0, index))

    def reorder(self, beam_idx: Tensor) -> None:
        """Beam reorder: row n takes the contents of row ``beam_idx[n]`` (N,), without reallocation.

        The indices must stay within each batch item's K rows (as beam search produces them): the
        per-item cross-attention caches are not touched.
        """
        if beam_idx.dim() != 1 or beam_idx.shape[0] != self.batch_size:
            raise ValueError(f"KVCache.reorder: beam_idx must have shape ({self.batch_size},), "
                             f"got {tuple(beam_idx.shape)}")
        self._gather_rows(beam_idx)

    def expand_beams_(self, num_beams: int) -> None:
        """After a prefill of rows [0, B) (B = N / num_beams), copy row b to rows b*K .. b*K+K-1."""
        N = self.batch_size
        if N % num_beams:
            raise ValueError(f"KVCache.expand_beams_: {N} rows are not a multiple of num_beams={num_beams}")
        self.num_beams = num_beams
        if num_beams > 1:
            self._gather_rows(torch.arange(N // num_beams, device=self.lengths.device).repeat_interleave(num_beams))

    # ---- cross-attention (encoder-decoder) --------------------------------------------------------------

    def set_cross(self, layer: int, k: Tensor, v: Tensor, lengths: Optional[Tensor] = None) -> None:
        """Store one layer's cross-attention keys/values per batch item: k (B, Hkv, S, D), v (B, Hkv, S, Dv),
        lengths (B,) int32 = valid (right-padded) encoder positions (default: all S)."""
        B = self.batch_size // self.num_beams
        if k.shape[0] != B or v.shape[0] != B:
            raise ValueError(f"KVCache.set_cross: k and v must hold one entry per batch item ({B}), got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
        self.cross_keys[layer], self.cross_values[layer] = k, v
        if lengths is None:
            if self.cross_lengths is None or self.cross_lengths.shape[0] != B:
                self.cross_lengths = torch.full((B,), k.shape[2], dtype=torch.int32, device=k.device)
        else:
            self.cross_lengths = lengths.to(device=k.device, dtype=torch.int32)

    def cross_attention(self, layer: int, q: Tensor, scale: Optional[float] = None) -> Tensor:
        """Attention of the N = B*K rows' queries q (N, H, 1, D) over their item's encoder keys/values:
        (N, H, 1, Dv), without expanding the (B, Hkv, S, D) cache K times."""
        from ..ops.decode_attention import decode_attention  # lazy: keep import of this module cheap

        k, v = self.cross_keys[layer], self.cross_values[layer]
        if k is None:
            raise RuntimeError(f"KVCache.cross_attention: layer {layer} has no cross-attention cache (set_cross)")
        N, H, _, D = q.shape
        B = k.shape[0]
        K = N // B
        if K * B != N:
            raise ValueError(f"KVCache.cross_attention: q has {N} rows, not a multiple of the {B} batch items")
        qf = q.view(B, K, H, 1, D).transpose(1, 2).reshape(B, H * K, 1, D)  # head h*K + k
        out = decode_attention(qf, k, v, self.cross_lengths, scale)  # (B, H*K, 1, Dv)
        return out.view(B, H, K, 1, -1).transpose(1, 2).reshape(N, H, 1, -1)


def repeat_rows(t: Tensor, repeats: int) -> Tensor:
    """(B, ...) -> (B*repeats, ...) beam-major: a zero-copy expanded view when B == 1, else a copy."""
    if repeats == 1:
        return t
    if t.shape[0] == 1:
        return t.expand((repeats,) + tuple(t.shape[1:]))
    return t.repeat_interleave(repeats, dim=0)


__all__: Sequence[str] = ("KVCache", "repeat_rows")
