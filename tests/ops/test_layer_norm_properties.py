"""Property tests (hypothesis) for the LayerNorm family: shapes, strides, dtypes, flags.

Besides "equals the float64 reference" over random problems, these check properties that
do not depend on the reference at all: rows are independent, power-of-two scaling and
shifting leave the result unchanged, the three ops agree with each other, and h is exactly
torch's x + residual.

Hypothesis runs derandomized with no example database (profile "pydl" in tests/conftest.py);
HYPOTHESIS_PROFILE=explore draws fresh examples.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pydl import ops
from tests.ops.layer_norm_cases import (ADD_LN, LN, VARIANTS, Case, _copy_case, _grads, check_op, ln_mod,
                                        make_case, run_pydl)
from tests.utils.inputs import LAYOUTS
from tests.tolerances import assert_close_to_ref

FP32, BF16, FP16, FP64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
MAX_ELEMENTS = 1 << 14
INTERESTING_N = [127, 128, 129, 255, 256, 257, 511, 513, 1023, 1024, 1025, 2047, 2049, 4097]


@st.composite
def problems(draw, dtypes, variants=tuple(VARIANTS)):
    n = draw(st.one_of(st.integers(1, 70), st.sampled_from(INTERESTING_N)))
    lead = draw(st.lists(st.integers(0, 5), max_size=3))
    rows = math.prod(lead)
    if rows * n > MAX_ELEMENTS:  # keep each example small: one leading dim, capped
        lead = [min(max(1, MAX_ELEMENTS // n), 16)]
    v = draw(st.sampled_from(list(variants)))
    return dict(
        v=v,
        shape=tuple(lead) + (n,),
        dtype=draw(st.sampled_from(list(dtypes))),
        weight=draw(st.booleans()),
        bias=draw(st.booleans()),
        layout=draw(st.sampled_from(LAYOUTS)),
        grad_layout=draw(st.sampled_from(["contiguous", "ones", "expanded", "transposed"])),
        used=draw(st.sampled_from(["all", "y", "h"])) if v.has_residual else "all",
        eps=draw(st.sampled_from([1e-5, 1e-6, 1e-3, 0.1])),
        scale=draw(st.sampled_from([1.0, 0.05, 30.0])),
        offset=draw(st.sampled_from([0.0, 2.0, -7.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _ill_conditioned(p) -> bool:
    """mean/std > 10: float32 is judged by the stress rule (tests/tolerances.py)."""
    return abs(p["offset"]) / p["scale"] > 10


def _run(p, device, backend):
    torch.manual_seed(p["seed"])
    check_op(p["v"], p["shape"], p["dtype"], device, backend, weight=p["weight"], bias=p["bias"], eps=p["eps"],
             layout=p["layout"], grad_layout=p["grad_layout"], used=p["used"], scale=p["scale"],
             offset=p["offset"], stress=_ill_conditioned(p))


@settings(max_examples=120)
@given(p=problems([FP32, BF16, FP64]))
def test_native_cpu_matches_reference(p):
    _run(p, "cpu", "native")


@settings(max_examples=50)
@given(p=problems([FP32, BF16, FP16, FP64]))
def test_torch_backend_matches_reference(p):
    _run(p, "cpu", "torch")


@settings(max_examples=40)
@given(p=problems([FP32, FP64]), data=st.data())
def test_rows_are_independent(p, data):
    """Any subset of rows, computed alone, gives the same rows (values and dx)."""
    torch.manual_seed(p["seed"])
    v, dtype = p["v"], p["dtype"]
    n = p["shape"][-1]
    m = data.draw(st.integers(1, 12), label="rows")
    case = make_case(v, (m, n), dtype, "cpu", weight=p["weight"], bias=p["bias"], layout=p["layout"],
                     scale=p["scale"], offset=p["offset"])
    keep = sorted(set(data.draw(st.lists(st.integers(0, m - 1), min_size=1, max_size=m), label="keep")))
    idx = torch.tensor(keep)
    outs = run_pydl(v, case.x, case.residual, case.weight, case.bias, p["eps"], "native")
    g = [torch.randn(o.shape, dtype=dtype) for o in outs]
    (dx,) = _grads(outs, [case.x], g)
    sub = Case(case.x.detach()[idx].clone().requires_grad_(), None if case.residual is None else case.residual.detach()[idx],
               None if case.weight is None else case.weight.detach(), None if case.bias is None else case.bias.detach())
    outs2 = run_pydl(v, sub.x, sub.residual, sub.weight, sub.bias, p["eps"], "native")
    (dx2,) = _grads(outs2, [sub.x], [t[idx] for t in g])
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == FP32 else dict(rtol=1e-12, atol=1e-12)
    for a, b in zip(outs2, outs):
        torch.testing.assert_close(a, b[idx], **tol)
    torch.testing.assert_close(dx2, dx[idx], **tol)


@settings(max_examples=40)
@given(p=problems([FP32, FP64], variants=[LN, VARIANTS[1], VARIANTS[2]]),
       k=st.sampled_from([-6, -2, 3, 9]))
def test_power_of_two_scaling_invariance(p, k):
    """LN(2^k x; eps 4^k) == LN(x; eps): the scaling is exact in floating point."""
    torch.manual_seed(p["seed"])
    v, dtype = p["v"], p["dtype"]
    case = make_case(v, p["shape"], dtype, "cpu", weight=p["weight"], bias=p["bias"], layout=p["layout"],
                     requires_grad=False)
    a = 2.0 ** k
    y1 = run_pydl(v, case.x, None, case.weight, case.bias, p["eps"], "native")[0]
    y2 = run_pydl(v, case.x * a, None, case.weight, case.bias, p["eps"] * a * a, "native")[0]
    tol = dict(rtol=2e-6, atol=2e-6) if dtype == FP32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y2, y1, **tol)


@settings(max_examples=20)
@given(p=problems([FP64], variants=[LN]), c=st.sampled_from([-100.0, 0.5, 64.0]))
def test_shift_invariance_float64(p, c):
    torch.manual_seed(p["seed"])
    case = make_case(LN, p["shape"], FP64, "cpu", weight=p["weight"], bias=p["bias"], requires_grad=False)
    y1 = ops.layer_norm(case.x, case.weight, case.bias, 1e-5, backend="native")
    y2 = ops.layer_norm(case.x + c, case.weight, case.bias, 1e-5, backend="native")
    torch.testing.assert_close(y2, y1, rtol=1e-9, atol=1e-9)


@settings(max_examples=40)
@given(p=problems([FP32, BF16], variants=[ADD_LN]), backend=st.sampled_from(["native", "torch"]))
def test_ops_agree_with_each_other(p, backend):
    """add_layer_norm == (layer_norm(x + r), x + r) with h bit-exact; gelu op == gelu of the LN op."""
    torch.manual_seed(p["seed"])
    dtype = p["dtype"]
    case = make_case(ADD_LN, p["shape"], dtype, "cpu", weight=p["weight"], bias=p["bias"], layout=p["layout"],
                     scale=p["scale"], offset=p["offset"], requires_grad=False)
    x, r, w, b = case.x, case.residual, case.weight, case.bias
    for act, approx in ((None, None), ("gelu", "none"), ("gelu_tanh", "tanh")):
        y, h = ops.add_layer_norm(x, r, w, b, p["eps"], act, backend=backend)
        assert torch.equal(h, x + r), "h must be exactly torch's x + residual in the input dtype"
        ln_h = ops.layer_norm(x + r, w, b, p["eps"], backend=backend)
        if act is None:
            torch.testing.assert_close(y, ln_h, rtol=1e-5, atol=1e-5) if dtype == FP32 else \
                torch.testing.assert_close(y, ln_h, rtol=2 ** -7, atol=1e-2)
        else:
            g = ops.layer_norm_gelu(x + r, w, b, p["eps"], approx, backend=backend)
            torch.testing.assert_close(y, g, rtol=1e-5, atol=1e-5) if dtype == FP32 else \
                torch.testing.assert_close(y, g, rtol=2 ** -7, atol=1e-2)
            if dtype == FP32:
                want = torch.nn.functional.gelu(ln_h, approximate=approx)
                torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5)
    y0, h0 = ops.add_layer_norm(x, torch.zeros_like(x), w, b, p["eps"], backend=backend)
    assert torch.equal(h0, x)
    c32 = _copy_case(case, FP64, requires_grad=False)
    assert_close_to_ref(y0, ln_mod.layer_norm_ref(c32.x, c32.weight, c32.bias, p["eps"]),
                        torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, p["eps"]), dtype=dtype,
                        stress=_ill_conditioned(p))
