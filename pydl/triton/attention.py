"""Softmax attention (flash-style, online softmax) — Triton kernels and host launchers.

No autograd here: ``pydl/ops/attention.py`` wraps these launchers.

Per (batch b, query head h, kv head hk = h // GROUP), query i, key j (math in float32):
    s_ij  = scale * q_i . k_j + bias_ij             bias: the additive float mask
    s_ij  = -inf where the bool mask is False, where j > i (is_causal, top-left) or j >= len_k
    p_ij  = exp(s_ij - lse_i),  lse_i = log sum_j exp(s_ij)     (+inf for a fully masked row)
    o_i   = sum_j p_ij z_ij v_j                     z_ij = keep_ij / (1 - dropout_p), else 1
Backward (p recomputed from the saved lse; no (N, N) tensor is stored):
    delta_i = do_i . o_i
    dp_ij   = z_ij (do_i . v_j),   ds_ij = p_ij (dp_ij - delta_i)     (= d loss / d bias_ij)
    dv_j    = sum_i p_ij z_ij do_i,  dk_j = scale sum_i ds_ij q_i,  dq_i = scale sum_j ds_ij k_j
A fully masked row (every s_ij = -inf) has l = 0: its output, lse = +inf and every gradient are 0,
as torch's SDPA gives them. Scores live in the log2 domain in the kernels (exp2; the scale and the
additive mask are multiplied by log2(e)); the saved lse is log2-based too.

Layouts: dense q (B, H, Nq, E), k (B, Hkv, Nk, E), v (B, Hkv, Nk, Ev), any strides with a unit
last dim (transposed views of (B, N, H, D) projections are read in place); the mask is an
expanded (B, H, Nq, Nk) view (stride 0 on broadcast dims: never materialized). Varlen: packed
(total, H, E) tensors and int32 cumulative lengths cu_seqlens (B + 1,); the batch stride is 0
and a sequence's tokens start at cu_seqlens[b]. Every kernel addresses a tensor through
(batch, head, token) strides, so one kernel serves both layouts.

Kernels:
  * forward: grid (query blocks, H, B); key blocks in a loop (causal: up to the diagonal).
  * backward dk/dv: grid (key blocks, Hkv, B); loops over the GROUP query heads of its kv head
    (GQA sums there, no atomics) and over query blocks (causal: from the diagonal).
  * backward dq: grid (query blocks, H, B); loops over key blocks; optionally stores ds, the
    gradient of an additive mask that requires grad (the one (N, N) output, only then).
  Every output element is written by exactly one program: the backward is deterministic.

Dropout: keep_ij = philox(seed, ((b * H + h) * Lq + i) * Lk + j) >= dropout_p, Lq / Lk = Nq / Nk
(varlen: the max sequence lengths); the seed is a device tensor drawn from torch's generator,
so ``torch.manual_seed`` reproduces a run and the backward regenerates the forward's mask.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import INTERPRETING, _range

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)
# MASK constexpr: 0 none, 1 bool, 2 additive (pydl/ops/attention.py MASK_*; head dims <= 256 there).


# ---- shared device helpers ---------------------------------------------------------------

if INTERPRETING:
    @triton.jit
    def _dot(a, b, PRECISION: tl.constexpr):
        """tl.dot; the interpreter's mis-multiplies bfloat16 (NumPy has no bfloat16), so it
        multiplies in float32 there: the products of 16-bit floats are exact in float32."""
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
else:
    @triton.jit
    def _dot(a, b, PRECISION: tl.constexpr):
        """tl.dot with float32 accumulation; PRECISION ("ieee", "tf32") matters for float32 only."""
        return tl.dot(a, b, input_precision=PRECISION)

if INTERPRETING:
    @triton.jit
    def _to(x, DTYPE: tl.constexpr):
        """x.to(DTYPE), rounding to nearest even: the interpreter truncates float32 -> bfloat16,
        so there the rounding is done on the bits first (NaN kept)."""
        if DTYPE == tl.bfloat16:
            u = x.to(tl.float32).to(tl.uint32, bitcast=True)
            u = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16) << 16
            x = tl.where(x != x, x, u.to(tl.float32, bitcast=True))
        return x.to(DTYPE)
else:
    @triton.jit
    def _to(x, DTYPE: tl.constexpr):
        """x.to(DTYPE) (compiled kernels round to nearest even)."""
        return x.to(DTYPE)


@triton.jit
def _masked_scores(qk, i, j, len_q, len_k, mask_base, sm_m, sm_n, qk_scale,
                   MASK: tl.constexpr, CAUSAL: tl.constexpr):
    """Scores in the log2 domain, -inf where a key may not be attended. i / j: query / key
    indices, already broadcast to qk's orientation ((M, 1) and (1, N), or transposed)."""
    s = qk * qk_scale
    valid = (i < len_q) & (j < len_k)
    if MASK == 2:
        bias = tl.load(mask_base + i.to(tl.int64) * sm_m + j * sm_n, mask=valid, other=0.0)
        s = s + bias.to(tl.float32) * _LOG2E
    if MASK == 1:
        allowed = tl.load(mask_base + i.to(tl.int64) * sm_m + j * sm_n, mask=valid, other=0)
        valid = valid & (allowed != 0)
    if CAUSAL:
        valid = valid & (j <= i)
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _dropout_keep(seed, bh, i, j, Lq, Lk, dropout_p):
    """The dropout mask: True where p_ij is kept (same bits in forward and backward)."""
    offs = (bh.to(tl.int64) * Lq + i.to(tl.int64)) * Lk + j.to(tl.int64)
    return tl.rand(seed, offs) >= dropout_p


@triton.jit
def _seq_bounds(Cu, b, N, VARLEN: tl.constexpr):
    """(first token, length) of sequence b: from cu_seqlens when VARLEN, else (0, N)."""
    if VARLEN:
        start = tl.load(Cu + b).to(tl.int64)
        length = (tl.load(Cu + b + 1) - start).to(tl.int32)
    else:
        start = 0
        length = N
    return start, length


@triton.jit
def _query_program(H, GROUP, CuQ, CuK, Nq, Nk, VARLEN: tl.constexpr):
    """A (query block, head, batch) program's batch b, head h, b * H + h, kv head, and the first
    token and length of its query and key sequences."""
    h = tl.program_id(1)
    b = tl.program_id(2)
    q0, len_q = _seq_bounds(CuQ, b, Nq, VARLEN)
    k0, len_k = _seq_bounds(CuK, b, Nk, VARLEN)
    return b, h, b * H + h, h // GROUP, q0, len_q, k0, len_k


# ---- forward -----------------------------------------------------------------------------

@triton.jit
def _attn_fwd_kernel(
        Q, K, V, Mask, O, LSE, Seed, CuQ, CuK,
        sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
        sm_b, sm_h, sm_m, sm_n, so_b, so_h, so_n, sl_b, sl_h,
        H, GROUP, Nq, Nk, E, EV, qk_scale, dropout_p,
        MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr):
    b, h, bh, hk, q0, len_q, k0, len_k = _query_program(H, GROUP, CuQ, CuK, Nq, Nk, VARLEN)
    start_m = tl.program_id(0) * BLOCK_M
    if start_m >= len_q:
        return
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n, offs_e, offs_ev = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_E), tl.arange(0, BLOCK_EV)
    b64 = b.to(tl.int64)
    q_base = Q + b64 * sq_b + h.to(tl.int64) * sq_h + q0 * sq_n
    k_base = K + b64 * sk_b + hk.to(tl.int64) * sk_h + k0 * sk_n
    v_base = V + b64 * sv_b + hk.to(tl.int64) * sv_h + k0 * sv_n
    mask_base = Mask + b64 * sm_b + h.to(tl.int64) * sm_h
    row_ok = rows[:, None] < len_q
    q = tl.load(q_base + rows[:, None].to(tl.int64) * sq_n + offs_e[None, :], mask=row_ok & (offs_e[None, :] < E),
                other=0.0)                                                    # (BLOCK_M, BLOCK_E)
    seed = tl.load(Seed) if DROPOUT else 0

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_EV], tl.float32)
    hi = tl.minimum(len_k, start_m + BLOCK_M) if CAUSAL else len_k
    for start_n in _range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        kt = tl.load(k_base + cols[None, :].to(tl.int64) * sk_n + offs_e[:, None],
                     mask=(cols[None, :] < len_k) & (offs_e[:, None] < E), other=0.0)  # (BLOCK_E, BLOCK_N)
        qk = _dot(q, kt, PRECISION)                         # (BLOCK_M, BLOCK_N)
        s = _masked_scores(qk, rows[:, None], cols[None, :], len_q, len_k, mask_base, sm_m, sm_n,
                           qk_scale, MASK, CAUSAL)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing allowed yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_dropout_keep(seed, bh, rows[:, None], cols[None, :], Nq, Nk, dropout_p), p, 0.0)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * sv_n + offs_ev[None, :],
                    mask=(cols[:, None] < len_k) & (offs_ev[None, :] < EV), other=0.0)  # (BLOCK_N, BLOCK_EV)
        acc = acc * alpha[:, None] + _dot(_to(p, v.dtype), v, PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    inv_l = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
    if DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    out = acc * inv_l[:, None]
    o_ptrs = O + b64 * so_b + h.to(tl.int64) * so_h + (q0 + rows[:, None]).to(tl.int64) * so_n + offs_ev[None, :]
    tl.store(o_ptrs, _to(out, O.dtype.element_ty), mask=row_ok & (offs_ev[None, :] < EV))
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + b64 * sl_b + h.to(tl.int64) * sl_h + q0 + rows, lse, mask=rows < len_q)


# ---- backward ----------------------------------------------------------------------------

@triton.jit
def _attn_bwd_dkdv_kernel(
        Q, K, V, Mask, DO, LSE, Delta, DK, DV, Seed, CuQ, CuK,
        sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sm_b, sm_h, sm_m, sm_n,
        sdo_b, sdo_h, sdo_n, sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n, sl_b, sl_h,
        H, GROUP, Nq, Nk, E, EV, qk_scale, sm_scale, dropout_p,
        MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr):
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    q0, len_q = _seq_bounds(CuQ, b, Nq, VARLEN)
    k0, len_k = _seq_bounds(CuK, b, Nk, VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n >= len_k:
        return
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    b64 = b.to(tl.int64)
    col_ok = cols[:, None] < len_k
    k = tl.load(K + b64 * sk_b + hk.to(tl.int64) * sk_h + (k0 + cols[:, None]).to(tl.int64) * sk_n + offs_e[None, :],
                mask=col_ok & (offs_e[None, :] < E), other=0.0)               # (BLOCK_N, BLOCK_E)
    v = tl.load(V + b64 * sv_b + hk.to(tl.int64) * sv_h + (k0 + cols[:, None]).to(tl.int64) * sv_n + offs_ev[None, :],
                mask=col_ok & (offs_ev[None, :] < EV), other=0.0)             # (BLOCK_N, BLOCK_EV)
    seed = tl.load(Seed) if DROPOUT else 0
    inv_keep = 1.0 / (1.0 - dropout_p) if DROPOUT else 1.0

    dk = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_EV], tl.float32)
    lo = (start_n // BLOCK_M) * BLOCK_M if CAUSAL else 0  # causal: query i sees key j iff j <= i
    for g in _range(0, GROUP, 1):
        h = hk * GROUP + g
        bh = b * H + h
        q_base = Q + b64 * sq_b + h.to(tl.int64) * sq_h + q0 * sq_n
        do_base = DO + b64 * sdo_b + h.to(tl.int64) * sdo_h + q0 * sdo_n
        lse_base = LSE + b64 * sl_b + h.to(tl.int64) * sl_h + q0
        delta_base = Delta + b64 * sl_b + h.to(tl.int64) * sl_h + q0
        mask_base = Mask + b64 * sm_b + h.to(tl.int64) * sm_h
        for start_m in _range(lo, len_q, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows[None, :] < len_q
            qt = tl.load(q_base + rows[None, :].to(tl.int64) * sq_n + offs_e[:, None],
                         mask=row_ok & (offs_e[:, None] < E), other=0.0)      # (BLOCK_E, BLOCK_M)
            do = tl.load(do_base + rows[:, None].to(tl.int64) * sdo_n + offs_ev[None, :],
                         mask=(rows[:, None] < len_q) & (offs_ev[None, :] < EV), other=0.0)  # (BLOCK_M, BLOCK_EV)
            lse = tl.load(lse_base + rows, mask=rows < len_q, other=float("inf"))
            delta = tl.load(delta_base + rows, mask=rows < len_q, other=0.0)
            st = _masked_scores(_dot(k, qt, PRECISION), rows[None, :], cols[:, None],
                                len_q, len_k, mask_base, sm_m, sm_n, qk_scale, MASK, CAUSAL)
            pt = tl.exp2(st - lse[None, :])                                   # (BLOCK_N, BLOCK_M)
            dpt = _dot(v, tl.trans(do), PRECISION)          # (BLOCK_N, BLOCK_M)
            if DROPOUT:
                keep = _dropout_keep(seed, bh, rows[None, :], cols[:, None], Nq, Nk, dropout_p)
                dv += _dot(_to(tl.where(keep, pt * inv_keep, 0.0), do.dtype), do, PRECISION)
                dpt = tl.where(keep, dpt * inv_keep, 0.0)
            else:
                dv += _dot(_to(pt, do.dtype), do, PRECISION)
            dst = pt * (dpt - delta[None, :])
            dk += _dot(_to(dst, qt.dtype), tl.trans(qt), PRECISION)

    dk_ptrs = DK + b64 * sdk_b + hk.to(tl.int64) * sdk_h + (k0 + cols[:, None]).to(tl.int64) * sdk_n + offs_e[None, :]
    tl.store(dk_ptrs, _to(dk * sm_scale, DK.dtype.element_ty), mask=col_ok & (offs_e[None, :] < E))
    dv_ptrs = DV + b64 * sdv_b + hk.to(tl.int64) * sdv_h + (k0 + cols[:, None]).to(tl.int64) * sdv_n + offs_ev[None, :]
    tl.store(dv_ptrs, _to(dv, DV.dtype.element_ty), mask=col_ok & (offs_ev[None, :] < EV))


@triton.jit
def _attn_bwd_dq_kernel(
        Q, K, V, Mask, DO, LSE, Delta, DQ, DS, Seed, CuQ, CuK,
        sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sm_b, sm_h, sm_m, sm_n,
        sdo_b, sdo_h, sdo_n, sdq_b, sdq_h, sdq_n, sds_b, sds_h, sds_m, sl_b, sl_h,
        H, GROUP, Nq, Nk, E, EV, qk_scale, sm_scale, dropout_p,
        MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
        STORE_DS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr):
    b, h, bh, hk, q0, len_q, k0, len_k = _query_program(H, GROUP, CuQ, CuK, Nq, Nk, VARLEN)
    start_m = tl.program_id(0) * BLOCK_M
    if start_m >= len_q:
        return
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n, offs_e, offs_ev = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_E), tl.arange(0, BLOCK_EV)
    b64 = b.to(tl.int64)
    row_ok = rows[:, None] < len_q
    q = tl.load(Q + b64 * sq_b + h.to(tl.int64) * sq_h + (q0 + rows[:, None]).to(tl.int64) * sq_n + offs_e[None, :],
                mask=row_ok & (offs_e[None, :] < E), other=0.0)               # (BLOCK_M, BLOCK_E)
    do = tl.load(DO + b64 * sdo_b + h.to(tl.int64) * sdo_h + (q0 + rows[:, None]).to(tl.int64) * sdo_n + offs_ev[None, :],
                 mask=row_ok & (offs_ev[None, :] < EV), other=0.0)            # (BLOCK_M, BLOCK_EV)
    lse = tl.load(LSE + b64 * sl_b + h.to(tl.int64) * sl_h + q0 + rows, mask=rows < len_q, other=float("inf"))
    delta = tl.load(Delta + b64 * sl_b + h.to(tl.int64) * sl_h + q0 + rows, mask=rows < len_q, other=0.0)
    k_base = K + b64 * sk_b + hk.to(tl.int64) * sk_h + k0 * sk_n
    v_base = V + b64 * sv_b + hk.to(tl.int64) * sv_h + k0 * sv_n
    mask_base = Mask + b64 * sm_b + h.to(tl.int64) * sm_h
    ds_base = DS + b64 * sds_b + h.to(tl.int64) * sds_h
    seed = tl.load(Seed) if DROPOUT else 0
    inv_keep = 1.0 / (1.0 - dropout_p) if DROPOUT else 1.0

    dq = tl.zeros([BLOCK_M, BLOCK_E], tl.float32)
    hi = tl.minimum(len_k, start_m + BLOCK_M) if CAUSAL else len_k
    for start_n in _range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols[None, :] < len_k
        kt = tl.load(k_base + cols[None, :].to(tl.int64) * sk_n + offs_e[:, None], mask=col_ok & (offs_e[:, None] < E),
                     other=0.0)                                               # (BLOCK_E, BLOCK_N)
        vt = tl.load(v_base + cols[None, :].to(tl.int64) * sv_n + offs_ev[:, None], mask=col_ok & (offs_ev[:, None] < EV),
                     other=0.0)                                               # (BLOCK_EV, BLOCK_N)
        s = _masked_scores(_dot(q, kt, PRECISION), rows[:, None], cols[None, :],
                           len_q, len_k, mask_base, sm_m, sm_n, qk_scale, MASK, CAUSAL)
        p = tl.exp2(s - lse[:, None])                                         # (BLOCK_M, BLOCK_N)
        dp = _dot(do, vt, PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, rows[:, None], cols[None, :], Nq, Nk, dropout_p)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        ds = p * (dp - delta[:, None])
        if STORE_DS:
            tl.store(ds_base + rows[:, None].to(tl.int64) * sds_m + cols[None, :], ds, mask=row_ok & col_ok)
        dq += _dot(_to(ds, kt.dtype), tl.trans(kt), PRECISION)
    dq_ptrs = DQ + b64 * sdq_b + h.to(tl.int64) * sdq_h + (q0 + rows[:, None]).to(tl.int64) * sdq_n + offs_e[None, :]
    tl.store(dq_ptrs, _to(dq * sm_scale, DQ.dtype.element_ty), mask=row_ok & (offs_e[None, :] < E))


@triton.jit
def _dropout_mask_kernel(Out, Seed, H, Nq, Nk, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """keep (B, H, Nq, Nk) uint8: the dropout mask the attention kernels draw (for tests)."""
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * H + h
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    seed = tl.load(Seed)
    for start_n in _range(0, Nk, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, bh, rows[:, None], cols[None, :], Nq, Nk, dropout_p)
        ptrs = Out + (bh.to(tl.int64) * Nq + rows[:, None]) * Nk + cols[None, :]
        tl.store(ptrs, keep.to(tl.uint8), mask=(rows[:, None] < Nq) & (cols[None, :] < Nk))


# ---- host side ---------------------------------------------------------------------------

class Config(NamedTuple):
    """Launch configuration of one kernel."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


class Strides(NamedTuple):
    """How the kernels address (batch, head, token) of a tensor (its last dim has stride 1)."""

    b: int
    h: int
    n: int


def dense(t: torch.Tensor) -> Strides:
    """(B, H, N, D) tensor."""
    return Strides(t.stride(0), t.stride(1), t.stride(2))


def packed(t: torch.Tensor) -> Strides:
    """(total, H, D) varlen tensor: no batch stride; tokens of sequence b start at cu_seqlens[b]."""
    return Strides(0, t.stride(1), t.stride(0))


# Tiles, set from the public Hopper numbers of flash-style Triton kernels (not yet measured by
# pydl on a GPU: see docs/architecture.md). Keyed by the padded head dim. float32 (IEEE dots:
# FMA code, no tensor cores) uses smaller tiles over 8 warps, picked so that the plain kernels do
# not spill at sm_90 (scripts/check_triton_compile_attention.py).
_FWD_TILES = {64: Config(128, 64, 8, 3), 128: Config(128, 64, 8, 3), 256: Config(64, 64, 8, 2)}
_FWD_TILES_FP32 = {64: Config(64, 32, 8, 2), 128: Config(64, 32, 8, 2), 256: Config(32, 32, 4, 1)}
_DKDV_TILES = {64: Config(32, 128, 8, 3), 128: Config(32, 64, 8, 2), 256: Config(16, 64, 8, 1)}
_DKDV_TILES_FP32 = {64: Config(32, 32, 8, 2), 128: Config(16, 32, 8, 1), 256: Config(16, 32, 8, 1)}
_DQ_TILES = {64: Config(128, 32, 8, 3), 128: Config(64, 32, 8, 2), 256: Config(64, 16, 8, 1)}
_DQ_TILES_FP32 = {64: Config(64, 32, 8, 2), 128: Config(16, 32, 8, 1), 256: Config(16, 32, 8, 1)}
INTERPRETER_CONFIG = Config(16, 16, 1, 1)  # small tiles: the interpreter runs them on NumPy


def head_block(d: int) -> int:
    """The padded (power-of-two, >= 16: tl.dot's minimum) tile width for head dim d."""
    return max(16, triton.next_power_of_2(d))


def config(kernel: str, block_e: int, dtype: torch.dtype) -> Config:
    """Launch configuration of ``kernel`` ("fwd", "dkdv", "dq") for a padded head dim."""
    if INTERPRETING:
        return INTERPRETER_CONFIG
    fp32 = dtype == torch.float32
    table = {"fwd": (_FWD_TILES, _FWD_TILES_FP32), "dkdv": (_DKDV_TILES, _DKDV_TILES_FP32),
             "dq": (_DQ_TILES, _DQ_TILES_FP32)}[kernel][fp32]
    return table[max(64, block_e)]


# On a GPU the launchers autotune: the table's tile and three neighbours (other warp count, one
# stage less, half the key block) are timed once per key below (sizes, flags; Triton adds the
# tensors' dtypes) and the fastest is kept for the process. Read once, at import:
# PYDL_ATTENTION_AUTOTUNE=0 keeps the table's tile (the tests do, for speed).
AUTOTUNE = os.environ.get("PYDL_ATTENTION_AUTOTUNE", "1") not in ("", "0")
_TUNE_KEY = ["Nq", "Nk", "E", "EV", "GROUP", "MASK", "CAUSAL", "DROPOUT", "VARLEN", "PRECISION"]
_TUNED: dict = {}


def candidates(cfg: Config) -> tuple:
    """The autotuner's candidate tiles around the table's ``cfg`` (distinct, cfg first)."""
    near = (cfg, cfg._replace(num_warps=8 if cfg.num_warps == 4 else 4),
            cfg._replace(num_stages=max(1, cfg.num_stages - 1)), cfg._replace(block_n=max(16, cfg.block_n // 2)))
    return tuple(dict.fromkeys(near))


def _launch(kernel, name: str, block_e: int, dtype, grid, *args, **flags) -> None:
    """Run ``kernel`` on ``grid(BLOCK_M, BLOCK_N)``: with the table's tile (interpreter, or
    AUTOTUNE off), else with the fastest of ``candidates`` (measured once per key)."""
    cfg = config(name, block_e, dtype)
    if INTERPRETING or not AUTOTUNE:
        kernel[grid(cfg.block_m, cfg.block_n)](*args, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                              num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags)
        return
    cands = candidates(cfg)
    tuned = _TUNED.get((name, cands))
    if tuned is None:  # outputs are written, never accumulated: re-running a config is harmless
        tuned = _TUNED[(name, cands)] = triton.autotune(
            [triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n}, num_warps=c.num_warps,
                           num_stages=c.num_stages) for c in cands], key=_TUNE_KEY)(kernel)
    tuned[lambda meta: grid(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **flags)


class Problem(NamedTuple):
    """What every kernel of one call is told: sizes, strides of q/k/v/mask, flags."""

    B: int
    H: int
    group: int
    Lq: int         # Nq (dense) or max_seqlen_q (varlen)
    Lk: int
    E: int
    EV: int
    q: Strides
    k: Strides
    v: Strides
    mask: tuple     # (b, h, m, n) strides, zeros without a mask
    mask_kind: int
    causal: bool
    varlen: bool
    scale: float
    dropout_p: float
    precision: str  # tl.dot input precision for float32: "ieee" or "tf32"

    def flags(self, dtype) -> dict:
        return dict(MASK=self.mask_kind, CAUSAL=self.causal, DROPOUT=self.dropout_p > 0.0,
                    VARLEN=self.varlen, PRECISION=self.precision,
                    BLOCK_E=head_block(self.E), BLOCK_EV=head_block(self.EV))


def problem(q, k, v, mask, mask_kind: int, causal: bool, scale: float, dropout_p: float,
            allow_tf32: bool, cu_seqlens_q=None, max_seqlen_q: int = 0, max_seqlen_k: int = 0) -> Problem:
    """Describe a call. Dense: q (B, H, Nq, E), k (B, Hkv, Nk, E), v (B, Hkv, Nk, Ev), mask an
    expanded (B, H, Nq, Nk) view or None. Varlen (cu_seqlens_q given): q (total_q, H, E),
    k / v (total_k, Hkv, E / Ev), no mask. The op layer has checked shapes and dtypes."""
    varlen = cu_seqlens_q is not None
    if varlen:
        B, H, Hkv = cu_seqlens_q.shape[0] - 1, q.shape[1], k.shape[1]
        Lq, Lk = int(max_seqlen_q), int(max_seqlen_k)
        sq, sk, sv = packed(q), packed(k), packed(v)
    else:
        B, H, Lq, _ = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        sq, sk, sv = dense(q), dense(k), dense(v)
    ms = tuple(mask.stride()) if mask is not None else (0, 0, 0, 0)
    precision = "tf32" if allow_tf32 else "ieee"
    return Problem(B, H, H // Hkv, Lq, Lk, q.shape[-1], v.shape[-1], sq, sk, sv, ms, mask_kind,
                   bool(causal), varlen, float(scale), float(dropout_p), precision)


def _mask_arg(mask, q):
    if mask is None:
        return q  # never read (MASK = 0)
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def attention_fwd(P: Problem, q, k, v, mask, seed, cu_q=None, cu_k=None):
    """Returns (o, lse). Dense: o (B, H, Nq, Ev) as a transposed view of (B, Nq, H, Ev) memory
    (what the output projection reads), lse (B, H, Nq) float32. Varlen: o (total_q, H, Ev),
    lse (H, total_q). lse is log2-based; +inf marks a fully masked row."""
    if P.varlen:
        o = q.new_empty((q.shape[0], P.H, P.EV))
        lse = q.new_empty((P.H, q.shape[0]), dtype=torch.float32)
        so, sl = packed(o), (0, lse.stride(0))
    else:
        o = q.new_empty((P.B, P.Lq, P.H, P.EV)).transpose(1, 2)
        lse = q.new_empty((P.B, P.H, P.Lq), dtype=torch.float32)
        so, sl = dense(o), (lse.stride(0), lse.stride(1))
    if o.numel() == 0:
        return o, lse
    cu_q, cu_k = (cu_q, cu_k) if P.varlen else (lse, lse)  # never read when dense
    _launch(_attn_fwd_kernel, "fwd", head_block(max(P.E, P.EV)), q.dtype,
            lambda bm, bn: (triton.cdiv(P.Lq, bm), P.H, P.B),
            q, k, v, _mask_arg(mask, q), o, lse, seed if seed is not None else lse, cu_q, cu_k,
            *P.q, *P.k, *P.v, *P.mask, *so, *sl,
            P.H, P.group, P.Lq, P.Lk, P.E, P.EV, P.scale * LOG2E, P.dropout_p, **P.flags(q.dtype))
    return o, lse


def attention_bwd(P: Problem, do, q, k, v, mask, o, lse, seed, need_dmask: bool, cu_q=None, cu_k=None):
    """Returns (dq, dk, dv, ds): gradients in q / k / v's shapes and dtypes (contiguous), ds the
    (B, H, Nq, Nk) float32 gradient of the scores (= of an additive mask) when need_dmask, else None."""
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if P.varlen:
        delta = (o.float() * do.float()).sum(-1).t().contiguous()             # (H, total_q)
        sl, sdq, sdk, sdv, sdo = (0, delta.stride(0)), packed(dq), packed(dk), packed(dv), packed(do)
    else:
        delta = (o.float() * do.float()).sum(-1)                               # (B, H, Nq)
        sl, sdq, sdk, sdv, sdo = (delta.stride(0), delta.stride(1)), dense(dq), dense(dk), dense(dv), dense(do)
    ds = q.new_zeros((P.B, P.H, P.Lq, P.Lk), dtype=torch.float32) if need_dmask else None
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), ds
    flags = P.flags(q.dtype)
    seed = seed if seed is not None else delta
    common = (*P.q, *P.k, *P.v, *P.mask, *sdo)
    sizes = (P.H, P.group, P.Lq, P.Lk, P.E, P.EV, P.scale * LOG2E, P.scale, P.dropout_p)
    mask_arg = _mask_arg(mask, q)

    cu_q, cu_k = (cu_q, cu_k) if P.varlen else (delta, delta)  # never read when dense
    block_e = head_block(max(P.E, P.EV))
    _launch(_attn_bwd_dkdv_kernel, "dkdv", block_e, q.dtype, lambda bm, bn: (triton.cdiv(P.Lk, bn), P.H // P.group, P.B),
            q, k, v, mask_arg, do, lse, delta, dk, dv, seed, cu_q, cu_k, *common, *sdk, *sdv, *sl, *sizes, **flags)
    sds = (ds.stride(0), ds.stride(1), ds.stride(2)) if ds is not None else (0, 0, 0)
    _launch(_attn_bwd_dq_kernel, "dq", block_e, q.dtype, lambda bm, bn: (triton.cdiv(P.Lq, bm), P.H, P.B),
            q, k, v, mask_arg, do, lse, delta, dq, ds if ds is not None else delta, seed, cu_q, cu_k,
            *common, *sdq, *sds, *sl, *sizes, STORE_DS=need_dmask, **flags)
    return dq, dk, dv, ds


def dropout_keep_mask(seed: torch.Tensor, B: int, H: int, Nq: int, Nk: int, dropout_p: float) -> torch.Tensor:
    """The (B, H, Nq, Nk) bool mask of kept attention weights that the kernels draw for ``seed``."""
    out = torch.empty((B, H, Nq, Nk), dtype=torch.uint8, device=seed.device)
    if out.numel():
        _dropout_mask_kernel[(triton.cdiv(Nq, 16), H, B)](out, seed, H, Nq, Nk, float(dropout_p),
                                                           BLOCK_M=16, BLOCK_N=64)
    return out.bool()
