"""The one tolerance table of the test suite (DESIGN §7), and the comparison helper.

Every result is compared with a float64 reference computed from the *same* (already rounded)
inputs.

* float64, float32: a fixed elementwise bound  |out - ref| <= atol * scale + rtol * |ref|,
  with scale = max(1, max|ref|, hint) (so summed gradients such as dweight are judged relative
  to their size). ``hint`` is the caller's natural size of the computation where cancellation
  can make the exact result much smaller than its terms (dx = rstd * (g - mean(g) - ...)
  is O(rstd * |g|) even where it cancels to ~0). float32 has one escape hatch: when torch's own float32 result is given and is
  itself outside the fixed bound (e.g. the N = 1 backward, where torch's formula cancels
  catastrophically), pydl passes if it is no worse than the low-precision rule below with
  the float32 floors.
* float16, bfloat16 ("low precision"): pydl's error may be at most FACTOR (2x) torch's own
  error in that dtype (torch's F.layer_norm / F.gelu / add run in that dtype on the same inputs),
  plus a small floor:  err(pydl) <= 2 * err(torch) + atol + rtol * size(ref).
  This is checked for the maximum error and for the mean error of the tensor.

NaN/Inf positions must match the reference exactly (they pass through like torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class FixedTol:
    """Elementwise: |out - ref| <= atol * max(1, max|ref|) + rtol * |ref|."""

    rtol: float
    atol: float


@dataclass(frozen=True)
class RelativeTol:
    """err(out) <= factor * err(torch_out) + atol + rtol * size(ref), for max and mean errors."""

    factor: float
    atol: float
    rtol: float


FIXED: dict[torch.dtype, FixedTol] = {
    torch.float64: FixedTol(rtol=1e-9, atol=1e-10),
    torch.float32: FixedTol(rtol=1e-5, atol=5e-6),
}

LOW_PRECISION: dict[torch.dtype, RelativeTol] = {
    # floors: atol well below one unit in the last place at 1.0; rtol = half an ulp of size(ref)
    torch.bfloat16: RelativeTol(factor=2.0, atol=1e-3, rtol=2.0 ** -9),
    torch.float16: RelativeTol(factor=2.0, atol=1e-4, rtol=2.0 ** -12),
}

# float32 fallback when torch's own float32 result misses the fixed bound.
FLOAT32_VS_TORCH = RelativeTol(factor=2.0, atol=1e-6, rtol=1e-6)
# float32 stress inputs (mean/std up to 3e4): no fixed bound is meaningful there; the result
# must stay within 8x torch's error. A one-pass E[x^2] - E[x]^2 variance is >1000x off.
FLOAT32_STRESS_VS_TORCH = RelativeTol(factor=8.0, atol=1e-6, rtol=1e-6)


def tolerance_for(dtype: torch.dtype):
    if dtype in FIXED:
        return FIXED[dtype]
    if dtype in LOW_PRECISION:
        return LOW_PRECISION[dtype]
    raise KeyError(f"no tolerance for {dtype}")


def _nonfinite_mismatch(out: torch.Tensor, ref: torch.Tensor) -> Optional[str]:
    for what, fn in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        a, b = fn(out), fn(ref)
        if not torch.equal(a, b):
            diff = (a != b).nonzero()
            return (f"{what} positions differ: {int(a.sum())} in the result, {int(b.sum())} in the "
                    f"reference; first mismatch at index {tuple(diff[0].tolist())}")
    return None


def _relative_rule(err: torch.Tensor, terr: torch.Tensor, ref: torch.Tensor, tol: RelativeTol, hint: float = 0.0):
    """(ok, description) for the max- and mean-error rule."""
    absref = ref.abs()
    max_bound = tol.factor * terr.max().item() + tol.atol + tol.rtol * max(absref.max().item(), hint)
    mean_bound = tol.factor * terr.mean().item() + tol.atol + tol.rtol * max(absref.mean().item(), hint)
    max_err, mean_err = err.max().item(), err.mean().item()
    ok = max_err <= max_bound and mean_err <= mean_bound
    desc = (f"max err {max_err:.3e} (bound {max_bound:.3e}; torch's max err {terr.max().item():.3e}), "
            f"mean err {mean_err:.3e} (bound {mean_bound:.3e}; torch's mean err {terr.mean().item():.3e}), "
            f"max|ref| {absref.max().item():.3e}")
    return ok, desc


def assert_close_to_ref(out: torch.Tensor, ref: torch.Tensor, torch_out: Optional[torch.Tensor] = None,
                        *, dtype: Optional[torch.dtype] = None, name: str = "output",
                        scale: Optional[float] = None, stress: bool = False) -> None:
    """Assert that ``out`` (computed in ``dtype``) is as close to the float64 ``ref`` as the table says.

    torch_out: torch's own result in ``dtype`` for the same inputs; required for float16/bfloat16.
    scale: optional natural magnitude of the computation (a lower bound for the size of ``ref``
    used by the absolute parts of the bounds).
    stress: float32 only: judge by FLOAT32_STRESS_VS_TORCH instead of the fixed bound.
    """
    hint = 0.0 if scale is None else float(scale)
    dtype = out.dtype if dtype is None else dtype
    assert isinstance(out, torch.Tensor), f"{name}: expected a tensor, got {type(out).__name__}"
    assert tuple(out.shape) == tuple(ref.shape), f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert out.dtype == dtype, f"{name}: dtype {out.dtype}, expected {dtype}"
    o = out.detach().to(torch.float64)
    r = ref.detach().to(device=o.device, dtype=torch.float64)
    if not (torch.isfinite(o).all() and torch.isfinite(r).all()):
        bad = _nonfinite_mismatch(o, r)
        assert bad is None, f"{name} ({dtype}): {bad}"
        finite = torch.isfinite(r)
        o, r = o[finite], r[finite]
    else:
        finite = None
        o, r = o.reshape(-1), r.reshape(-1)
    if o.numel() == 0:
        return
    err = (o - r).abs()
    t = None
    if torch_out is not None:
        t = torch_out.detach().to(device=o.device, dtype=torch.float64)
        assert tuple(torch_out.shape) == tuple(ref.shape), f"{name}: torch_out has shape {tuple(torch_out.shape)}"
        t = t[finite] if finite is not None else t.reshape(-1)
        t = torch.where(torch.isfinite(t), t, torch.full_like(t, float("inf")))
    if dtype in LOW_PRECISION:
        assert t is not None, f"{name}: torch_out is required for {dtype}"
        ok, desc = _relative_rule(err, (t - r).abs(), r, LOW_PRECISION[dtype], hint)
        assert ok, f"{name} ({dtype}) is more than {LOW_PRECISION[dtype].factor}x torch's error: {desc}"
        return
    if stress and dtype == torch.float32:
        assert t is not None, f"{name}: torch_out is required for a stress comparison"
        ok, desc = _relative_rule(err, (t - r).abs(), r, FLOAT32_STRESS_VS_TORCH, hint)
        assert ok, f"{name} ({dtype}) is more than {FLOAT32_STRESS_VS_TORCH.factor}x torch's error: {desc}"
        return
    tol = FIXED[dtype]
    scale = max(1.0, r.abs().max().item(), hint)
    bound = tol.atol * scale + tol.rtol * r.abs()
    over = err > bound
    if not over.any():
        return
    if dtype == torch.float32 and t is not None:
        ok, desc = _relative_rule(err, (t - r).abs(), r, FLOAT32_VS_TORCH, hint)
        if ok:
            return
    else:
        desc = ""
    i = int(torch.argmax(err - bound))
    raise AssertionError(
        f"{name} ({dtype}): {int(over.sum())}/{err.numel()} elements outside rtol={tol.rtol} "
        f"atol={tol.atol}*{scale:.3g}; worst: got {o[i].item():.9g}, reference {r[i].item():.9g} "
        f"(|err| {err[i].item():.3e}); max |err| {err.max().item():.3e}. {desc}")
