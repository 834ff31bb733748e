"""Variable-length (packed) attention: ``attention_varlen``, flash-attn's varlen API.

    attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     dropout_p=0.0, is_causal=False, scale=None)

q (total_q, H, E), k (total_k, Hkv, E), v (total_k, Hkv, Ev): the tokens of B sequences packed
back to back; sequence b owns rows cu_seqlens_q[b]:cu_seqlens_q[b+1] of q and
cu_seqlens_k[b]:cu_seqlens_k[b+1] of k and v (int32 (B + 1,) cumulative lengths starting at 0).
Each sequence attends only to its own keys: the result equals ``attention`` run on each sequence
alone (``is_causal`` top-left per sequence, as ``attention``'s; flash-attn aligns bottom-right
when a sequence's query and key lengths differ — they agree when they are equal). Returns
(total_q, H, Ev). GQA: H % Hkv == 0. No padding work: the triton kernels skip what lies past a
sequence's end, and nothing reads ``cu_seqlens`` on the host in the traced path, so the op runs
under ``torch.compile``; ``max_seqlen_*`` are Python ints (as in flash-attn).

The torch backend pads to (B, max_seqlen, H, E), runs SDPA with a key-padding (and causal) mask
and unpads: correct everywhere, O(B · max_seqlen²) work.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends
from ._common import EAGER, EAGER_GRAD, check_qkv, eager_mode
from .attention import DISPATCH as _DENSE, MASK_NONE, _scale, _unit_last_stride, _weights, kernel_key, run


def attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0, is_causal: bool = False,
                     scale: Optional[float] = None, *, backend: Optional[str] = None) -> Tensor:
    """Attention over packed sequences (see the module docstring); returns (total_q, H, Ev)."""
    _check_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, scale)
    if eager_mode((q, k, v, cu_seqlens_q, cu_seqlens_k)) in (EAGER, EAGER_GRAD):
        _check_lengths(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    name = DISPATCH.choose(kernel_key(q, v, dropout_p), backend)
    if name == "torch":
        return _padded(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, is_causal,
                       _scale(q, scale))
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    return run(q, k, v, None, MASK_NONE, is_causal, _scale(q, scale), dropout_p, cu_seqlens_q, cu_seqlens_k,
               max_seqlen_q, max_seqlen_k)[0]


def attention_varlen_ref(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                         is_causal: bool = False, scale: Optional[float] = None) -> Tensor:
    """The float64 reference: each sequence on its own through the softmax composition."""
    outs = []
    scale = _scale(q, scale)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qs = q[cq[b]:cq[b + 1]].double().transpose(0, 1)                       # (H, Nq_b, E)
        ks = k[ck[b]:ck[b + 1]].double().transpose(0, 1)
        vs = v[ck[b]:ck[b + 1]].double().transpose(0, 1)
        p = _weights(qs, ks, None, is_causal, scale, True)
        heads = qs.shape[0] // vs.shape[0]
        outs.append((p @ vs.repeat_interleave(heads, dim=0)).transpose(0, 1))
    return torch.cat(outs)


def _check_args(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, scale) -> None:
    check_qkv("attention_varlen", (("q", q), ("k", k), ("v", v)), 3, "be (total, heads, head_dim)")
    if k.device != q.device or v.device != q.device:
        raise ValueError("attention_varlen: q, k and v must be on one device")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"attention_varlen: head dims of q and k differ: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"attention_varlen: k {tuple(k.shape)} and v {tuple(v.shape)} must share (total_k, heads)")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"attention_varlen: q's heads ({q.shape[1]}) must be a multiple of k/v's ({k.shape[1]})")
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if not isinstance(cu, Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.shape[0] < 1:
            raise TypeError(f"attention_varlen: {name} must be a 1-D int32 tensor of B + 1 offsets")
        if cu.device != q.device:
            raise ValueError(f"attention_varlen: {name} is on {cu.device} but q is on {q.device}")
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"attention_varlen: cu_seqlens_q and cu_seqlens_k must have the same length (B + 1), "
                         f"got {cu_q.shape[0]} and {cu_k.shape[0]}")
    for name, m in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise TypeError(f"attention_varlen: {name} must be an int >= 0, got {m!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"attention_varlen: dropout_p must be a number in [0, 1], got {dropout_p!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"attention_varlen: scale must be None or a float, got {scale!r}")


def _check_lengths(q, k, cu_q, cu_k, max_q, max_k) -> None:
    """Eager calls only (one host sync): offsets start at 0, never decrease, end at the totals,
    and no sequence is longer than its max_seqlen (the kernels would skip its tail)."""
    lens_q, lens_k = cu_q.diff(), cu_k.diff()
    zero = cu_q.new_zeros(1)
    first_q, last_q, min_q, top_q, first_k, last_k, min_k, top_k = torch.cat([
        cu_q[:1], cu_q[-1:], lens_q.min(0, keepdim=True).values if lens_q.numel() else zero,
        lens_q.max(0, keepdim=True).values if lens_q.numel() else zero,
        cu_k[:1], cu_k[-1:], lens_k.min(0, keepdim=True).values if lens_k.numel() else zero,
        lens_k.max(0, keepdim=True).values if lens_k.numel() else zero]).tolist()
    for name, first, last, low, top, total, cap in (
            ("q", first_q, last_q, min_q, top_q, q.shape[0], max_q),
            ("k", first_k, last_k, min_k, top_k, k.shape[0], max_k)):
        if first != 0 or last != total or low < 0:
            raise ValueError(f"attention_varlen: cu_seqlens_{name} must rise from 0 to {total} ({name}'s total "
                             f"tokens), got first {first}, last {last}")
        if top > cap:
            raise ValueError(f"attention_varlen: a sequence has {top} tokens but max_seqlen_{name} is {cap}")


DISPATCH = backends.Dispatcher("attention_varlen", _DENSE.candidates, _DENSE.priority)


def _positions(cu: Tensor, total: int) -> tuple:
    """(sequence index, position in its sequence) of every packed token, without host syncs."""
    cu = cu.long()
    tokens = torch.arange(total, device=cu.device)
    seq = torch.searchsorted(cu[1:], tokens, right=True)
    return seq, tokens - cu[seq]


def _padded(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, scale) -> Tensor:
    """The torch backend: pad, SDPA with a key-padding (+ causal) mask, unpad (differentiable)."""
    B, H, Hkv = cu_q.shape[0] - 1, q.shape[1], k.shape[1]
    sq, pq = _positions(cu_q, q.shape[0])
    sk, pk = _positions(cu_k, k.shape[0])
    pad = lambda t, s, p, n: t.new_zeros((B, n) + t.shape[1:]).index_put((s, p), t)  # noqa: E731
    qp, kp, vp = pad(q, sq, pq, max_q), pad(k, sk, pk, max_k), pad(v, sk, pk, max_k)  # (B, N, H, D)
    key_ok = torch.arange(max_k, device=q.device) < cu_k.diff()[:, None].long()    # (B, max_k)
    mask = key_ok[:, None, None, :]
    if is_causal:
        mask = mask & torch.ones(max_q, max_k, dtype=torch.bool, device=q.device).tril()
    out = F.scaled_dot_product_attention(qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2),
                                         attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                         enable_gqa=H != Hkv)                       # (B, H, max_q, Ev)
    return out.transpose(1, 2)[sq, pq]

