"""Dense 2-D convolution as implicit GEMM — Triton kernels and host launchers.

No autograd here: ``pydl/ops/conv2d.py`` wraps these launchers.

Notation: x (N, C, H, W), weight (Cout, Cin_g, KH, KW), G groups (Cin_g = C / G, Cout_g = Cout / G),
y (N, Cout, Ho, Wo); stride (sh, sw), top/left padding (ph, pw) (the bottom/right padding only
shows in Ho/Wo, so the asymmetric "same" padding of even kernels needs nothing else), dilation
(dh, dw). Every tensor is addressed through its four logical strides, so one kernel serves every
layout; the launchers hand the kernels x and dy in channels_last memory (channels innermost: the
GEMM's K dim is contiguous and loads vectorize; an NCHW input is converted once, one copy of x —
a strided read would gather elements H·W apart) and the weight in (Cout, KH, KW, Cin_g) memory
(``channels_last`` of the weight); outputs are written in the memory format asked for.

Kernels (per group g, a program id axis; fp32 accumulation in every dtype):
  * forward   ``_conv_fwd_kernel``: M = N·Ho·Wo output positions, N = Cout_g, K = KH·KW·Cin_g
    ordered (kh, kw, ci). Per tap (kh, kw) the input rows are shifted and masked (padding), then
    Cin_g is walked in BLOCK_K chunks: one flattened loop over (tap, chunk). FLAT (small or odd
    Cin_g, e.g. the RGB stem): K is walked as one flat range and each element decodes its
    (kh, kw, ci) — no padding of a 3-channel tap to a 16-wide MMA.
  * data grad ``_conv_dx_kernel``: M = N·H·W input positions, N = Cin_g, K = (taps, Cout_g).
    A gather over *valid* taps only: with stride s > 1 the input positions are split into the
    sh·sw phases (ih mod sh, iw mod sw) (grid axis 1); in a phase exactly the taps with
    kh·dh ≡ ih + ph (mod sh) reach an output row, an arithmetic progression kh0 + j·sh/gcd(sh, dh)
    computed per program (no per-element stride test, no wasted MMAs), and oh = (ih + ph - kh·dh)/sh
    is exact. Each dx element is written by exactly one program (positions no output reads get 0).
  * weight grad ``_conv_dw_kernel``: M = Cout_g, N = KH·KW·Cin_g, K = N·Ho·Wo positions, split
    into SPLIT contiguous chunks (grid axis 1) whose fp32 partials are stored to a
    (SPLIT, Cout, KH·KW·Cin_g) buffer and summed by the launcher in a fixed order: deterministic,
    no atomics (bitwise identical run to run for a given launch configuration).
  * 1×1 fast path ``_gemm_kernel``: stride 1, no padding, 1×1 kernels are plain batched GEMMs over
    the N·H·W positions (forward y = x·Wᵀ, data grad dx = dy·W, weight grad dW = dyᵀ·x with the
    same deterministic split-K), used when the positions of the operands collapse to one stride
    (channels_last memory).
Precision: fp16/bf16 operands on tensor cores, fp32 accumulation; fp32 as IEEE FMA dots unless
the op passes PRECISION="tf32" (torch.backends.cudnn.allow_tf32, the flag F.conv2d obeys).
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import INTERPRETING, _range

# ---- shared device helpers (the interpreter's bfloat16 quirks, as in pydl/triton/attention.py) ----

if INTERPRETING:
    @triton.jit
    def _dot(a, b, PRECISION: tl.constexpr):
        """tl.dot; the interpreter mis-multiplies bfloat16 (NumPy has no bfloat16), so it
        multiplies in float32 there: the products of 16-bit floats are exact in float32."""
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")

    @triton.jit
    def _to(x, DTYPE: tl.constexpr):
        """x.to(DTYPE) rounding to nearest even (the interpreter truncates float32 -> bfloat16)."""
        if DTYPE == tl.bfloat16:
            u = x.to(tl.float32).to(tl.uint32, bitcast=True)
            u = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16) << 16
            x = tl.where(x != x, x, u.to(tl.float32, bitcast=True))
        return x.to(DTYPE)
else:
    @triton.jit
    def _dot(a, b, PRECISION: tl.constexpr):
        """tl.dot with float32 accumulation; PRECISION ("ieee", "tf32") matters for float32 only."""
        return tl.dot(a, b, input_precision=PRECISION)

    @triton.jit
    def _to(x, DTYPE: tl.constexpr):
        return x.to(DTYPE)


@triton.jit
def _tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid``: GROUP_M row tiles share their column tiles (L2 reuse)."""
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


# ---- forward -------------------------------------------------------------------------------------

@triton.jit
def _conv_fwd_kernel(
        X, Wt, Bias, Y,
        N, H, W, HO, WO, COUT_G, CIN_G,
        sxn, sxc, sxh, sxw, swo, swc, swh, sww, syn, syc, syh, syw,
        STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
        KH: tl.constexpr, KW: tl.constexpr, FLAT: tl.constexpr, HAS_BIAS: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr):
    g = tl.program_id(1)
    M = N * HO * WO
    pid_m, pid_n = _tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(COUT_G, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                      # output positions (n, oh, ow)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                      # output channels of group g
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < COUT_G
    img = rm // (HO * WO)
    oh = (rm % (HO * WO)) // WO
    ow = rm % WO
    ih0 = oh * STRIDE_H - PAD_H
    iw0 = ow * STRIDE_W - PAD_W
    x_row = X + img.to(tl.int64) * sxn + (g * CIN_G).to(tl.int64) * sxc    # (BLOCK_M,) pointers
    co = g * COUT_G + rn
    w_col = Wt + co.to(tl.int64) * swo                                 # (BLOCK_N,) pointers
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if FLAT:
        KTOT = KH * KW * CIN_G
        for k0 in _range(0, KTOT, BLOCK_K):
            kk = k0 + rk                                               # k = (kh·KW + kw)·Cin_g + ci
            k_ok = kk < KTOT
            ci = kk % CIN_G
            tap = kk // CIN_G
            kh = tap // KW
            kw = tap % KW
            ih = ih0[:, None] + (kh * DIL_H)[None, :]
            iw = iw0[:, None] + (kw * DIL_W)[None, :]
            a_ok = m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(x_row[:, None] + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw + ci[None, :] * sxc,
                        mask=a_ok, other=0.0)                          # (BLOCK_M, BLOCK_K)
            b = tl.load(w_col[None, :] + (ci * swc + kh * swh + kw * sww)[:, None],
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
            acc += _dot(a, b, PRECISION)
    else:
        ci_blocks = tl.cdiv(CIN_G, BLOCK_K)
        for it in _range(0, KH * KW * ci_blocks, 1):
            tap = it // ci_blocks
            c0 = (it - tap * ci_blocks) * BLOCK_K
            kh = tap // KW
            kw = tap - kh * KW
            ih = ih0 + kh * DIL_H
            iw = iw0 + kw * DIL_W
            r_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            ci = c0 + rk
            k_ok = ci < CIN_G
            a_ptr = x_row + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
            a = tl.load(a_ptr[:, None] + ci[None, :] * sxc, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_col[None, :] + (ci * swc)[:, None] + (kh * swh + kw * sww),
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc += _dot(a, b, PRECISION)
    if HAS_BIAS:
        acc += tl.load(Bias + co, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_row = Y + img.to(tl.int64) * syn + oh.to(tl.int64) * syh + ow.to(tl.int64) * syw
    tl.store(y_row[:, None] + co[None, :].to(tl.int64) * syc, _to(acc, Y.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


# ---- data gradient -------------------------------------------------------------------------------

@triton.jit
def _first_tap(r, PAD, STRIDE, GCD, STEP, INV, K: tl.constexpr):
    """(first tap k0, number of taps) with k·DIL ≡ r + PAD (mod STRIDE), k in [0, K): the taps
    k0, k0 + STEP, ... (STEP = STRIDE / gcd(STRIDE, DIL), INV = (DIL / gcd)^-1 mod STEP)."""
    c = (r + PAD) % STRIDE
    k0 = ((c // GCD) * INV) % STEP
    count = tl.where((c % GCD == 0) & (k0 < K), (K - k0 + STEP - 1) // STEP, 0)
    return k0, count


@triton.jit
def _conv_dx_kernel(
        DY, Wt, DX,
        N, H, W, HO, WO, COUT_G, CIN_G,
        sdn, sdc, sdh, sdw, swo, swc, swh, sww, sxn, sxc, sxh, sxw,
        STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
        GCD_H, STEP_H, INV_H, GCD_W, STEP_W, INV_W,
        KH: tl.constexpr, KW: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    phase = tl.program_id(1)
    g = tl.program_id(2)
    rh = phase // STRIDE_W                                             # this program's positions:
    rw = phase % STRIDE_W                                              # ih ≡ rh, iw ≡ rw (mod stride)
    HP = (H - rh + STRIDE_H - 1) // STRIDE_H
    WP = (W - rw + STRIDE_W - 1) // STRIDE_W
    MP = N * HP * WP
    num_m = tl.cdiv(N * tl.cdiv(H, STRIDE_H) * tl.cdiv(W, STRIDE_W), BLOCK_M)  # the grid's (largest phase)
    pid_m, pid_n = _tile(tl.program_id(0), num_m, tl.cdiv(CIN_G, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= MP:
        return
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                      # input channels of group g
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < MP
    n_ok = rn < CIN_G
    img = rm // (HP * WP)
    ihp = (rm % (HP * WP)) // WP
    iwp = rm % WP
    kh0, n_kh = _first_tap(rh, PAD_H, STRIDE_H, GCD_H, STEP_H, INV_H, KH)
    kw0, n_kw = _first_tap(rw, PAD_W, STRIDE_W, GCD_W, STEP_W, INV_W, KW)
    dy_row = DY + img.to(tl.int64) * sdn + (g * COUT_G).to(tl.int64) * sdc
    ci = g * CIN_G + rn
    w_col = Wt + (g * COUT_G).to(tl.int64) * swo + rn.to(tl.int64) * swc        # weight: ci within the group
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    co_blocks = tl.cdiv(COUT_G, BLOCK_K)
    for it in _range(0, n_kh * n_kw * co_blocks, 1):
        tap = it // co_blocks
        c0 = (it - tap * co_blocks) * BLOCK_K
        j = tap // n_kw
        kh = kh0 + j * STEP_H
        kw = kw0 + (tap - j * n_kw) * STEP_W
        oh = ihp + (rh + PAD_H - kh * DIL_H) // STRIDE_H               # exact division (valid tap)
        ow = iwp + (rw + PAD_W - kw * DIL_W) // STRIDE_W
        r_ok = m_ok & (oh >= 0) & (oh < HO) & (ow >= 0) & (ow < WO)
        co = c0 + rk
        k_ok = co < COUT_G
        a_ptr = dy_row + oh.to(tl.int64) * sdh + ow.to(tl.int64) * sdw
        a = tl.load(a_ptr[:, None] + co[None, :] * sdc, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_col[None, :] + (co.to(tl.int64) * swo)[:, None] + (kh * swh + kw * sww),
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += _dot(a, b, PRECISION)
    ih = rh + ihp * STRIDE_H
    iw = rw + iwp * STRIDE_W
    dx_row = DX + img.to(tl.int64) * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
    tl.store(dx_row[:, None] + ci[None, :].to(tl.int64) * sxc, _to(acc, DX.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


# ---- weight gradient -----------------------------------------------------------------------------

@triton.jit
def _conv_dw_kernel(
        X, DY, P,
        N, H, W, HO, WO, COUT_G, CIN_G, K_SPLIT,
        sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw, sps, spo,
        STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
        KH: tl.constexpr, KW: tl.constexpr, FLAT: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """P[split, g·Cout_g + co, (kh·KW + kw)·Cin_g + ci] = the split's share of dW (fp32)."""
    split = tl.program_id(1)
    g = tl.program_id(2)
    KTOT = KH * KW * CIN_G
    if FLAT:
        num_n = tl.cdiv(KTOT, BLOCK_N)
    else:
        ci_blocks = tl.cdiv(CIN_G, BLOCK_N)
        num_n = KH * KW * ci_blocks
    pid_m, pid_n = _tile(tl.program_id(0), tl.cdiv(COUT_G, BLOCK_M), num_n, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                      # output channels of group g
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < COUT_G
    if FLAT:
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                # (kh·KW + kw)·Cin_g + ci
        ci = cols % CIN_G
        kh = (cols // CIN_G) // KW
        kw = (cols // CIN_G) % KW
        n_ok = cols < KTOT
    else:
        tap = pid_n // ci_blocks
        ci = (pid_n - tap * ci_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        zero = tl.zeros([BLOCK_N], tl.int32)
        kh = tap // KW + zero                                          # one tap: uniform over the tile
        kw = tap % KW + zero
        n_ok = ci < CIN_G
        cols = tap * CIN_G + ci
    x_col = X + (g * CIN_G + ci).to(tl.int64) * sxc                   # (BLOCK_N,) pointers
    dy_col = DY + (g * COUT_G + rm).to(tl.int64) * sdc                # (BLOCK_M,) pointers
    M_POS = N * HO * WO
    k_lo = split * K_SPLIT
    k_hi = tl.minimum(M_POS, k_lo + K_SPLIT)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in _range(k_lo, k_hi, BLOCK_K):
        kk = k0 + rk                                                   # positions (n, oh, ow)
        k_ok = kk < k_hi
        img = kk // (HO * WO)
        oh = (kk % (HO * WO)) // WO
        ow = kk % WO
        a = tl.load(dy_col[:, None] + (img.to(tl.int64) * sdn + oh.to(tl.int64) * sdh + ow.to(tl.int64) * sdw)[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)    # (BLOCK_M, BLOCK_K)
        ih = (oh * STRIDE_H - PAD_H)[:, None] + (kh * DIL_H)[None, :]  # (BLOCK_K, BLOCK_N) or (BLOCK_K, 1)
        iw = (ow * STRIDE_W - PAD_W)[:, None] + (kw * DIL_W)[None, :]
        b_ok = k_ok[:, None] & n_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        b = tl.load(x_col[None, :] + (img.to(tl.int64) * sxn)[:, None] + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw,
                    mask=b_ok, other=0.0)                              # (BLOCK_K, BLOCK_N)
        acc += _dot(a, b, PRECISION)
    p_ptr = P + split.to(tl.int64) * sps + (g * COUT_G + rm).to(tl.int64)[:, None] * spo + cols[None, :]
    tl.store(p_ptr, acc, mask=m_ok[:, None] & n_ok[None, :])


# ---- 1×1 fast path: batched GEMM, optional deterministic split-K --------------------------------

@triton.jit
def _gemm_kernel(
        A, B, C, Bias, M, N, K, K_SPLIT,
        sag, sam, sak, sbg, sbk, sbn, scs, scg, scm, scn,
        HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C[split, g, m, n] = sum over k in the split's chunk of A[g, m, k] B[g, k, n] (+ Bias[g·N + n])."""
    split = tl.program_id(1)
    g = tl.program_id(2)
    pid_m, pid_n = _tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    a_row = A + g.to(tl.int64) * sag + rm.to(tl.int64) * sam
    b_col = B + g.to(tl.int64) * sbg + rn.to(tl.int64) * sbn
    k_lo = split * K_SPLIT
    k_hi = tl.minimum(K, k_lo + K_SPLIT)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in _range(k_lo, k_hi, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < k_hi
        a = tl.load(a_row[:, None] + kk.to(tl.int64)[None, :] * sak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_col[None, :] + kk.to(tl.int64)[:, None] * sbk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += _dot(a, b, PRECISION)
    if HAS_BIAS:
        acc += tl.load(Bias + g * N + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ptr = C + split.to(tl.int64) * scs + g.to(tl.int64) * scg + rm.to(tl.int64)[:, None] * scm + rn.to(tl.int64)[None, :] * scn
    tl.store(c_ptr, _to(acc, C.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ---- host side: launch configurations -------------------------------------------------------------

class Config(NamedTuple):
    """Launch configuration of one kernel."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Hopper tiles (not yet measured by pydl on a GPU; picked from the public Hopper numbers of Triton
# GEMMs and checked to compile without spills for sm_90: scripts/check_triton_compile_conv2d.py).
# Keyed by the GEMM's N extent class (the forward's Cout_g, the data gradient's Cin_g, the weight
# gradient's Cout_g as its M); 16-bit operands on wgmma tensor cores, fp32 (IEEE FMA, or tf32)
# on smaller tiles.
_TILES_16 = {"fwd": {32: Config(128, 32, 64, 4, 4), 64: Config(128, 64, 64, 4, 4), 128: Config(128, 128, 64, 8, 3)},
             "dx": {32: Config(128, 32, 64, 4, 4), 64: Config(128, 64, 64, 4, 4), 128: Config(128, 128, 64, 8, 3)},
             "dw": {32: Config(32, 128, 64, 4, 4), 64: Config(64, 128, 64, 4, 4), 128: Config(128, 128, 64, 8, 3)},
             "gemm": {32: Config(128, 32, 64, 4, 4), 64: Config(128, 64, 64, 4, 4), 128: Config(128, 128, 64, 8, 3)}}
_TILES_32 = {"fwd": {32: Config(64, 32, 32, 4, 2), 64: Config(64, 64, 32, 4, 2), 128: Config(64, 64, 32, 4, 2)},
             "dx": {32: Config(64, 32, 32, 4, 2), 64: Config(64, 64, 32, 4, 2), 128: Config(64, 64, 32, 4, 2)},
             "dw": {32: Config(32, 64, 32, 4, 2), 64: Config(64, 64, 32, 4, 2), 128: Config(64, 64, 32, 4, 2)},
             "gemm": {32: Config(64, 32, 32, 4, 2), 64: Config(64, 64, 32, 4, 2), 128: Config(64, 64, 32, 4, 2)}}
INTERPRETER_CONFIG = Config(16, 16, 16, 1, 1)  # small tiles: the interpreter runs them on NumPy
GROUP_M = 8
# FLAT K (forward) / N (weight gradient) when a group's channels would fill a BLOCK_K chunk badly.
FLAT_MAX_CIN = 64


def size_class(n: int) -> int:
    return 32 if n <= 32 else 64 if n <= 64 else 128


def config(kernel: str, n_extent: int, dtype: torch.dtype) -> Config:
    """Launch configuration of ``kernel`` ("fwd", "dx", "dw", "gemm") for a GEMM N (dw: M) extent."""
    if INTERPRETING:
        return INTERPRETER_CONFIG
    table = _TILES_32 if dtype == torch.float32 else _TILES_16
    return table[kernel][size_class(n_extent)]


def flat(cin_g: int) -> bool:
    """Whether the forward / weight gradient walk (kh, kw, ci) as one flat range (small, odd Cin_g)."""
    return cin_g % 16 != 0 and cin_g < FLAT_MAX_CIN


# On a GPU the launchers autotune: the table's tile and three neighbours (other warp count, one
# stage less, half the N tile) are timed once per key (sizes, kernel size, flags; Triton adds the
# dtypes) and the fastest kept for the process. Every candidate has the table's BLOCK_K, so the
# weight gradient's split-K chunks (multiples of BLOCK_K) are fixed by the shape alone. Read once,
# at import: PYDL_CONV2D_AUTOTUNE=0 keeps the table's tile (the tests do, for speed).
AUTOTUNE = os.environ.get("PYDL_CONV2D_AUTOTUNE", "1") not in ("", "0")
_TUNE_KEYS = {
    "fwd": ["N", "H", "W", "HO", "WO", "COUT_G", "CIN_G", "STRIDE_H", "STRIDE_W", "DIL_H", "DIL_W"],
    "dx": ["N", "H", "W", "HO", "WO", "COUT_G", "CIN_G", "STRIDE_H", "STRIDE_W", "DIL_H", "DIL_W"],
    "dw": ["N", "H", "W", "HO", "WO", "COUT_G", "CIN_G", "K_SPLIT", "STRIDE_H", "STRIDE_W"],
    "gemm": ["M", "N", "K", "K_SPLIT"],
}
_TUNED: dict = {}


def candidates(cfg: Config) -> tuple:
    """The autotuner's candidate tiles around the table's ``cfg`` (distinct, cfg first)."""
    near = (cfg, cfg._replace(num_warps=8 if cfg.num_warps == 4 else 4),
            cfg._replace(num_stages=max(1, cfg.num_stages - 1)), cfg._replace(block_n=max(32, cfg.block_n // 2)))
    return tuple(dict.fromkeys(near))


def _launch(kernel, name: str, cfg: Config, grid, *args, **flags) -> None:
    """Run ``kernel`` on ``grid(BLOCK_M, BLOCK_N)`` with the table's tile (interpreter, AUTOTUNE
    off), else with the fastest of ``candidates(cfg)`` (measured once per key). Every kernel
    writes its outputs (never accumulates), so re-running a candidate is harmless."""
    if INTERPRETING or not AUTOTUNE:
        kernel[grid(cfg.block_m, cfg.block_n)](*args, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                                              GROUP_M=GROUP_M, num_warps=cfg.num_warps,
                                              num_stages=cfg.num_stages, **flags)
        return
    cands = candidates(cfg)
    tuned = _TUNED.get((name, cands))
    if tuned is None:
        tuned = _TUNED[(name, cands)] = triton.autotune(
            [triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n}, num_warps=c.num_warps,
                           num_stages=c.num_stages) for c in cands], key=_TUNE_KEYS[name])(kernel)
    tuned[lambda meta: grid(meta["BLOCK_M"], meta["BLOCK_N"])](*args, BLOCK_K=cfg.block_k, GROUP_M=GROUP_M, **flags)


# ---- host side: the problem and the launchers -----------------------------------------------------

class Problem(NamedTuple):
    """One convolution: sizes and geometry (the op layer has checked them)."""

    N: int
    C: int
    H: int
    W: int
    Cout: int
    KH: int
    KW: int
    HO: int
    WO: int
    groups: int
    stride: tuple     # (sh, sw)
    pad: tuple        # (top, left); bottom/right only change HO/WO
    dil: tuple        # (dh, dw)
    precision: str    # "ieee" or "tf32" (float32 dots)

    @property
    def cin_g(self) -> int:
        return self.C // self.groups

    @property
    def cout_g(self) -> int:
        return self.Cout // self.groups

    @property
    def pointwise(self) -> bool:
        """A 1×1 kernel, stride 1, no padding: a plain GEMM over the N·H·W positions."""
        return (self.KH, self.KW, self.stride, self.pad) == (1, 1, (1, 1), (0, 0)) and (self.HO, self.WO) == (self.H, self.W)

    def geometry_args(self) -> tuple:
        return (*self.stride, *self.pad, *self.dil)


def problem(x_shape, w_shape, geometry, groups: int, tf32: bool) -> Problem:
    """geometry: (sh, sw, pad_top, pad_bottom, pad_left, pad_right, dh, dw) (pydl/ops/_conv_args.py)."""
    N, C, H, W = (int(s) for s in x_shape)
    Cout, _, KH, KW = (int(s) for s in w_shape)
    sh, sw, pt, pb, pl, pr, dh, dw = (int(v) for v in geometry)
    HO = (H + pt + pb - dh * (KH - 1) - 1) // sh + 1
    WO = (W + pl + pr - dw * (KW - 1) - 1) // sw + 1
    return Problem(N, C, H, W, Cout, KH, KW, HO, WO, int(groups), (sh, sw), (pt, pl), (dh, dw),
                   "tf32" if tf32 else "ieee")


def _cl(t: torch.Tensor) -> torch.Tensor:
    """t in channels_last memory (no copy when it already is)."""
    return t.contiguous(memory_format=torch.channels_last)


def _strides(t: torch.Tensor) -> tuple:
    return tuple(t.stride())  # (n, c, h, w) of activations; (co, ci, kh, kw) of weights


def _pos_stride(t: torch.Tensor) -> int:
    """The stride between consecutive (n, h, w) positions of a 4-D tensor whose positions collapse."""
    n, c, h, w = t.shape
    sn, sc, sh, sw = t.stride()
    return sw if w > 1 else sh if h > 1 else sn


def _collapses(t: torch.Tensor) -> bool:
    """The (n, h, w) positions of a 4-D tensor are one stride apart (channels_last memory)."""
    n, c, h, w = t.shape
    sn, sc, sh, sw = t.stride()
    p = _pos_stride(t)
    return (w == 1 or sw == p) and (h == 1 or sh == w * p) and (n == 1 or sn == h * w * p)


def _fmt(channels_last: bool):
    return torch.channels_last if channels_last else torch.contiguous_format


def conv2d_fwd(P: Problem, x, weight, bias, channels_last: bool) -> torch.Tensor:
    """y (N, Cout, HO, WO) in x's dtype, in channels_last or contiguous memory as asked."""
    y = torch.empty((P.N, P.Cout, P.HO, P.WO), dtype=x.dtype, device=x.device, memory_format=_fmt(channels_last))
    if y.numel() == 0:
        return y
    if P.cin_g == 0:
        return y.zero_() if bias is None else y.copy_(bias.view(1, -1, 1, 1).expand_as(y))
    x, w = _cl(x), _cl(weight)
    has_bias = bias is not None
    b = bias if has_bias else w
    cfg = config("gemm" if P.pointwise else "fwd", P.cout_g, x.dtype)
    G, cin, cout = P.groups, P.cin_g, P.cout_g
    if P.pointwise and _collapses(x) and _collapses(y):
        sx, sw_, sy = _strides(x), _strides(w), _strides(y)
        M = P.N * P.H * P.W
        _launch(_gemm_kernel, "gemm", cfg, lambda bm, bn: (triton.cdiv(M, bm) * triton.cdiv(cout, bn), 1, G),
                x, w, y, b, M, cout, cin, cin,
                cin * sx[1], _pos_stride(x), sx[1], cout * sw_[0], sw_[1], sw_[0], 0, cout * sy[1], _pos_stride(y),
                sy[1],
                HAS_BIAS=has_bias, PRECISION=P.precision)
        return y
    M = P.N * P.HO * P.WO
    _launch(_conv_fwd_kernel, "fwd", cfg, lambda bm, bn: (triton.cdiv(M, bm) * triton.cdiv(cout, bn), G),
            x, w, b, y, P.N, P.H, P.W, P.HO, P.WO, cout, cin,
            *_strides(x), *_strides(w), *_strides(y), *P.geometry_args(),
            KH=P.KH, KW=P.KW, FLAT=flat(cin), HAS_BIAS=has_bias, PRECISION=P.precision)
    return y


def _taps(stride: int, dil: int) -> tuple:
    """(gcd, step, inverse) of the data gradient's tap progression (see ``_first_tap``)."""
    g = math.gcd(stride, dil)
    step = stride // g
    return g, step, pow(dil // g, -1, step)


def conv2d_dx(P: Problem, dy, weight, channels_last: bool) -> torch.Tensor:
    """dx (N, C, H, W) in dy's dtype, in channels_last or contiguous memory as asked."""
    dx = torch.empty((P.N, P.C, P.H, P.W), dtype=dy.dtype, device=dy.device, memory_format=_fmt(channels_last))
    if dx.numel() == 0:
        return dx
    if P.cout_g == 0 or dy.numel() == 0:
        return dx.zero_()
    dy, w = _cl(dy), _cl(weight)
    G, cin, cout = P.groups, P.cin_g, P.cout_g
    cfg = config("gemm" if P.pointwise else "dx", cin, dy.dtype)
    if P.pointwise and _collapses(dy) and _collapses(dx):
        sd, sw_, sx = _strides(dy), _strides(w), _strides(dx)
        M = P.N * P.H * P.W
        _launch(_gemm_kernel, "gemm", cfg, lambda bm, bn: (triton.cdiv(M, bm) * triton.cdiv(cin, bn), 1, G),
                dy, w, dx, dx, M, cin, cout, cout,
                cout * sd[1], _pos_stride(dy), sd[1], cout * sw_[0], sw_[0], sw_[1], 0, cin * sx[1], _pos_stride(dx),
                sx[1],
                HAS_BIAS=False, PRECISION=P.precision)
        return dx
    (sh, sw), (dh, dw) = P.stride, P.dil
    mp = P.N * triton.cdiv(P.H, sh) * triton.cdiv(P.W, sw)
    _launch(_conv_dx_kernel, "dx", cfg, lambda bm, bn: (triton.cdiv(mp, bm) * triton.cdiv(cin, bn), sh * sw, G),
            dy, w, dx, P.N, P.H, P.W, P.HO, P.WO, cout, cin,
            *_strides(dy), *_strides(w), *_strides(dx), *P.geometry_args(), *_taps(sh, dh), *_taps(sw, dw),
            KH=P.KH, KW=P.KW, PRECISION=P.precision)
    return dx


_SM_COUNT: dict = {}


def _programs_wanted(device: torch.device) -> int:
    """How many programs the split-K weight gradient aims for: 2 per SM on a GPU; 4 under the
    interpreter (so that the tests exercise several splits)."""
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return 2 * _SM_COUNT[idx]


def split_k(positions: int, tiles: int, block_k: int, device: torch.device) -> tuple:
    """(SPLIT, K_SPLIT): the positions in SPLIT chunks of K_SPLIT (a multiple of BLOCK_K, at least
    4·BLOCK_K long on a GPU): enough programs to fill the machine, a deterministic partition."""
    min_chunk = block_k * (2 if device.type != "cuda" else 8)
    split = max(1, min(triton.cdiv(_programs_wanted(device), max(1, tiles)), triton.cdiv(positions, min_chunk)))
    chunk = triton.cdiv(triton.cdiv(positions, split), block_k) * block_k
    return triton.cdiv(positions, chunk), chunk


def conv2d_dw(P: Problem, dy, x, weight) -> torch.Tensor:
    """dW in weight's shape, dtype and strides: fp32 split-K partials summed in a fixed order."""
    dw = torch.empty_like(weight)
    if dw.numel() == 0:
        return dw
    positions = P.N * P.HO * P.WO
    if positions == 0:
        return dw.zero_()
    dy, x = _cl(dy), _cl(x)
    G, cin, cout, taps = P.groups, P.cin_g, P.cout_g, P.KH * P.KW
    ktot = taps * cin
    gemm = P.pointwise and _collapses(dy) and _collapses(x)
    cfg = config("gemm" if gemm else "dw", cout, dy.dtype)
    if gemm:
        tiles = G * triton.cdiv(cout, cfg.block_m) * triton.cdiv(cin, cfg.block_n)
        split, chunk = split_k(positions, tiles, cfg.block_k, dy.device)
        part = torch.empty((split, P.Cout, cin), dtype=torch.float32, device=dy.device)
        sd, sx = _strides(dy), _strides(x)
        _launch(_gemm_kernel, "gemm", cfg, lambda bm, bn: (triton.cdiv(cout, bm) * triton.cdiv(cin, bn), split, G),
                dy, x, part, part, cout, cin, positions, chunk,
                cout * sd[1], sd[1], _pos_stride(dy), cin * sx[1], _pos_stride(x), sx[1], part.stride(0), cout * cin,
                cin, 1,
                HAS_BIAS=False, PRECISION=P.precision)
    else:
        is_flat = flat(cin)
        n_tiles = triton.cdiv(ktot, cfg.block_n) if is_flat else taps * triton.cdiv(cin, cfg.block_n)
        tiles = G * triton.cdiv(cout, cfg.block_m) * n_tiles
        split, chunk = split_k(positions, tiles, cfg.block_k, dy.device)
        part = torch.empty((split, P.Cout, ktot), dtype=torch.float32, device=dy.device)

        def grid(bm, bn):
            nt = triton.cdiv(ktot, bn) if is_flat else taps * triton.cdiv(cin, bn)
            return (triton.cdiv(cout, bm) * nt, split, G)

        _launch(_conv_dw_kernel, "dw", cfg, grid, x, dy, part, P.N, P.H, P.W, P.HO, P.WO, cout, cin, chunk,
                *_strides(x), *_strides(dy), part.stride(0), part.stride(1), *P.geometry_args(),
                KH=P.KH, KW=P.KW, FLAT=is_flat, PRECISION=P.precision)
    total = part[0] if split == 1 else part.sum(0)               # (Cout, KH·KW·Cin_g), fixed order
    dw.copy_(total.view(P.Cout, P.KH, P.KW, cin).permute(0, 3, 1, 2))
    return dw
