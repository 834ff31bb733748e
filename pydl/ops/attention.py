"""Softmax attention: ``attention`` ≡ ``F.scaled_dot_product_attention`` (and the shared machinery
of ``attention_varlen``, pydl/ops/attention_varlen.py).

    attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        == F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)

q (B, H, Nq, E), k (B, Hkv, Nk, E), v (B, Hkv, Nk, Ev) -> (B, H, Nq, Ev), SDPA's semantics: a bool
mask (True = takes part) or an additive float mask (float32 or q's dtype; -inf allowed),
broadcastable to (B, H, Nq, Nk) and read through its strides; ``is_causal`` aligned top-left
(``tril(diagonal=0)``, also when Nq != Nk); a fully masked row gives 0 output and 0 gradient;
scale 1/sqrt(E) by default; GQA when ``enable_gqa`` (H % Hkv == 0; Hkv == 1 broadcasts as in
SDPA); dropout on the attention weights, rescaled by 1/(1 - p).

Backends: ``triton`` (pydl/triton/attention.py: one fused forward saving the log-sum-exp, a
deterministic two-kernel backward) on CUDA, or on CPU under the Triton interpreter when forced;
``torch`` (SDPA itself, with torch's autograd and torch's dropout RNG) everywhere else: float64,
head dims > 256, ranks other than 4, batch broadcasting. No native CPU kernel: torch's CPU SDPA
(a flash-style C++ kernel) is what a CPU kernel would have to beat.

The triton backend's dropout draws its mask from a seed taken from torch's generator (so
``torch.manual_seed`` reproduces it) with Philox; the backward regenerates the same mask.
:func:`dropout_mask` returns it, for tests and debugging.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends
from ._common import (EAGER, EAGER_GRAD, device_type, differentiable_grads, eager_apply, eager_mode,
                      in_functorch_transform, vmap_by_loop)

MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2  # the kernels' mask kinds (pydl/triton/attention.py)
MAX_HEAD_DIM = 256
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---- public API ------------------------------------------------------------------------------

def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False, *,
              backend: Optional[str] = None) -> Tensor:
    """Scaled dot-product attention, as ``F.scaled_dot_product_attention``.

    q (B, H, Nq, E), k (B, Hkv, Nk, E), v (B, Hkv, Nk, Ev); any strides with a unit last dim
    (others are copied). Returns (B, H, Nq, Ev) in q's dtype. ``backend`` forces "triton" or "torch".
    """
    _check_args(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    name = DISPATCH.choose(_key(q, k, v, dropout_p), backend)
    if name == "torch":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    mask, kind = _expand_mask(attn_mask, q, k)
    return run(q, k, v, mask, kind, is_causal, _scale(q, scale), dropout_p, None, None, 0, 0)[0]


def attention_ref(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                  is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False, *,
                  keep: Optional[Tensor] = None) -> Tensor:
    """The float64 reference: softmax(q k^T * scale + mask) v composed of torch ops.

    keep: the (broadcastable to (B, H, Nq, Nk)) bool dropout mask to apply (weights rescaled by
    1/(1 - dropout_p)); without it dropout_p must be 0. Fully masked rows give 0. Returns float64.
    """
    q, k, v = q.double(), k.double(), v.double()
    mask = attn_mask.double() if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
    p = _weights(q, k, mask, is_causal, _scale(q, scale), enable_gqa)
    if keep is not None:
        p = torch.where(keep, p / (1.0 - dropout_p), 0.0)
    elif dropout_p:
        raise ValueError("attention_ref: dropout_p > 0 needs the dropout mask (keep=)")
    return p @ _repeat_kv(v, q.shape[-3], enable_gqa)


def dropout_mask(seed: Tensor, shape: tuple, dropout_p: float) -> Tensor:
    """The bool mask (B, H, Nq, Nk) of attention weights the triton backend keeps for ``seed``."""
    from ..triton.attention import dropout_keep_mask

    return dropout_keep_mask(seed, *shape, dropout_p)


# ---- the torch composition (reference, double backward) ----------------------------------------

def _repeat_kv(t: Tensor, heads: int, enable_gqa: bool) -> Tensor:
    if t.dim() >= 3 and enable_gqa and t.shape[-3] != heads:
        return t.repeat_interleave(heads // t.shape[-3], dim=-3)
    return t


def _weights(q, k, mask, is_causal: bool, scale: float, enable_gqa: bool) -> Tensor:
    """softmax(q k^T * scale + mask) with masked-out entries and fully masked rows exactly 0."""
    s = (q @ _repeat_kv(k, q.shape[-3], enable_gqa).transpose(-2, -1)) * scale
    nq, nk = s.shape[-2], s.shape[-1]
    allowed = None
    if is_causal:
        allowed = torch.ones(nq, nk, dtype=torch.bool, device=s.device).tril()
    if mask is not None and mask.dtype == torch.bool:
        allowed = mask if allowed is None else allowed & mask
    elif mask is not None:
        s = s + mask
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    if nk == 0:
        return s
    row_max = s.amax(-1, keepdim=True)
    dead = row_max == float("-inf")  # a fully masked row: 0, as SDPA gives it
    p = torch.exp(s - torch.where(dead, 0.0, row_max))
    return p / torch.where(dead, 1.0, p.sum(-1, keepdim=True))


def _composition(q, k, v, mask, kind, is_causal, scale, dropout_p, keep):
    """The kernels' function of (q, k, v, expanded mask) in torch ops (double backward)."""
    p = _weights(q, k, mask if kind != MASK_NONE else None, is_causal, scale, True)
    if keep is not None:
        p = torch.where(keep, p / (1.0 - dropout_p), 0.0)
    return p @ _repeat_kv(v, q.shape[-3], True)


# ---- argument checks and backend choice --------------------------------------------------------

def _check_args(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> None:
    """SDPA's argument rules, as ValueError / TypeError naming the argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"attention: {name} must be a Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"attention: {name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.dim() < 2:
            raise ValueError(f"attention: {name} must have at least 2 dims (..., N, E), got shape {tuple(t.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"attention: q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"attention: q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.dim() == k.dim() == v.dim()):
        raise ValueError(f"attention: q, k and v must have the same rank, got shapes {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"attention: head dims of q and k differ: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"attention: k and v must have the same sequence length, got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if q.dim() >= 3:
        h, hkv = q.shape[-3], k.shape[-3]
        if v.shape[-3] != hkv:
            raise ValueError(f"attention: k and v must have the same number of heads, got {hkv} and {v.shape[-3]}")
        if enable_gqa and (hkv == 0 or h % hkv):
            raise ValueError(f"attention: enable_gqa needs q's heads ({h}) to be a multiple of k/v's heads ({hkv})")
        if not enable_gqa and hkv not in (h, 1):
            raise ValueError(f"attention: q has {h} heads and k/v {hkv}: pass enable_gqa=True for grouped-query attention")
    if attn_mask is not None:
        _check_mask(attn_mask, q, k)
        if is_causal:
            raise ValueError("attention: pass either attn_mask or is_causal=True, not both (as SDPA)")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"attention: dropout_p must be a number in [0, 1], got {dropout_p!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise TypeError(f"attention: scale must be None or a finite float, got {scale!r}")


def _check_mask(attn_mask, q, k) -> None:
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"attention: attn_mask must be a Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and attn_mask.dtype not in (torch.float32, q.dtype):
        raise TypeError(f"attention: attn_mask must be bool, float32 or q's dtype ({q.dtype}), got {attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise ValueError(f"attention: attn_mask is on {attn_mask.device} but q is on {q.device}")
    full = (*q.shape[:-1], k.shape[-2])
    try:
        torch.broadcast_shapes(attn_mask.shape, full)
        ok = attn_mask.dim() <= len(full)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"attention: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to the "
                         f"scores' shape {full}")


def _key(q, k, v, dropout_p) -> tuple:
    """(device type, dtype, why the kernels cannot take this call's shape or None)."""
    if q.dim() != 4:
        return kernel_key(q, v, dropout_p, f"the kernels take (B, H, N, E) tensors, got rank {q.dim()}")
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        return kernel_key(q, v, dropout_p, "k/v batch broadcast against q")
    return kernel_key(q, v, dropout_p)


def kernel_key(q, v, dropout_p, issue: Optional[str] = None) -> tuple:
    """The dispatch key of a dense or varlen call: (device type, dtype, the first reason the
    kernels cannot take it — ``issue``, a head dim above 256, dropout_p = 1 — or None)."""
    if issue is None and max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        issue = f"head dim > {MAX_HEAD_DIM}"
    elif issue is None and dropout_p >= 1.0:
        issue = "dropout_p = 1"
    return device_type(q), q.dtype, issue


def _triton_reasons(key: tuple) -> list:
    reasons = backends.triton_reasons(key[0], key[1], _TRITON_DTYPES)
    return reasons + ([key[2]] if key[2] else [])


# Unmeasured on a GPU so far: triton first on CUDA (SDPA's fast backends refuse masks, fp32 and
# odd head dims); torch's SDPA on CPU. Revisit with benchmarks/results (docs/architecture.md).
DISPATCH = backends.Dispatcher("attention", {"triton": _triton_reasons, "torch": lambda key: []},
                               {"cpu": ("torch",), "cuda": ("triton", "torch")})


def choose_backend(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, backend: Optional[str] = None) -> str:
    """The backend that would run an ``attention`` call on these tensors."""
    return DISPATCH.choose(_key(q, k, v, dropout_p), backend)


def _unit_last_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _scale(q: Tensor, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _expand_mask(attn_mask: Optional[Tensor], q: Tensor, k: Tensor) -> tuple:
    """(the mask as a (B, H, Nq, Nk) view — stride 0 on broadcast dims, no copy —, its kind)."""
    if attn_mask is None:
        return None, MASK_NONE
    B, H, Nq, _ = q.shape
    mask = attn_mask.expand(B, H, Nq, k.shape[2])
    return mask, (MASK_BOOL if mask.dtype == torch.bool else MASK_ADD)


def _new_seed(q: Tensor) -> Tensor:
    """A (1,) int64 seed from torch's generator of q's device (no host sync)."""
    return torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=q.device)


# ---- running the kernels: eager fast path, functorch, custom ops --------------------------------

def run(q, k, v, mask, kind, is_causal, scale, dropout_p, cu_q, cu_k, max_q, max_k) -> tuple:
    """(o, lse) of the triton backend for checked, prepared arguments (dense or varlen)."""
    seed = _new_seed(q) if dropout_p > 0.0 else None
    tf32 = bool(q.dtype == torch.float32 and q.is_cuda and torch.backends.cuda.matmul.allow_tf32)
    args = (q, k, v, mask, kind, bool(is_causal), float(scale), float(dropout_p), seed, cu_q, cu_k,
            int(max_q), int(max_k), tf32)
    mode = eager_mode((q, k, v, mask))
    if mode == EAGER:
        return _triton_fwd(*args)
    if mode == EAGER_GRAD:
        return _eager_attention_apply(*args)
    if in_functorch_transform():
        return _FunctorchAttention.apply(*args)
    return torch.ops.pydl.attention_fwd(*args)


def _problem(q, k, v, mask, kind, is_causal, scale, dropout_p, cu_q, max_q, max_k, tf32):
    from ..triton import attention as kernels  # imports triton: only when the backend runs

    return kernels, kernels.problem(q, k, v, mask, kind, is_causal, scale, dropout_p, tf32, cu_q, max_q, max_k)


def _triton_fwd(q, k, v, mask, kind, is_causal, scale, dropout_p, seed, cu_q, cu_k, max_q, max_k, tf32):
    kernels, P = _problem(q, k, v, mask, kind, is_causal, scale, dropout_p, cu_q, max_q, max_k, tf32)
    return kernels.attention_fwd(P, q, k, v, mask, seed, cu_q, cu_k)


def _triton_bwd(do, q, k, v, mask, o, lse, kind, is_causal, scale, dropout_p, seed, cu_q, cu_k, max_q,
                max_k, tf32, need_dmask):
    kernels, P = _problem(q, k, v, mask, kind, is_causal, scale, dropout_p, cu_q, max_q, max_k, tf32)
    do = _unit_last_stride(do)
    return kernels.attention_bwd(P, do, q, k, v, mask, o, lse, seed, need_dmask, cu_q, cu_k)


def _save(ctx, inputs, output) -> None:
    q, k, v, mask, kind, is_causal, scale, dropout_p, seed, cu_q, cu_k, max_q, max_k, tf32 = inputs
    o, lse = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, mask, o, lse, seed, cu_q, cu_k)
    ctx.meta = (kind, is_causal, scale, dropout_p, max_q, max_k, tf32)


def _grads(ctx, do, bwd, differentiable: bool) -> tuple:
    """(dq, dk, dv, dmask) + Nones for the non-tensor inputs; ``bwd`` runs the backward kernels."""
    q, k, v, mask, o, lse, seed, cu_q, cu_k = ctx.saved_tensors
    kind, is_causal, scale, dropout_p, max_q, max_k, tf32 = ctx.meta
    none = (None,) * 10
    if do is None:
        return (None, None, None, None) + none
    need_dmask = bool(kind == MASK_ADD and ctx.needs_input_grad[3])
    if differentiable and cu_q is None:
        keep = (dropout_mask(seed, tuple(q.shape[:3]) + (k.shape[2],), dropout_p)
                if seed is not None else None)
        fn = lambda q_, k_, v_, m_: (_composition(q_, k_, v_, m_, kind, is_causal, scale, dropout_p, keep),)  # noqa: E731
        dq, dk, dv, dmask = differentiable_grads(fn, (q, k, v, mask if need_dmask else None), (do,))
        return (dq, dk, dv, dmask) + none
    if differentiable:
        raise RuntimeError("attention_varlen: double backward is not supported (the backward runs "
                           "fused kernels); use the torch backend for higher-order gradients")
    dq, dk, dv, ds = bwd(do, q, k, v, mask, o, lse, kind, is_causal, scale, dropout_p, seed, cu_q, cu_k,
                         max_q, max_k, tf32, need_dmask)
    dmask = ds.to(mask.dtype) if need_dmask else None
    return (dq, dk, dv, dmask) + none


class _EagerAttention(torch.autograd.Function):
    """The eager fast path with a gradient: kernels called directly (a classic Function)."""

    @staticmethod
    def forward(ctx, *args):
        o, lse = _triton_fwd(*args)
        _save(ctx, args, (o, lse))
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        return _grads(ctx, do, _triton_bwd, torch.is_grad_enabled())


_eager_attention_apply = eager_apply(_EagerAttention)


class _FunctorchAttention(torch.autograd.Function):
    """Inside torch.func transforms: the custom ops, whose vmap rules the generated rule uses."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        return torch.ops.pydl.attention_fwd(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, inputs, output)

    @staticmethod
    def backward(ctx, do, _dlse):
        with torch.no_grad():
            return _grads(ctx, do, _bwd_op, False)


def _bwd_op(*args):
    dq, dk, dv, ds = torch.ops.pydl.attention_bwd(*args)
    return dq, dk, dv, (ds if args[-1] else None)


@torch.library.custom_op("pydl::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], kind: int, is_causal: bool,
                  scale: float, dropout_p: float, seed: Optional[Tensor], cu_q: Optional[Tensor],
                  cu_k: Optional[Tensor], max_q: int, max_k: int, tf32: bool) -> tuple[Tensor, Tensor]:
    """(o, lse) of the triton kernels; see pydl/triton/attention.py for layouts."""
    return _triton_fwd(q, k, v, mask, kind, is_causal, scale, dropout_p, seed, cu_q, cu_k, max_q, max_k, tf32)


@attention_fwd.register_fake
def _(q, k, v, mask, kind, is_causal, scale, dropout_p, seed, cu_q, cu_k, max_q, max_k, tf32):
    ev = v.shape[-1]
    if cu_q is not None:  # varlen: o (total_q, H, Ev), lse (H, total_q)
        return q.new_empty((q.shape[0], q.shape[1], ev)), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    B, H, Nq, _ = q.shape
    return q.new_empty((B, Nq, H, ev)).transpose(1, 2), q.new_empty((B, H, Nq), dtype=torch.float32)


@torch.library.custom_op("pydl::attention_bwd", mutates_args=())
def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], o: Tensor, lse: Tensor,
                  kind: int, is_causal: bool, scale: float, dropout_p: float, seed: Optional[Tensor],
                  cu_q: Optional[Tensor], cu_k: Optional[Tensor], max_q: int, max_k: int, tf32: bool,
                  need_dmask: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, ds): ds is the (B, H, Nq, Nk) float32 score gradient if need_dmask, else empty."""
    dq, dk, dv, ds = _triton_bwd(do, q, k, v, mask, o, lse, kind, is_causal, scale, dropout_p, seed, cu_q,
                                 cu_k, max_q, max_k, tf32, need_dmask)
    return dq, dk, dv, (ds if ds is not None else q.new_empty(0, dtype=torch.float32))


@attention_bwd.register_fake
def _(do, q, k, v, mask, o, lse, kind, is_causal, scale, dropout_p, seed, cu_q, cu_k, max_q, max_k, tf32,
      need_dmask):
    ds = (q.new_empty((q.shape[0], q.shape[1], max_q if cu_q is not None else q.shape[2],
                       max_k if cu_q is not None else k.shape[2]), dtype=torch.float32)
          if need_dmask else q.new_empty(0, dtype=torch.float32))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), ds


def _setup_context(ctx, inputs, output):
    _save(ctx, inputs, output)


def _backward(ctx, do, _dlse):
    return _grads(ctx, do, _bwd_op, torch.is_grad_enabled())


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# vmap (torch.func.vmap, and jacrev's batch of cotangents): dense attention without a mask or dropout
# is independent per batch entry, so the vmapped dim joins the batch dim — one kernel call instead
# of one per entry (jacrev of a (2, 2, 5, 16) output makes 320 of them); anything else (masks,
# which may broadcast over the batch; dropout, whose random stream is per batch entry; varlen) is
# looped.

def _fold_batch(t: Tensor, dim: Optional[int], size: int) -> Tensor:
    """(size·B, ...) from t with its vmapped dim ``dim`` (None: shared by every entry; then a view
    with batch stride 0 where B == 1, else a copy)."""
    t = t.movedim(dim, 0) if dim is not None else t.expand(size, *t.shape)
    return t.flatten(0, 1)


def _batch_wise(mask, dropout_p, cu_q) -> bool:
    return mask is None and dropout_p == 0.0 and cu_q is None


@torch.library.register_vmap("pydl::attention_fwd")
def _(info, in_dims, q, k, v, mask, kind, is_causal, scale, dropout_p, seed, cu_q, cu_k, max_q, max_k, tf32):
    if not _batch_wise(mask, dropout_p, cu_q):
        return vmap_by_loop(attention_fwd, info, in_dims, q, k, v, mask, kind, is_causal, scale, dropout_p, seed,
                            cu_q, cu_k, max_q, max_k, tf32)
    n = info.batch_size
    q, k, v = (_fold_batch(t, d, n) for t, d in zip((q, k, v), in_dims[:3]))
    o, lse = attention_fwd(q, k, v, None, kind, is_causal, scale, 0.0, seed, None, None, max_q, max_k, tf32)
    return (o.unflatten(0, (n, -1)), lse.unflatten(0, (n, -1))), (0, 0)


@torch.library.register_vmap("pydl::attention_bwd")
def _(info, in_dims, do, q, k, v, mask, o, lse, kind, is_causal, scale, dropout_p, seed, cu_q, cu_k, max_q, max_k,
      tf32, need_dmask):
    args = (do, q, k, v, mask, o, lse, kind, is_causal, scale, dropout_p, seed, cu_q, cu_k, max_q, max_k, tf32,
            need_dmask)
    if not _batch_wise(mask, dropout_p, cu_q):
        return vmap_by_loop(attention_bwd, info, in_dims, *args)
    n = info.batch_size
    dims = in_dims[:4] + in_dims[5:7]  # do, q, k, v, o, lse
    do, q, k, v, o, lse = (_fold_batch(t, d, n) for t, d in zip((do, q, k, v, o, lse), dims))
    lse = lse.contiguous()  # the kernels read lse with the strides of delta (contiguous), never 0
    dq, dk, dv, ds = attention_bwd(do, q, k, v, None, o, lse, kind, is_causal, scale, 0.0, seed, None, None,
                                   max_q, max_k, tf32, need_dmask)
    grads = tuple(t.unflatten(0, (n, -1)) for t in (dq, dk, dv))
    if need_dmask:
        return (*grads, ds.unflatten(0, (n, -1))), (0, 0, 0, 0)
    return (*grads, ds), (0, 0, 0, None)
