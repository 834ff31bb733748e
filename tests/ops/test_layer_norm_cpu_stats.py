"""CPU native LayerNorm forward on adversarial rows: the row statistics' accuracy.

The CPU kernel's statistics are a corrected two-pass mean/variance (csrc/cpu/layer_norm.cpp).
These tests feed rows that break naive schemes and hold the native forward (float32 and
bfloat16, with and without the residual and the GELU) to torch's own accuracy:

* constant rows normalize to exactly 0 (y == bias);
* |mean| >> std (1000.1 + 1e-3 * noise, 1e4 + noise);
* one huge outlier (1e4 among N(0, 1)) at the start or at the end of the row, which defeats a
  single pass shifted by x[0];
* N = 1, 2, 3, 7, 192, 768, 4097 (empty and partial vector groups, several sum blocks).

The rule, per row: pydl's error against float64 <= 2 x torch's own float32 error against float64
+ a small floor (a few float32 ulps; bfloat16 output rounding for y). The output y and the
returned statistics (mean = stats[0], rstd = stats[1]) are both checked. torch's reference for
bfloat16 input is its float32 layer norm of the same (exactly representable) values.
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch
import torch.nn.functional as F

_ln = importlib.import_module("pydl.ops.layer_norm")

FP32, BF16, FP64 = torch.float32, torch.bfloat16, torch.float64
EPS = 1e-5
NS = [1, 2, 3, 7, 192, 768, 4097]
ULP32 = 2.0**-24  # half an ulp of 1 in float32
ULP16 = 2.0**-8  # half an ulp of 1 in bfloat16


def _rows(kind: str, m: int, n: int, g: torch.Generator) -> torch.Tensor:
    """(m, n) float64 rows of one adversarial kind (rounded to the test dtype by the caller)."""
    noise = torch.randn(m, n, generator=g, dtype=FP64)
    if kind == "normal":
        return 0.5 + 2.0 * noise
    if kind == "large_mean":  # |mean| / std ~ 1e6
        return 1000.1 + 1e-3 * noise
    if kind == "large_mean_unit":
        return 1e4 + noise
    if kind == "outlier_first":
        x = noise.clone()
        x[:, 0] = 1e4
        return x
    if kind == "outlier_last":
        x = noise.clone()
        x[:, -1] = 1e4
        return x
    raise ValueError(kind)


CONSTANTS = [0.0, 1.0, -3.7, 1000.1, 1.0 + 2.0**-23, 1e30, -1e-30, 2.0**100 * 3]


# The kernel entry point (x, residual, weight, bias, eps, act[, norm], with_stats) -> (y, h, stats);
# `norm` (0 = LayerNorm) exists once the kernels also serve RMSNorm.
_NORM_KW = {"norm": 0} if "norm" in inspect.signature(_ln._native_fwd).parameters else {}


def _native(x, residual, w, b, act):
    y, h, stats = _ln._native_fwd(x, residual, w, b, EPS, act, with_stats=True, **_NORM_KW)
    return y, h, stats


def _ref64(x64: torch.Tensor, w, b, act: int):
    """float64 y, mean, rstd of rows x64."""
    n = x64.shape[-1]
    w64 = None if w is None else w.to(FP64)
    b64 = None if b is None else b.to(FP64)
    y = F.layer_norm(x64, (n,), w64, b64, EPS)
    if act == 1:
        y = F.gelu(y)
    mean = x64.mean(-1)
    var = x64.var(-1, unbiased=False)
    return y, mean, (var + EPS).rsqrt()


def _torch32(x32: torch.Tensor, w, b, act: int):
    """torch's own float32 y, mean, rstd (the accuracy yardstick)."""
    n = x32.shape[-1]
    w32 = None if w is None else w.float()
    b32 = None if b is None else b.float()
    y, mean, rstd = torch.native_layer_norm(x32, (n,), w32, b32, EPS)
    if act == 1:
        y = F.gelu(y)
    return y, mean.reshape(-1), rstd.reshape(-1)


def _row_err(a: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    a, ref = a.to(FP64), ref.to(FP64)
    if a.dim() == 1:
        return (a - ref).abs()
    return (a - ref).abs().amax(-1)


def _assert_within(name, err_pydl, err_torch, floor):
    bound = 2.0 * err_torch + floor
    bad = err_pydl > bound
    assert not bool(bad.any()), (
        f"{name}: rows {bad.nonzero().flatten().tolist()[:8]}: pydl err {err_pydl[bad][:4].tolist()} "
        f"> 2 x torch err {err_torch[bad][:4].tolist()} + floor {floor[bad][:4].tolist()}")


def _check(x, residual, w, b, act, dtype):
    y, h, stats = _native(x, residual, w, b, act)
    xin = x if residual is None else x + residual  # torch's rounding of x + residual
    if residual is not None:
        assert torch.equal(h, xin)
    x64 = xin.to(FP64)
    ref_y, ref_mean, ref_rstd = _ref64(x64, w, b, act)
    t_y, t_mean, t_rstd = _torch32(xin.float(), w, b, act)
    mean, rstd = stats[0], stats[1]
    assert stats.dtype == FP32 and stats.shape == (2, x.shape[0])

    std = 1.0 / ref_rstd
    # mean: a couple of ulps of |mean| + std (the scale its error is judged on: y's error is
    # err(mean) * rstd); rstd: a couple of ulps.
    _assert_within("mean", _row_err(mean, ref_mean), _row_err(t_mean, ref_mean),
                   4 * ULP32 * (ref_mean.abs() + std))
    _assert_within("rstd", _row_err(rstd, ref_rstd) / ref_rstd, _row_err(t_rstd, ref_rstd) / ref_rstd,
                   torch.full_like(ref_rstd, 4 * ULP32))
    scale = ref_y.abs().amax(-1) + 1.0
    # Storing the mean in float32 alone moves y by up to half an ulp of |mean| times rstd * |w|
    # (0.5 for 1e4 + N(0, 1)): which way each row's rounding falls is luck, torch's included.
    w_max = 1.0 if w is None else float(w.float().abs().max())
    mean_rounding = 2 * ULP32 * ref_mean.abs() * ref_rstd * w_max
    if dtype == BF16:
        # y is rounded to bfloat16 (torch's bfloat16 output is too: compare its rounding of the
        # float32 result); the floor is one bfloat16 rounding.
        err_t = _row_err(t_y.to(BF16), ref_y)
        floor = 2 * ULP16 * scale + mean_rounding
    else:
        err_t = _row_err(t_y, ref_y)
        floor = 8 * ULP32 * scale + mean_rounding
    _assert_within("y", _row_err(y, ref_y), err_t, floor)


def _params(n, dtype, g, affine: bool):
    if not affine:
        return None, None
    w = (1.0 + 0.1 * torch.randn(n, generator=g, dtype=FP64)).to(dtype)
    b = (0.1 * torch.randn(n, generator=g, dtype=FP64)).to(dtype)
    return w, b


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("kind", ["normal", "large_mean", "large_mean_unit", "outlier_first", "outlier_last"])
@pytest.mark.parametrize("act", [0, 1], ids=["plain", "gelu"])
def test_adversarial_rows_native_cpu(dtype, n, kind, act):
    g = torch.Generator().manual_seed(1234 + n)
    m = 6
    x = _rows(kind, m, n, g).to(dtype)
    w, b = _params(n, dtype, g, affine=True)
    torch.set_num_threads(1)
    _check(x, None, w, b, act, dtype)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [3, 192, 768, 4097])
@pytest.mark.parametrize("kind", ["normal", "large_mean", "outlier_first", "outlier_last"])
def test_adversarial_rows_with_residual(dtype, n, kind):
    g = torch.Generator().manual_seed(99 + n)
    m = 5
    x = _rows(kind, m, n, g).to(dtype)
    r = (0.01 * torch.randn(m, n, generator=g, dtype=FP64)).to(dtype)
    w, b = _params(n, dtype, g, affine=True)
    for act in (0, 1):
        _check(x, r, w, b, act, dtype)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", NS)
def test_constant_rows_normalize_to_exactly_zero(dtype, n):
    g = torch.Generator().manual_seed(7)
    x = torch.tensor(CONSTANTS, dtype=FP64)[:, None].expand(-1, n).contiguous().to(dtype)
    m = x.shape[0]
    w, b = _params(n, dtype, g, affine=True)
    # No bias: y == 0 exactly (GELU(0) == 0 too); with a bias, y == bias exactly.
    for act in (0, 1):
        y, _, stats = _native(x, None, w, None, act)
        assert torch.equal(y, torch.zeros_like(y)), (act, y.abs().amax(-1))
        assert torch.equal(stats[0], x[:, 0].float()), "the mean of a constant row is the constant"
        assert bool(torch.isfinite(stats[1]).all())
    y, _, _ = _native(x, None, w, b, 0)
    assert torch.equal(y, b.expand(m, n))
    # Through the residual path: h = c + 0 is the same constant.
    y, h, _ = _native(x, torch.zeros_like(x), w, None, 0)
    assert torch.equal(h, x) and torch.equal(y, torch.zeros_like(y))


@pytest.mark.parametrize("threads", [1, 2])
def test_many_rows_and_threads_match_row_by_row(threads):
    """Rows are independent: a batch (any thread split) equals each row run alone."""
    g = torch.Generator().manual_seed(3)
    kinds = ["normal", "large_mean", "outlier_first", "outlier_last"]
    n = 768
    x = torch.cat([_rows(k, 3, n, g) for k in kinds]).float()
    x = x.repeat(40, 1)  # enough work for two threads
    w, b = _params(n, FP32, g, affine=True)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y, _, stats = _native(x, None, w, b, 0)
    finally:
        torch.set_num_threads(old)
    for r in (0, 5, 11, x.shape[0] - 1):
        y1, _, s1 = _native(x[r:r + 1].clone(), None, w, b, 0)
        assert torch.equal(y[r:r + 1], y1) and torch.equal(stats[:, r:r + 1], s1)
