"""Fused LayerNorm (+ residual add, + GELU) — Triton kernels and host launchers.

No autograd here: ``pydl/ops/layer_norm.py`` wraps these launchers.

Per row (math in the accumulation dtype: float32, or float64 for float64 inputs):
    h    = x + residual (rounded to x.dtype)          # add variant only
    xhat = (h - mean) * rstd,  rstd = 1/sqrt(biased var + eps)
    z    = xhat * w + b
    y    = act(z)                                      # 0 none, 1 gelu(erf), 2 gelu(tanh)
Backward:
    g  = dy * act'(z);  dxhat = g * w
    dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) + dh
    dw = sum_rows g * xhat;  db = sum_rows g
RMSNorm (``rms=True``, the kernels' ``RMS`` constexpr; torch's ``F.rms_norm``): no mean, no bias,
    xhat = h * rstd,  rstd = 1/sqrt(mean(h^2) + eps)   (the stats' mean row is written as 0)
    dx = rstd * (dxhat - xhat * mean(dxhat * xhat)) + dh   (one row sum; the mean is not read)

Paths:
  * single tile (next_pow2(N) <= FWD_MAX_TILE / BWD_MAX_TILE): a row lives in registers;
    small N packs BLOCK_M rows into one (BLOCK_M, BLOCK_N) tile.
    Forward: one program per row block.  Backward: a fixed number P of persistent programs,
    each looping over row blocks and accumulating dw/db in registers, then writing one row
    of a (P, N) partial buffer that the host reduces with ``partial.sum(0)``.
  * chunked (larger N): columns are processed in CHUNK_N-wide chunks by two launches,
    a per-row reduction kernel (forward: mean/rstd via Chan's chunk combination;
    backward: the two row means c1, c2) and an element-wise kernel on a
    (rows, column-chunks) grid.  In the backward element-wise kernel program (p, c) owns
    partial[p, chunk c] exclusively, so there is no read-modify-write and no atomics:
    results are deterministic.

The three tile constants below are read at call time; tests lower them to exercise the
chunked path on small shapes.
"""

import contextlib

import torch
import triton
import triton.language as tl

from ._common import _range  # loops with runtime bounds (Triton 3.6's interpreter: see there)

# Largest single-tile row (elements) for the forward / backward fused kernels.
FWD_MAX_TILE = 16384
BWD_MAX_TILE = 8192
# Column chunk width of the chunked (large-N) kernels; clamped to the max tile.
CHUNK_N = 4096
# Target tile size (elements) when packing several short rows into one program.
_ROWS_TILE = 2048
# Backward partial-sum programs when not on a GPU (Triton interpreter).
_CPU_PROGRAMS = 4

ACT_NONE, ACT_GELU, ACT_GELU_TANH = 0, 1, 2

_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_INV_SQRT_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_GELU_C = tl.constexpr(0.044715)


# ---------------------------------------------------------------------------------------
# activation helpers (z is in the accumulation dtype)
# ---------------------------------------------------------------------------------------
@triton.jit
def _tanh_inner(z):
    # u = sqrt(2/pi) (z + c z^3); with e = exp(2u), q = 1/(e+1): tanh(u) = 1 - 2q and
    # 1 - tanh(u)^2 = 4 e q^2 (no cancellation near |tanh| = 1).  exp overflow gives e = inf,
    # q = 0, t = 1; underflow gives t = -1: never NaN for finite z (sech2 is only valid for
    # |u| < 20, where e q^2 cannot overflow; callers mask it there).
    u = _SQRT_2_OVER_PI * (z + _GELU_C * z * z * z)
    e = tl.exp(2.0 * u)
    q = 1.0 / (e + 1.0)
    t = 1.0 - 2.0 * q
    sech2 = 4.0 * e * q * q
    return u, t, sech2


@triton.jit
def _act_fwd(z, ACT: tl.constexpr):
    if ACT == 1:
        y = 0.5 * z * (1.0 + tl.math.erf(z * _INV_SQRT_2))
    elif ACT == 2:
        u, t, sech2 = _tanh_inner(z)
        y = 0.5 * z * (1.0 + t)
    else:
        y = z
    return y


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    """d act / dz (only called for ACT != 0)."""
    if ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(z * _INV_SQRT_2))
        pdf = tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
        d = cdf + z * pdf
    else:
        u, t, sech2 = _tanh_inner(z)
        # for |u| >= 20, sech^2 < 1e-17: drop the term (avoids 0 * inf for huge z)
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_C * z * z)
        term = tl.where(tl.abs(u) < 20.0, 0.5 * z * sech2 * du, 0.0)
        d = 0.5 * (1.0 + t) + term
    return d


@triton.jit
def _cast_out(v, PTR, SOFT_RNE: tl.constexpr):
    """Cast v (float32/64) to PTR's element type, rounding to nearest even.

    Compiled kernels round natively.  The Triton interpreter truncates fp32 -> bf16, so with
    SOFT_RNE (set by the host for CPU tensors) bf16 rounding is done on the bits first.
    """
    if SOFT_RNE:
        if PTR.dtype.element_ty == tl.bfloat16:
            v = v.to(tl.float32)
            u = v.to(tl.uint32, bitcast=True)
            u = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16) << 16
            v = tl.where(v != v, v, u.to(tl.float32, bitcast=True))
    return v.to(PTR.dtype.element_ty)


# ---------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------
@triton.jit
def _ln_fwd_fused_kernel(
    X, R, H, Y, W, B, MEAN, RSTD,  # X (M, N) row stride stride_x; R stride_r; H, Y (M, N) contiguous
    stride_x, stride_r, M, N, eps,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SOFT_RNE: tl.constexpr, RMS: tl.constexpr,
):
    acc_ty = MEAN.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]  # (BLOCK_M, BLOCK_N)
    rows64 = rows.to(tl.int64)

    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(R + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        # round h to the storage dtype first and normalize the rounded value, like torch
        x = _cast_out(x.to(acc_ty) + r.to(acc_ty), H, SOFT_RNE)
        tl.store(H + rows64[:, None] * N + cols[None, :], x, mask=mask)
    xf = x.to(acc_ty)

    if RMS:  # one reduction: the mean of squares (masked elements are 0)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / N + eps)  # (BLOCK_M,)
        tl.store(MEAN + rows, tl.zeros_like(rstd), mask=rmask)
        tl.store(RSTD + rows, rstd, mask=rmask)
        z = xf * rstd[:, None]
    else:
        # corrected two-pass (Chan, Golub, LeVeque): the second pass also sums the deviations,
        # fixing the rounding error of the first mean (matters when |mean| >> std)
        mean0 = tl.sum(xf, axis=1) / N  # (BLOCK_M,)
        xc = tl.where(mask, xf - mean0[:, None], 0.0)
        corr = tl.sum(xc, axis=1) / N
        var = tl.sum(xc * xc, axis=1) / N - corr * corr
        var = tl.where(var < 0.0, 0.0, var)  # clamp rounding below 0; NaN passes through
        rstd = 1.0 / tl.sqrt(var + eps)
        tl.store(MEAN + rows, mean0 + corr, mask=rmask)
        tl.store(RSTD + rows, rstd, mask=rmask)
        z = (xc - corr[:, None]) * rstd[:, None]
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(acc_ty)
        z = z * w[None, :]
    if HAS_B:
        b = tl.load(B + cols, mask=cmask, other=0.0).to(acc_ty)
        z = z + b[None, :]
    y = _act_fwd(z, ACT)
    tl.store(Y + rows64[:, None] * N + cols[None, :], _cast_out(y, Y, SOFT_RNE), mask=mask)


@triton.jit
def _ln_fwd_stats_chunked_kernel(
    X, R, H, MEAN, RSTD,  # one program per row
    stride_x, stride_r, N, eps,
    HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr, SOFT_RNE: tl.constexpr, RMS: tl.constexpr,
):
    acc_ty = MEAN.dtype.element_ty
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    zero = tl.sum(tl.zeros([BLOCK_N], dtype=acc_ty), axis=0)
    cnt = zero
    mean = zero
    m2 = zero
    for start in _range(0, N, BLOCK_N):
        c = start + cols
        cm = c < N
        x = tl.load(X + row64 * stride_x + c, mask=cm, other=0.0)
        if HAS_RES:
            r = tl.load(R + row64 * stride_r + c, mask=cm, other=0.0)
            x = _cast_out(x.to(acc_ty) + r.to(acc_ty), H, SOFT_RNE)
            tl.store(H + row64 * N + c, x, mask=cm)
        xf = x.to(acc_ty)
        if RMS:  # m2 accumulates the sum of squares (masked elements are 0); mean stays 0
            m2 += tl.sum(xf * xf, axis=0)
        else:
            # corrected two-pass stats of this chunk, then Chan et al.'s pairwise combination
            nb = tl.sum(cm.to(acc_ty), axis=0)
            mb0 = tl.sum(xf, axis=0) / nb
            d = tl.where(cm, xf - mb0, 0.0)
            sd = tl.sum(d, axis=0)
            mb = mb0 + sd / nb
            m2b = tl.sum(d * d, axis=0) - sd * sd / nb
            m2b = tl.where(m2b < 0.0, 0.0, m2b)  # NaN passes through
            delta = mb - mean
            tot = cnt + nb
            mean = mean + delta * (nb / tot)
            m2 = m2 + m2b + delta * delta * (cnt * nb / tot)
            cnt = tot
    rstd = 1.0 / tl.sqrt(m2 / N + eps)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _ln_fwd_apply_chunked_kernel(
    X, Y, W, B, MEAN, RSTD,  # grid (M, cdiv(N, BLOCK_N)); X is h (contiguous) for the add variant
    stride_x, N,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, BLOCK_N: tl.constexpr,
    SOFT_RNE: tl.constexpr, RMS: tl.constexpr,
):
    acc_ty = MEAN.dtype.element_ty
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = c < N
    rstd = tl.load(RSTD + row)
    x = tl.load(X + row64 * stride_x + c, mask=cm, other=0.0).to(acc_ty)
    if RMS:
        z = x * rstd
    else:
        mean = tl.load(MEAN + row)
        z = (x - mean) * rstd
    if HAS_W:
        z = z * tl.load(W + c, mask=cm, other=0.0).to(acc_ty)
    if HAS_B:
        z = z + tl.load(B + c, mask=cm, other=0.0).to(acc_ty)
    y = _act_fwd(z, ACT)
    tl.store(Y + row64 * N + c, _cast_out(y, Y, SOFT_RNE), mask=cm)


# ---------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------
@triton.jit
def _ln_bwd_fused_kernel(
    X, DY, DH, DX, W, B, MEAN, RSTD, PDW, PDB,  # PDW/PDB: (P, N) partial sums, P = grid size
    stride_x, stride_dy, stride_dh, M, N,
    HAS_DH: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
    STORE_DW: tl.constexpr, STORE_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SOFT_RNE: tl.constexpr, RMS: tl.constexpr,
):
    acc_ty = MEAN.dtype.element_ty
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(acc_ty)
    if HAS_B:
        b = tl.load(B + cols, mask=cmask, other=0.0).to(acc_ty)
    dw_acc = tl.zeros([BLOCK_N], dtype=acc_ty)
    db_acc = tl.zeros([BLOCK_N], dtype=acc_ty)
    num_blocks = tl.cdiv(M, BLOCK_M)
    for blk in _range(pid, num_blocks, nprog):
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(acc_ty)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(acc_ty)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        if RMS:
            xhat = tl.where(mask, x * rstd[:, None], 0.0)
        else:
            mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if ACT != 0:
            z = xhat
            if HAS_W:
                z = z * w[None, :]
            if HAS_B:
                z = z + b[None, :]
            g = dy * _act_grad(z, ACT)
        else:
            g = dy
        g = tl.where(mask, g, 0.0)
        if HAS_W:
            dxhat = g * w[None, :]
        else:
            dxhat = g
        c2 = tl.sum(dxhat * xhat, axis=1) / N
        if RMS:
            dx = rstd[:, None] * (dxhat - xhat * c2[:, None])
        else:
            c1 = tl.sum(dxhat, axis=1) / N
            dx = rstd[:, None] * (dxhat - c1[:, None] - xhat * c2[:, None])
        if HAS_DH:
            dh = tl.load(DH + rows64[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0)
            dx = dx + dh.to(acc_ty)
        tl.store(DX + rows64[:, None] * N + cols[None, :], _cast_out(dx, DX, SOFT_RNE), mask=mask)
        if STORE_DW:
            dw_acc += tl.sum(g * xhat, axis=0)
        if STORE_DB:
            db_acc += tl.sum(g, axis=0)
    if STORE_DW:
        tl.store(PDW + pid.to(tl.int64) * N + cols, dw_acc, mask=cmask)
    if STORE_DB:
        tl.store(PDB + pid.to(tl.int64) * N + cols, db_acc, mask=cmask)


@triton.jit
def _ln_bwd_rowsums_chunked_kernel(
    X, DY, W, B, MEAN, RSTD, C1, C2,  # one program per row; C1/C2 (M,) = mean(dxhat), mean(dxhat*xhat)
    stride_x, stride_dy, N,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, BLOCK_N: tl.constexpr,
    RMS: tl.constexpr,
):
    acc_ty = MEAN.dtype.element_ty
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    rstd = tl.load(RSTD + row)
    if not RMS:
        mean = tl.load(MEAN + row)
    s1 = tl.zeros([BLOCK_N], dtype=acc_ty)
    s2 = tl.zeros([BLOCK_N], dtype=acc_ty)
    for start in _range(0, N, BLOCK_N):
        c = start + cols
        cm = c < N
        x = tl.load(X + row64 * stride_x + c, mask=cm, other=0.0).to(acc_ty)
        dy = tl.load(DY + row64 * stride_dy + c, mask=cm, other=0.0).to(acc_ty)
        if RMS:
            xhat = tl.where(cm, x * rstd, 0.0)
        else:
            xhat = tl.where(cm, (x - mean) * rstd, 0.0)
        if HAS_W:
            w = tl.load(W + c, mask=cm, other=0.0).to(acc_ty)
        if ACT != 0:
            z = xhat
            if HAS_W:
                z = z * w
            if HAS_B:
                z = z + tl.load(B + c, mask=cm, other=0.0).to(acc_ty)
            g = dy * _act_grad(z, ACT)
        else:
            g = dy
        g = tl.where(cm, g, 0.0)
        if HAS_W:
            dxhat = g * w
        else:
            dxhat = g
        if not RMS:
            s1 += dxhat
        s2 += dxhat * xhat
    tl.store(C1 + row, tl.sum(s1, axis=0) / N)  # RMS: 0 (not read)
    tl.store(C2 + row, tl.sum(s2, axis=0) / N)


@triton.jit
def _ln_bwd_apply_chunked_kernel(
    X, DY, DH, DX, W, B, MEAN, RSTD, C1, C2, PDW, PDB,  # grid (P, cdiv(N, BLOCK_N))
    stride_x, stride_dy, stride_dh, M, N,
    HAS_DH: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
    STORE_DW: tl.constexpr, STORE_DB: tl.constexpr, BLOCK_N: tl.constexpr,
    SOFT_RNE: tl.constexpr, RMS: tl.constexpr,
):
    acc_ty = MEAN.dtype.element_ty
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = c < N
    if HAS_W:
        w = tl.load(W + c, mask=cm, other=0.0).to(acc_ty)
    if HAS_B:
        b = tl.load(B + c, mask=cm, other=0.0).to(acc_ty)
    dw_acc = tl.zeros([BLOCK_N], dtype=acc_ty)
    db_acc = tl.zeros([BLOCK_N], dtype=acc_ty)
    # int64 induction variable (row * stride may exceed 2^31); a plain int in the interpreter
    for row64 in _range(pid.to(tl.int64), M, nprog.to(tl.int64)):
        rstd = tl.load(RSTD + row64)
        c2 = tl.load(C2 + row64)
        x = tl.load(X + row64 * stride_x + c, mask=cm, other=0.0).to(acc_ty)
        dy = tl.load(DY + row64 * stride_dy + c, mask=cm, other=0.0).to(acc_ty)
        if RMS:
            xhat = tl.where(cm, x * rstd, 0.0)
        else:
            mean = tl.load(MEAN + row64)
            c1 = tl.load(C1 + row64)
            xhat = tl.where(cm, (x - mean) * rstd, 0.0)
        if ACT != 0:
            z = xhat
            if HAS_W:
                z = z * w
            if HAS_B:
                z = z + b
            g = dy * _act_grad(z, ACT)
        else:
            g = dy
        g = tl.where(cm, g, 0.0)
        if HAS_W:
            dxhat = g * w
        else:
            dxhat = g
        if RMS:
            dx = rstd * (dxhat - xhat * c2)
        else:
            dx = rstd * (dxhat - c1 - xhat * c2)
        if HAS_DH:
            dx = dx + tl.load(DH + row64 * stride_dh + c, mask=cm, other=0.0).to(acc_ty)
        tl.store(DX + row64 * N + c, _cast_out(dx, DX, SOFT_RNE), mask=cm)
        if STORE_DW:
            dw_acc += g * xhat
        if STORE_DB:
            db_acc += g
    if STORE_DW:
        tl.store(PDW + pid.to(tl.int64) * N + c, dw_acc, mask=cm)
    if STORE_DB:
        tl.store(PDB + pid.to(tl.int64) * N + c, db_acc, mask=cm)


# ---------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------
def _num_warps(elems: int, per_warp: int) -> int:
    """Power-of-two warp count giving about ``per_warp`` elements per warp, in [1, 16]."""
    return max(1, min(16, elems // per_warp))


def _programs_per_sm(num_warps: int) -> int:
    """Persistent backward programs per SM: about 16 resident warps, so that all of them
    run in a single wave (a second, partial wave would double the time)."""
    return max(1, min(8, 16 // num_warps))


def _row_block(block_n: int, M: int) -> int:
    """Rows per tile for short rows: fill about _ROWS_TILE elements, never more than M needs."""
    return max(1, min(_ROWS_TILE // block_n, triton.next_power_of_2(max(M, 1))))


# Launch configurations (also enumerated by scripts/check_triton_compile.py, which compiles
# every one of them for sm_90).  `sm`: the GPU's SM count, None under the interpreter.
def _fwd_tile_config(M: int, N: int, sm):
    """(BLOCK_M, BLOCK_N, num_warps) of the single-tile forward, or None for the chunked path."""
    block_n = triton.next_power_of_2(N)
    if block_n > FWD_MAX_TILE:
        return None
    block_m = _row_block(block_n, M)
    if sm is not None:  # keep at least ~2 waves of programs when M allows
        while block_m > 1 and triton.cdiv(M, block_m) < 2 * sm:
            block_m //= 2
    return block_m, block_n, _num_warps(block_m * block_n, 512)


def _fwd_chunk_config():
    """(BLOCK_N, num_warps) of both chunked forward kernels."""
    chunk = min(CHUNK_N, FWD_MAX_TILE)
    return chunk, _num_warps(chunk, 512)


def _bwd_tile_config(M: int, N: int):
    """(BLOCK_M, BLOCK_N, num_warps) of the single-tile backward, or None for the chunked path."""
    block_n = triton.next_power_of_2(N)
    if block_n > BWD_MAX_TILE:
        return None
    block_m = _row_block(block_n, M)
    return block_m, block_n, _num_warps(block_m * block_n, 256)


def _bwd_chunk_config():
    """(BLOCK_N, num_warps) of both chunked backward kernels (4096 -> 16 warps, ~90 regs: one
    CTA per SM)."""
    chunk = min(CHUNK_N, BWD_MAX_TILE)
    return chunk, _num_warps(chunk, 256)


def _device_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _sm_count(t: torch.Tensor):
    if t.is_cuda:
        return torch.cuda.get_device_properties(t.device).multi_processor_count
    return None


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_rows(t, name, M, N):
    if t.dim() != 2 or tuple(t.shape) != (M, N):
        raise ValueError(f"{name}: expected shape ({M}, {N}), got {tuple(t.shape)}")
    if N > 1 and t.stride(1) != 1:
        raise ValueError(f"{name}: the last dim must have unit stride, got strides {t.stride()}")


def _check_vec(t, name, N, device):
    if t is None:
        return
    if t.dim() != 1 or t.shape[0] != N or (N > 1 and t.stride(0) != 1):
        raise ValueError(f"{name}: expected a contiguous ({N},) tensor, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device}, got {t.device}")


def _row_stride(t) -> int:
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def layer_norm_fwd(x, residual, weight, bias, eps: float, activation: int, rms: bool = False):
    """LayerNorm (or, with ``rms``, RMSNorm) over the last dim of a (M, N) tensor, with
    optional residual add and GELU.

    x: (M, N), unit last stride, any row stride; residual: same shape or None (own row stride);
    weight/bias: (N,) contiguous or None (rms: bias must be None), of x's dtype or float32 (mixed
    precision: the kernels load them into the accumulation dtype either way); activation: 0 none,
    1 gelu (erf), 2 gelu (tanh).
    Returns (y, h, stats): y (M, N) contiguous x.dtype; h = x + residual rounded to
    x.dtype, contiguous (None without residual); stats (2, M) float32 (float64 for float64
    x): row 0 the mean (rms: 0), row 1 rstd = 1/sqrt(biased var + eps) (rms:
    1/sqrt(mean(h^2) + eps)).
    """
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D (M, N) tensor, got shape {tuple(x.shape)}")
    M, N = x.shape
    if N < 1:
        raise ValueError("x: the normalized dim must have size >= 1")
    if activation not in (ACT_NONE, ACT_GELU, ACT_GELU_TANH):
        raise ValueError(f"activation: expected 0, 1 or 2, got {activation!r}")
    rms = bool(rms)
    if rms and bias is not None:
        raise ValueError("bias: rms_norm has no bias")
    _check_rows(x, "x", M, N)
    if residual is not None:
        _check_rows(residual, "residual", M, N)
    _check_vec(weight, "weight", N, x.device)
    _check_vec(bias, "bias", N, x.device)

    dev = x.device
    acc = _acc_dtype(x.dtype)
    y = torch.empty((M, N), dtype=x.dtype, device=dev)
    h = torch.empty((M, N), dtype=x.dtype, device=dev) if residual is not None else None
    stats = torch.empty((2, M), dtype=acc, device=dev)
    mean, rstd = stats[0], stats[1]
    if M == 0:
        return y, h, stats

    has_res = residual is not None
    r = residual if has_res else x
    hh = h if has_res else y
    w = weight if weight is not None else x
    b = bias if bias is not None else x
    sx, sr = _row_stride(x), _row_stride(r)
    soft_rne = not x.is_cuda  # Triton interpreter: its fp32->bf16 cast truncates
    tile = _fwd_tile_config(M, N, _sm_count(x))
    with _device_ctx(x):
        if tile is not None:
            block_m, block_n, nw = tile
            grid = (triton.cdiv(M, block_m),)
            _ln_fwd_fused_kernel[grid](
                x, r, hh, y, w, b, mean, rstd, sx, sr, M, N, float(eps),
                HAS_RES=has_res, HAS_W=weight is not None, HAS_B=bias is not None,
                ACT=activation, BLOCK_M=block_m, BLOCK_N=block_n, SOFT_RNE=soft_rne, RMS=rms,
                num_warps=nw,
            )
        else:
            chunk, nw = _fwd_chunk_config()
            _ln_fwd_stats_chunked_kernel[(M,)](
                x, r, hh, mean, rstd, sx, sr, N, float(eps),
                HAS_RES=has_res, BLOCK_N=chunk, SOFT_RNE=soft_rne, RMS=rms, num_warps=nw,
            )
            src, s_src = (h, N) if has_res else (x, sx)
            _ln_fwd_apply_chunked_kernel[(M, triton.cdiv(N, chunk))](
                src, y, w, b, mean, rstd, s_src, N,
                HAS_W=weight is not None, HAS_B=bias is not None, ACT=activation,
                BLOCK_N=chunk, SOFT_RNE=soft_rne, RMS=rms, num_warps=nw,
            )
    return y, h, stats


def layer_norm_bwd(dy, dh, x, weight, bias, mean, rstd, activation: int,
                   need_weight_grad: bool, need_bias_grad: bool, rms: bool = False):
    """Backward of :func:`layer_norm_fwd` (``rms`` as there).

    dy: (M, N) grad of y (any row stride, unit last stride); dh: grad of h or None;
    x: the normalized input (h for the add variant); weight/bias as in forward (bias is
    needed to recompute the activation input; rms: None); mean/rstd from the forward (rms: the
    mean is not read).
    Returns (dx, dweight or None, dbias or None): dx (M, N) contiguous x.dtype, including
    + dh; dweight/dbias (N,) in weight/bias dtype, only when that parameter exists and its
    grad is requested.
    """
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D (M, N) tensor, got shape {tuple(x.shape)}")
    M, N = x.shape
    if N < 1:
        raise ValueError("x: the normalized dim must have size >= 1")
    if activation not in (ACT_NONE, ACT_GELU, ACT_GELU_TANH):
        raise ValueError(f"activation: expected 0, 1 or 2, got {activation!r}")
    rms = bool(rms)
    if rms and bias is not None:
        raise ValueError("bias: rms_norm has no bias")
    _check_rows(x, "x", M, N)
    _check_rows(dy, "dy", M, N)
    if dh is not None:
        _check_rows(dh, "dh", M, N)
    _check_vec(weight, "weight", N, x.device)
    _check_vec(bias, "bias", N, x.device)
    for t, name in ((mean, "mean"), (rstd, "rstd")):
        if t.dim() != 1 or t.shape[0] != M or (M > 1 and t.stride(0) != 1):
            raise ValueError(f"{name}: expected a contiguous ({M},) tensor, got shape {tuple(t.shape)}")
    if mean.dtype != rstd.dtype:
        raise ValueError(f"mean/rstd: dtypes differ ({mean.dtype} vs {rstd.dtype})")

    dev = x.device
    store_dw = bool(need_weight_grad) and weight is not None
    store_db = bool(need_bias_grad) and bias is not None
    dx = torch.empty((M, N), dtype=x.dtype, device=dev)
    if M == 0:
        dw = torch.zeros((N,), dtype=weight.dtype, device=dev) if store_dw else None
        db = torch.zeros((N,), dtype=bias.dtype, device=dev) if store_db else None
        return dx, dw, db

    acc = mean.dtype
    has_dh = dh is not None
    dhh = dh if has_dh else dy
    w = weight if weight is not None else x
    b = bias if bias is not None else x
    sx, sdy, sdh = _row_stride(x), _row_stride(dy), _row_stride(dhh)
    sm = _sm_count(x)
    flags = dict(HAS_DH=has_dh, HAS_W=weight is not None, HAS_B=bias is not None,
                 ACT=activation, STORE_DW=store_dw, STORE_DB=store_db, SOFT_RNE=not x.is_cuda,
                 RMS=rms)
    tile = _bwd_tile_config(M, N)
    with _device_ctx(x):
        if tile is not None:
            block_m, block_n, nw = tile
            num_blocks = triton.cdiv(M, block_m)
            if sm is None:
                progs = _CPU_PROGRAMS
            else:  # one full wave: ~16 resident warps per SM (these kernels use <= 128 regs)
                progs = sm * _programs_per_sm(nw)
            progs = max(1, min(progs, num_blocks))
            pdw = torch.empty((progs, N), dtype=acc, device=dev) if store_dw else mean
            pdb = torch.empty((progs, N), dtype=acc, device=dev) if store_db else mean
            _ln_bwd_fused_kernel[(progs,)](
                x, dy, dhh, dx, w, b, mean, rstd, pdw, pdb, sx, sdy, sdh, M, N,
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=nw, **flags,
            )
        else:
            chunk, nw = _bwd_chunk_config()
            n_chunks = triton.cdiv(N, chunk)
            c1 = torch.empty((M,), dtype=acc, device=dev)
            c2 = torch.empty((M,), dtype=acc, device=dev)
            _ln_bwd_rowsums_chunked_kernel[(M,)](
                x, dy, w, b, mean, rstd, c1, c2, sx, sdy, N,
                HAS_W=weight is not None, HAS_B=bias is not None, ACT=activation,
                BLOCK_N=chunk, RMS=rms, num_warps=nw,
            )
            if sm is None:
                progs = _CPU_PROGRAMS
            else:  # the (P, n_chunks) grid fits in one wave (equal work per program)
                progs = (sm * _programs_per_sm(nw)) // n_chunks
            progs = max(1, min(progs, M))
            pdw = torch.empty((progs, N), dtype=acc, device=dev) if store_dw else mean
            pdb = torch.empty((progs, N), dtype=acc, device=dev) if store_db else mean
            _ln_bwd_apply_chunked_kernel[(progs, n_chunks)](
                x, dy, dhh, dx, w, b, mean, rstd, c1, c2, pdw, pdb, sx, sdy, sdh, M, N,
                BLOCK_N=chunk, num_warps=nw, **flags,
            )
    dw = pdw.sum(0).to(weight.dtype) if store_dw else None
    db = pdb.sum(0).to(bias.dtype) if store_db else None
    return dx, dw, db
