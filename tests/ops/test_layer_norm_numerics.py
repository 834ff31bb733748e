"""LayerNorm family, numerically hard inputs (native on CPU): eps against a tiny variance,
a large mean over a small variance, constant rows, and the GELU activation alone over a
wide range. (The shared cases: tests/ops/layer_norm_cases.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pydl import ops
from tests.ops.layer_norm_cases import (ADD_LN_GELU, ADD_LN_GELU_TANH, LN, LN_GELU, VARIANTS, VIDS, check_op,
                                        constant_rows_case, ln_mod, vid)
from tests.tolerances import assert_close_to_ref
from tests.utils.inputs import BF16, FP32, FP64, dtype_id, randn


# ---- eps and numerically hard inputs --------------------------------------------------------------

@pytest.mark.parametrize("eps", [0.0, 1e-6, 1e-5, 1e-3, 0.5])
@pytest.mark.parametrize("v", [LN, LN_GELU, ADD_LN_GELU_TANH], ids=vid)
def test_eps_is_inside_the_sqrt(v, eps):
    """Variance ~1e-6, comparable to eps: a misplaced or ignored eps is a large error."""
    check_op(v, (9, 97), FP32, "cpu", "native", eps=eps, scale=1e-3)
    check_op(v, (9, 97), FP64, "cpu", "native", eps=eps, scale=1e-3)


def test_default_eps_is_1e_5(device):
    x = randn((6, 97), FP32, device, scale=1e-3)
    other = ln_mod.layer_norm_ref(x, eps=1e-6)
    assert_close_to_ref(ops.layer_norm(x), ln_mod.layer_norm_ref(x, eps=1e-5))
    assert_close_to_ref(ops.layer_norm_gelu(x), ln_mod.layer_norm_ref(x, eps=1e-5, activation="gelu"))
    assert_close_to_ref(ops.add_layer_norm(x, torch.zeros_like(x))[0], ln_mod.layer_norm_ref(x, eps=1e-5))
    assert (ln_mod.layer_norm_ref(x, eps=1e-5) - other).abs().max() > 1e-2  # eps really matters here


@pytest.mark.parametrize("offset", [1e3, -3e4])
@pytest.mark.parametrize("n", [7, 1025])
@pytest.mark.parametrize("v", [LN, ADD_LN_GELU], ids=vid)
def test_large_mean_small_variance(v, n, offset):
    """mean >> std: a one-pass E[x^2] - E[x]^2 variance in float32 is >1000x torch's error here."""
    rows = min(64, max(5, 65536 // n))
    check_op(v, (rows, n), FP32, "cpu", "native", offset=offset, stress=True)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=dtype_id)
@pytest.mark.parametrize("n", [97, 1025, 65536])
@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_constant_rows(v, n, dtype):
    """Zero variance: xhat = 0 exactly, so y = act(bias) (torch gets this exactly); never NaN.

    rstd = 1/sqrt(eps) ~ 316 amplifies any rounding error in the mean of a constant row
    (e.g. padding rows): the mean of a constant row must come out exact.
    """
    outs = check_op(v, (5, n), dtype, "cpu", "native", case=constant_rows_case(v, n, dtype, "cpu"))
    assert torch.isfinite(outs[0]).all()


# ---- the activation alone, over a wide range --------------------------------------------------------

@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_native_cpu_activation_accuracy_over_a_wide_range(approximate):
    """weight = 0 makes z = bias, so y = gelu(bias) and dbias = gelu'(bias) (dy = 1, one row).

    A dense float32 sweep of [-12, 12] (both tails and the CPU normal-CDF clamp at |z| = 5.5):
    the error relative to 1 + |z| may be at most twice torch's own float32 F.gelu error;
    gelu(+-inf) and its gradient are inf/NaN exactly where float64 torch's are (float32
    F.gelu gives NaN at +inf, float64 gives inf)."""
    n = 20001
    z = torch.linspace(-12, 12, n)
    z[n // 2 + 1] = 5.5  # the clamp point itself
    z[0], z[-1] = -float("inf"), float("inf")
    b = z.clone().requires_grad_()
    y = ops.layer_norm_gelu(randn((1, n), FP32, "cpu"), torch.zeros(n), b, approximate=approximate,
                            backend="native")
    (db,) = torch.autograd.grad(y, [b], torch.ones_like(y))
    z64 = z.double().requires_grad_()
    ref = F.gelu(z64, approximate=approximate)
    (dref,) = torch.autograd.grad(ref, [z64], torch.ones_like(ref))
    tz = z.clone().requires_grad_()
    ty = F.gelu(tz, approximate=approximate)
    (tdb,) = torch.autograd.grad(ty, [tz], torch.ones_like(ty))
    for out, exact in ((y[0], ref), (db, dref)):
        out, exact = out.detach(), exact.detach()
        assert torch.equal(out.isnan(), exact.isnan()) and torch.equal(out.isinf(), exact.isinf())
    finite = slice(1, n - 1)
    size = 1 + z64.detach()[finite].abs()

    def err(out, exact):
        return ((out.detach().double()[finite] - exact.detach()[finite]).abs() / size).max().item()

    assert err(y[0], ref) <= 2 * err(ty, ref) + 1e-8, "forward"
    assert err(db, dref) <= 2 * err(tdb, dref) + 1e-8, "backward"
