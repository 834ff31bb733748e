"""Decode attention: one new query token per sequence against a KV cache (token-by-token generation).

    decode_attention(q, k_cache, v_cache, cache_seqlens, scale)
        == F.scaled_dot_product_attention(q, k_cache[b, :, :len_b], v_cache[b, :, :len_b], scale=scale,
                                          enable_gqa=True)  for each row b, len_b = cache_seqlens[b]

q (B, H, 1, E); k_cache (B, Hkv, Lmax, E), v_cache (B, Hkv, Lmax, Ev) with any strides and a unit last
stride (e.g. ``cache[:, :, :Lmax]`` of a larger pre-allocated cache, or a (B, L, Hkv, E) buffer
transposed); cache_seqlens (B,) int32 or int64 on q's device -> (B, H, 1, Ev) in q's dtype.
H % Hkv == 0 (GQA: the H / Hkv queries of one KV head are served from one read of it). Positions at
or past a row's length are never read (garbage or NaN there does not change the result); a length
of 0 gives 0. Scale 1/sqrt(E) by default.

Lengths: on CPU (both backends, eager) a length outside [0, Lmax] is a ValueError. On CUDA the
lengths stay on the device (no sync): the kernel clamps them to [0, Lmax]; with the environment
variable ``PYDL_DEBUG`` set (read once, at import) the CUDA path checks them first (one sync).

Backends: ``native`` (csrc/cpu/decode_attention.cpp: float32, bfloat16, float64;
csrc/cuda/decode_attention.cu: float32, float16, bfloat16, split-K flash decoding) and ``torch``
(SDPA over the whole cache with a key-padding mask from the lengths, the cache past the lengths
zeroed first so that NaN there cannot leak; traceable, no host sync). This is an inference op: the
native kernels have no backward, so a call whose inputs require grad (with grad mode on) goes to
the differentiable torch backend, and forcing ``backend="native"`` for it is an error listing why.
Plain eager calls reach the kernel directly; everything traced (torch.compile, export, fake tensors,
torch.func) goes through the custom op ``pydl::decode_attention`` (fake impl, vmap by loop).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _native, backends
from ._common import EAGER, TRACED, check_qkv, device_type, eager_mode, same_device, vmap_by_loop

_NATIVE_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
_NATIVE_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LENGTH_DTYPES = (torch.int32, torch.int64)
_DEBUG = os.environ.get("PYDL_DEBUG", "") not in ("", "0")  # read once: per-call reads cost us


# ---- public API ------------------------------------------------------------------------------

def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                     scale: Optional[float] = None, *, backend: Optional[str] = None) -> Tensor:
    """Attention of one query token per (row, head) over each row's valid cache prefix.

    q (B, H, 1, E); k_cache (B, Hkv, Lmax, E); v_cache (B, Hkv, Lmax, Ev); cache_seqlens (B,) int32 /
    int64. Returns (B, H, 1, Ev) in q's dtype. ``backend`` forces "native" or "torch".
    """
    _check_args(q, k_cache, v_cache, cache_seqlens, scale)
    grad = torch.is_grad_enabled() and (q.requires_grad or k_cache.requires_grad or v_cache.requires_grad)
    name = DISPATCH.choose((device_type(q), q.dtype, grad), backend)
    s = _scale(q, scale)
    mode = eager_mode((q, k_cache, v_cache, cache_seqlens))
    if name == "torch":
        if mode != TRACED and cache_seqlens.is_cpu:
            _check_lengths_host(cache_seqlens, k_cache.shape[2])
        return _torch_decode(q, k_cache, v_cache, cache_seqlens, s)
    if mode == EAGER:
        return _native_decode(q, k_cache, v_cache, cache_seqlens, s)
    return torch.ops.pydl.decode_attention(q, k_cache, v_cache, cache_seqlens, s)


def decode_attention_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                         scale: Optional[float] = None) -> Tensor:
    """The float64 reference: per row, softmax(q k^T * scale) v over the valid prefix only (the
    cache past it is never looked at); a length of 0 gives 0. Returns (B, H, 1, Ev) float64."""
    s = _scale(q, scale)
    B, H = q.shape[0], q.shape[1]
    Hkv, ev = k_cache.shape[1], v_cache.shape[-1]
    out = torch.zeros((B, H, 1, ev), dtype=torch.float64, device=q.device)
    for b, n in enumerate(cache_seqlens.tolist()):
        if n <= 0:
            continue
        k = k_cache[b, :, :n].double().repeat_interleave(H // Hkv, dim=0)  # (H, n, E)
        v = v_cache[b, :, :n].double().repeat_interleave(H // Hkv, dim=0)  # (H, n, Ev)
        p = torch.softmax((q[b].double() @ k.transpose(-2, -1)) * s, dim=-1)  # (H, 1, n)
        out[b] = p @ v
    return out


# ---- argument checks and backend choice --------------------------------------------------------

def _check_args(q, k_cache, v_cache, cache_seqlens, scale) -> None:
    """ValueError / TypeError naming the argument."""
    check_qkv("decode_attention", (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)), 4, "have 4 dims")
    if not (same_device(k_cache, q) and same_device(v_cache, q)):
        raise ValueError(f"decode_attention: q, k_cache and v_cache must be on one device, got {q.device}, "
                         f"{k_cache.device}, {v_cache.device}")
    B, H, n, E = q.shape
    if n != 1:
        raise ValueError(f"decode_attention: q must have shape (B, H, 1, E) (one query token), got {tuple(q.shape)}")
    if E < 1:
        raise ValueError(f"decode_attention: q's head dim must be >= 1, got shape {tuple(q.shape)}")
    Bk, Hkv, L, Ek = k_cache.shape
    if Bk != B or Ek != E:
        raise ValueError(f"decode_attention: k_cache must have shape (B={B}, Hkv, Lmax, E={E}), got "
                         f"{tuple(k_cache.shape)}")
    if tuple(v_cache.shape[:3]) != (B, Hkv, L):
        raise ValueError(f"decode_attention: v_cache must have shape ({B}, {Hkv}, {L}, Ev) like k_cache "
                         f"{tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"decode_attention: q's heads ({H}) must be a multiple of k_cache's heads ({Hkv})")
    if not isinstance(cache_seqlens, Tensor):
        raise TypeError(f"decode_attention: cache_seqlens must be a Tensor, got {type(cache_seqlens).__name__}")
    if cache_seqlens.dtype not in _LENGTH_DTYPES:
        raise TypeError(f"decode_attention: cache_seqlens must have dtype int32 or int64, got {cache_seqlens.dtype}")
    if tuple(cache_seqlens.shape) != (B,):
        raise ValueError(f"decode_attention: cache_seqlens must have shape ({B},), got {tuple(cache_seqlens.shape)}")
    if not same_device(cache_seqlens, q):
        raise ValueError(f"decode_attention: cache_seqlens is on {cache_seqlens.device} but q is on {q.device}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise TypeError(f"decode_attention: scale must be None or a finite float, got {scale!r}")


def _check_lengths_host(cache_seqlens: Tensor, L: int) -> None:
    """ValueError unless every length is in [0, L] (reads the lengths: CPU, or a sync on CUDA)."""
    if cache_seqlens.numel() == 0:
        return
    lo, hi = (int(x) for x in torch.aminmax(cache_seqlens))
    if lo < 0 or hi > L:
        bad = lo if lo < 0 else hi
        raise ValueError(f"decode_attention: cache_seqlens holds {bad}, outside [0, {L}] (the caches hold "
                         f"Lmax = {L} positions)")


_GRAD_REASON = ("inputs require grad: the native kernel has no backward (use the torch backend, which "
                "is differentiable, or call under torch.no_grad())")


def _native_reasons(key: tuple) -> list:
    reasons = backends.native_reasons(key[0], key[1], _NATIVE_CPU_DTYPES, _NATIVE_CUDA_DTYPES)
    return reasons + ([_GRAD_REASON] if key[2] else [])


# key: (device type, dtype, inputs require grad). Native first on CPU (measured: pydl.bench
# decode_attention) and, unmeasured on a GPU so far, on CUDA.
DISPATCH = backends.Dispatcher("decode_attention", {"native": _native_reasons, "torch": lambda key: []},
                               {"cpu": ("native", "torch"), "cuda": ("native", "torch")})


def choose_backend(q: Tensor, k_cache: Tensor, v_cache: Tensor, backend: Optional[str] = None) -> str:
    """The backend that would run a ``decode_attention`` call on these tensors."""
    grad = torch.is_grad_enabled() and (q.requires_grad or k_cache.requires_grad or v_cache.requires_grad)
    return DISPATCH.choose((device_type(q), q.dtype, grad), backend)


def _scale(q: Tensor, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


# ---- the torch backend ---------------------------------------------------------------------------

def _torch_decode(q, k_cache, v_cache, cache_seqlens, scale):
    """SDPA over the whole cache with a (B, 1, 1, Lmax) key-padding mask. The cache past the lengths
    is zeroed first (masked weights are 0, but 0 * NaN would still be NaN); rows of length 0 give 0
    (SDPA's fully masked rows are not 0 in every torch version)."""
    L = k_cache.shape[2]
    valid = torch.arange(L, device=q.device) < cache_seqlens.to(torch.int64)[:, None]  # (B, Lmax)
    keep = valid[:, None, :, None]  # (B, 1, Lmax, 1)
    k = torch.where(keep, k_cache, 0.0)
    v = torch.where(keep, v_cache, 0.0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :], scale=scale,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return torch.where((cache_seqlens > 0)[:, None, None, None], out, 0.0)


# ---- the native kernels --------------------------------------------------------------------------

def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _native_decode(q, k_cache, v_cache, cache_seqlens, scale):
    """The native kernel on checked arguments: (B, H, 1, Ev) contiguous."""
    B, H, _, E = q.shape
    Hkv, L, Ev = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    out = q.new_empty((B, H, 1, Ev))
    if out.numel() == 0:
        return out
    q, k, v = _unit_last(q), _unit_last(k_cache), _unit_last(v_cache)
    lens = cache_seqlens if cache_seqlens.is_contiguous() else cache_seqlens.contiguous()
    qs, ks, vs = q.stride(), k.stride(), v.stride()
    args = (B, H, Hkv, L, E, Ev, _native.DTYPE_CODES[q.dtype], q.data_ptr(), qs[0], qs[1], k.data_ptr(), ks[0],
            ks[1], ks[2], v.data_ptr(), vs[0], vs[1], vs[2], lens.data_ptr(), _native.INDEX_DTYPE_CODES[lens.dtype],
            out.data_ptr(), H * Ev, Ev, scale)
    c = _native.module()
    if q.is_cuda:
        with _native.cuda_device(q):
            if _DEBUG:
                _check_lengths_host(lens, L)
            n = c.decode_attention_cuda_workspace_floats(B, H, Hkv, L, Ev)
            workspace = q.new_empty(n, dtype=torch.float32) if n else None
            c.decode_attention_cuda(*args, 0 if workspace is None else workspace.data_ptr(),
                                    _native.cuda_stream(q))
    else:
        c.decode_attention_cpu(*args, _native.num_threads())
    return out


@torch.library.custom_op("pydl::decode_attention", mutates_args=())
def decode_attention_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                        scale: float) -> Tensor:
    """The native kernel (traced path); see :func:`decode_attention`. No autograd: inference only."""
    return _native_decode(q, k_cache, v_cache, cache_seqlens, scale)


@decode_attention_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, scale):
    return q.new_empty((q.shape[0], q.shape[1], 1, v_cache.shape[3]))


@torch.library.register_vmap("pydl::decode_attention")
def _(info, in_dims, *args):
    return vmap_by_loop(decode_attention_op, info, in_dims, *args)
