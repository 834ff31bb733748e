"""Fused LayerNorm family: pydl.ops.layer_norm, layer_norm_gelu and add_layer_norm.

Every result (forward output and every gradient) is compared with the float64 references
of pydl.ops.layer_norm (themselves checked against F.layer_norm / F.gelu first), using the
one tolerance table in tests/tolerances.py. The tests, by concern:

* this file: the references, the signatures, native on CPU (float32, bfloat16 and float64:
  fixed tolerance + gradcheck) at every N of DESIGN §7 up to 65536, leading shapes incl.
  zero rows, non-contiguous inputs and upstream gradients, every gradient;
* test_layer_norm_numerics.py: eps, large means, constant rows, the activation alone;
* test_layer_norm_backends.py: the torch backend, the automatic choice, forced backends, $PYDL_BACKEND;
* test_layer_norm_bad_input.py: bad arguments, NaN/Inf, device mixes;
* test_layer_norm_custom_ops.py: the pydl:: custom ops (opcheck), torch.compile;
* test_layer_norm_triton.py: @pytest.mark.triton, on the GPU or under the Triton interpreter;
* test_layer_norm_cuda.py: @pytest.mark.cuda, native and triton, fp32/fp16/bf16 at GPU sizes.
* test_layer_norm_mixed_precision.py: float32 weight/bias with float16/bfloat16 x on every
  backend (native CPU, triton, @pytest.mark.cuda), residual streams of another dtype.

The LayerNorm cases (variants, run_pydl/run_ref/run_torch, make_case, check_op) are in
tests/ops/layer_norm_cases.py; the op-agnostic helpers in tests/utils/{inputs,checks}.py.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

import pydl
from pydl import ops
from tests.ops.layer_norm_cases import (ADD_LN, ADD_LN_GELU, ADD_LN_GELU_TANH, APPROXIMATE, LN, LN_GELU_TANH,
                                        OPTIONAL_AFFINE, VARIANTS, VIDS, Case, check_op, ln_mod, make_case,
                                        run_pydl, run_ref, vid)
from tests.tolerances import assert_close_to_ref
from tests.utils.checks import gradcheck_named, grads
from tests.utils.inputs import BF16, FP32, FP64, LAYOUTS, dtype_id, randn, shape_id



# ---- the references themselves --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [FP32, BF16, FP64])
@pytest.mark.parametrize("act", [None, "gelu", "gelu_tanh"])
def test_refs_match_torch_in_float64(act, dtype):
    x = randn((3, 5, 33), dtype, "cpu")
    r = randn((3, 5, 33), dtype, "cpu")
    w, b = randn((33,), dtype, "cpu"), randn((33,), dtype, "cpu")
    x64, r64, w64, b64 = (t.double() for t in (x, r, w, b))

    def act_fn(z):
        return z if act is None else F.gelu(z, approximate=APPROXIMATE[act])

    for kw in ({}, {"weight": w}, {"weight": w, "bias": b}, {"bias": b}):
        kw64 = {k: t.double() for k, t in kw.items()}
        y = ln_mod.layer_norm_ref(x, eps=1e-3, activation=act, **kw)
        assert y.dtype == FP64 and y.shape == x.shape
        torch.testing.assert_close(y, act_fn(F.layer_norm(x64, (33,), eps=1e-3, **kw64)), rtol=1e-12, atol=1e-12)
        y2, h2 = ln_mod.add_layer_norm_ref(x, r, eps=1e-3, activation=act, **kw)
        assert y2.dtype == FP64 and h2.dtype == FP64
        torch.testing.assert_close(h2, x64 + r64, rtol=0, atol=0)
        torch.testing.assert_close(y2, act_fn(F.layer_norm(x64 + r64, (33,), eps=1e-3, **kw64)),
                                   rtol=1e-12, atol=1e-12)
    # defaults: eps=1e-5, activation None, no affine (tiny variance so eps matters)
    xs = x64 * 1e-3
    torch.testing.assert_close(ln_mod.layer_norm_ref(xs), F.layer_norm(xs, (33,), eps=1e-5), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(ln_mod.layer_norm_ref(xs), F.layer_norm(xs, (33,), eps=1e-6))
    y0, h0 = ln_mod.add_layer_norm_ref(xs, xs)
    torch.testing.assert_close(y0, F.layer_norm(2 * xs, (33,), eps=1e-5), rtol=1e-12, atol=1e-12)


def test_public_signatures():
    """Argument names, order and defaults follow F.layer_norm / F.gelu (DESIGN §3)."""
    def params(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    P, K, E = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.empty
    assert params(ops.layer_norm) == [("x", P, E), ("weight", P, None), ("bias", P, None), ("eps", P, 1e-5),
                                      ("backend", K, None)]
    assert params(ops.layer_norm_gelu) == [("x", P, E), ("weight", P, None), ("bias", P, None),
                                           ("eps", P, 1e-5), ("approximate", P, "none"), ("backend", K, None)]
    assert params(ops.add_layer_norm) == [("x", P, E), ("residual", P, E), ("weight", P, None),
                                          ("bias", P, None), ("eps", P, 1e-5), ("activation", P, None),
                                          ("backend", K, None)]
    assert issubclass(pydl.BackendError, RuntimeError)


def test_keyword_arguments(device):
    x = randn((4, 33), FP32, device)
    w, b, r = randn((33,), FP32, device), randn((33,), FP32, device), randn((4, 33), FP32, device)
    ref = ln_mod.layer_norm_ref(x, w, b, 1e-3)
    assert_close_to_ref(ops.layer_norm(x, weight=w, bias=b, eps=1e-3), ref)
    assert_close_to_ref(ops.layer_norm(x, bias=b, weight=w, eps=1e-3), ref)
    assert_close_to_ref(ops.layer_norm_gelu(x, bias=b, approximate="tanh", weight=w, eps=1e-3),
                        ln_mod.layer_norm_ref(x, w, b, 1e-3, "gelu_tanh"))
    y, h = ops.add_layer_norm(x, residual=r, bias=b, activation="gelu", weight=w, eps=1e-3)
    ry, rh = ln_mod.add_layer_norm_ref(x, r, w, b, 1e-3, "gelu")
    assert_close_to_ref(y, ry)
    assert_close_to_ref(h, rh)


# ---- native CPU: every size --------------------------------------------------------------------------

# rows bounded so that M * N stays small (each case also runs the float64 reference + autograd)
NATIVE_CPU_SHAPES = [(37, 1), (37, 7), (37, 59), (37, 97), (19, 1023), (19, 1025), (19, 1500),
                     (5, 4096), (5, 8191), (2, 65536)]


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=dtype_id)
@pytest.mark.parametrize("shape", NATIVE_CPU_SHAPES, ids=shape_id)
@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_native_cpu_sizes(v, shape, dtype):
    check_op(v, shape, dtype, "cpu", "native")


@pytest.mark.parametrize("shape", [(37, 1), (37, 7), (37, 1025), (9, 8191), (3, 65536)], ids=shape_id)
@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_native_cpu_float64(v, shape):
    check_op(v, shape, FP64, "cpu", "native")


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=dtype_id)
@pytest.mark.parametrize("v", [LN, ADD_LN_GELU], ids=vid)
def test_native_cpu_many_rows(v, dtype):
    """Many short rows: the row-parallel split and the cross-row dweight/dbias reduction."""
    check_op(v, (4099, 33), dtype, "cpu", "native")


@pytest.mark.parametrize("v", [LN, ADD_LN_GELU], ids=vid)
def test_native_cpu_outputs_over_the_huge_page_threshold(v):
    """y, h and dx of 8.4 MB each: the kernels first advise huge pages on their whole 2 MiB
    pages (cpu_utils.h, threshold 4 MiB); every element, head and tail included, must be right."""
    check_op(v, (2048, 1031), FP32, "cpu", "native")


@pytest.mark.parametrize("shape", [(4099, 33), (3, 65536), (1, 1)], ids=shape_id)
def test_native_cpu_single_thread(shape):
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        check_op(ADD_LN_GELU, shape, FP32, "cpu", "native")
        check_op(LN, shape, FP32, "cpu", "native")
    finally:
        torch.set_num_threads(old)


LEADING = [(), (1,), (2, 3), (2, 3, 4), (0,), (2, 0), (0, 3)]


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=dtype_id)
@pytest.mark.parametrize("n", [7, 1025])
@pytest.mark.parametrize("lead", LEADING, ids=lambda s: "lead" + shape_id(s))
@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_native_cpu_leading_shapes(v, lead, n, dtype):
    check_op(v, lead + (n,), dtype, "cpu", "native")


@pytest.mark.parametrize("shape", [(0, 7), (2, 0, 1025)], ids=shape_id)
@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_zero_rows_give_zero_param_grads(v, backend, shape):
    """No rows: empty y/h/dx, and dweight/dbias exactly zero (not uninitialized memory)."""
    case = make_case(v, shape, FP32, "cpu")
    outs = run_pydl(v, case.x, case.residual, case.weight, case.bias, backend=backend)
    assert all(o.shape == case.x.shape for o in outs)
    gouts = [torch.ones_like(o) for o in outs]
    named = case.named()
    got = grads(outs, case.tensors(), gouts)
    for (n, t), g in zip(named, got):
        assert g.shape == t.shape, n
        if n in ("weight", "bias"):
            assert torch.equal(g, torch.zeros_like(g)), f"d{n} with zero rows: {g[:8]}"


@pytest.mark.parametrize("layout", LAYOUTS[1:])
@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 1025)], ids=shape_id)
@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_native_cpu_noncontiguous(v, shape, layout):
    check_op(v, shape, FP32, "cpu", "native", layout=layout)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
@pytest.mark.parametrize("v", [LN, LN_GELU_TANH, ADD_LN_GELU], ids=vid)
def test_native_cpu_noncontiguous_bf16(v, layout):
    check_op(v, (6, 97), BF16, "cpu", "native", layout=layout)


@pytest.mark.parametrize("grad_layout", ["ones", "expanded", "transposed"])
@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_native_cpu_noncontiguous_upstream_grad(v, grad_layout):
    check_op(v, (6, 97), FP32, "cpu", "native", grad_layout=grad_layout)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=dtype_id)
@pytest.mark.parametrize("used", ["y", "h"])
@pytest.mark.parametrize("v", [ADD_LN, ADD_LN_GELU, ADD_LN_GELU_TANH], ids=vid)
def test_add_layer_norm_one_output_used(v, used, dtype):
    """Gradients when only y or only h feeds the loss (the other's gradient is None)."""
    check_op(v, (6, 97), dtype, "cpu", "native", used=used)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=dtype_id)
@OPTIONAL_AFFINE
@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_native_cpu_weight_bias_optional(v, weight, bias, dtype):
    check_op(v, (13, 97), dtype, "cpu", "native", weight=weight, bias=bias)


@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_partial_requires_grad(v):
    """Only some inputs require grad: those get correct gradients, the others none."""
    case = make_case(v, (5, 59), FP32, "cpu", requires_grad=False)
    named = case.named()
    for i, (name, _) in enumerate(named):
        leaves = [t.detach().clone().requires_grad_(j == i) for j, (_, t) in enumerate(named)]
        c = Case(*[dict(zip([n for n, _ in named], leaves)).get(k) for k in ("x", "residual", "weight", "bias")])
        outs = run_pydl(v, c.x, c.residual, c.weight, c.bias, backend="native")
        loss = sum((o * torch.linspace(-1, 1, o.shape[-1])).sum() for o in outs)
        (g,) = torch.autograd.grad(loss, [leaves[i]])
        c64 = c.copy(FP64)
        refs = run_ref(v, c64.x, c64.residual, c64.weight, c64.bias)
        loss64 = sum((o * torch.linspace(-1, 1, o.shape[-1], dtype=FP64)).sum() for o in refs)
        (want,) = torch.autograd.grad(loss64, [dict(c64.named())[name]])
        assert_close_to_ref(g, want, name=f"{v.id} d{name}")
        for j, leaf in enumerate(leaves):
            if j != i:
                assert leaf.grad is None


@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_outputs_do_not_alias_inputs(v):
    case = make_case(v, (4, 33), FP32, "cpu", requires_grad=False)
    before = [t.clone() for _, t in case.named()]
    outs = run_pydl(v, case.x, case.residual, case.weight, case.bias, backend="native")
    for o in outs:
        o.add_(1.0)
    for (n, t), b in zip(case.named(), before):
        assert torch.equal(t, b), f"writing to an output changed {n}"
    if v.has_residual:
        assert outs[0].data_ptr() != outs[1].data_ptr()


def test_no_grad_and_inference_mode(device):
    x = randn((4, 33), FP32, device).requires_grad_()
    w = randn((33,), FP32, device).requires_grad_()
    ref = ln_mod.layer_norm_ref(x.detach(), w.detach())
    with torch.no_grad():
        y = ops.layer_norm(x, w)
    assert not y.requires_grad
    assert_close_to_ref(y, ref)
    with torch.inference_mode():
        y2, h2 = ops.add_layer_norm(x, x, w, activation="gelu")
        assert y2.grad_fn is None and h2.grad_fn is None
    assert_close_to_ref(y2, ln_mod.add_layer_norm_ref(x.detach(), x.detach(), w.detach(), activation="gelu")[0])


# ---- gradcheck in float64 -----------------------------------------------------------------------------

def _gradcheck_native(v, case, eps):
    """torch.autograd.gradcheck of the native op over every tensor argument of ``case``."""
    def fn(x, residual=None, weight=None, bias=None):
        return run_pydl(v, x, residual, weight, bias, eps, "native")

    return gradcheck_named(fn, case.named(), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("shape", [(3, 7), (2, 2, 5), (1, 1)], ids=shape_id)
@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_gradcheck_native_float64(v, shape):
    assert _gradcheck_native(v, make_case(v, shape, FP64, "cpu"), 1e-3)


@OPTIONAL_AFFINE
@pytest.mark.parametrize("v", [LN, LN_GELU_TANH, ADD_LN_GELU], ids=vid)
def test_gradcheck_native_float64_optional_affine(v, weight, bias):
    case = make_case(v, (3, 6), FP64, "cpu", weight=weight, bias=bias, layout="sliced")
    assert _gradcheck_native(v, case, 1e-5)
