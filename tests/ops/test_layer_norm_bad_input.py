"""LayerNorm family, bad input (DESIGN §7): a clear ValueError/TypeError naming the argument
(shapes, dtypes, devices, eps, activation names), torch's behaviour for an empty normalized
dim, and NaN/Inf passing through like torch. (The shared cases: tests/ops/layer_norm_cases.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pydl import ops
from tests.ops.layer_norm_cases import (ADD_LN_GELU_TANH, LN, LN_GELU, VARIANTS, VIDS, run_pydl, run_ref,
                                        run_torch, vid)
from tests.tolerances import assert_close_to_ref
from tests.utils.inputs import BF16, FP32, FP64, dtype_id, randn

OPS3 = ["layer_norm", "layer_norm_gelu", "add_layer_norm"]
BACKENDS_CPU = [None, "native", "torch"]


def _call(op, x, residual=None, *, backend=None, **kw):
    if op == "add_layer_norm":
        return ops.add_layer_norm(x, x.detach().clone() if residual is None else residual, backend=backend, **kw)
    return getattr(ops, op)(x, backend=backend, **kw)


# ---- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS_CPU)
@pytest.mark.parametrize("op", OPS3)
def test_bad_weight_shape(op, backend, device):
    x = randn((4, 8), FP32, device)
    for w in (randn((9,), FP32, device), randn((1, 8), FP32, device), randn((4,), FP32, device)):
        with pytest.raises(ValueError, match="weight"):
            _call(op, x, weight=w, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS_CPU)
@pytest.mark.parametrize("op", OPS3)
def test_bad_bias_shape(op, backend, device):
    x = randn((4, 8), FP32, device)
    for b in (randn((7,), FP32, device), randn((8, 1), FP32, device)):
        with pytest.raises(ValueError, match="bias"):
            _call(op, x, weight=randn((8,), FP32, device), bias=b, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_bad_residual_shape(backend, device):
    x = randn((4, 8), FP32, device)
    for r in (randn((4, 9), FP32, device), randn((5, 8), FP32, device), randn((2, 4, 8), FP32, device)):
        with pytest.raises(ValueError, match="residual"):
            ops.add_layer_norm(x, r, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS_CPU)
@pytest.mark.parametrize("op", OPS3)
def test_dtype_mismatch(op, backend, device):
    x = randn((4, 8), FP32, device)
    for other in (BF16, FP64):
        with pytest.raises(TypeError, match="weight"):
            _call(op, x, weight=randn((8,), other, device), backend=backend)
        with pytest.raises(TypeError, match="bias"):
            _call(op, x, bias=randn((8,), other, device), backend=backend)
    if op == "add_layer_norm":
        with pytest.raises(TypeError, match="residual"):
            ops.add_layer_norm(x, torch.ones((4, 8), dtype=torch.int32, device=device), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS_CPU)
@pytest.mark.parametrize("op", OPS3)
def test_integer_x(op, backend, device):
    for dt in (torch.int64, torch.int32, torch.bool):
        x = torch.ones((4, 8), dtype=dt, device=device)
        with pytest.raises(TypeError, match=r"\bx\b"):
            _call(op, x, residual=torch.ones((4, 8), device=device), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS_CPU)
@pytest.mark.parametrize("op", OPS3)
def test_x_without_a_normalized_dim(op, backend, device):
    x = torch.zeros((), device=device)
    with pytest.raises(ValueError, match=r"\bx\b"):
        _call(op, x, residual=torch.zeros((), device=device), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS_CPU)
@pytest.mark.parametrize("op", OPS3)
def test_empty_normalized_dim_like_torch(op, backend, device):
    """A last dim of 0 gives torch's empty output (and empty / zero gradients), not an error."""
    for shape in ((3, 0), (0,), (0, 0), (2, 3, 0)):
        x = torch.zeros(shape, device=device, requires_grad=True)
        w = torch.ones(0, device=device, requires_grad=True)
        b = torch.zeros(0, device=device, requires_grad=True)
        out = _call(op, x, residual=torch.zeros(shape, device=device), backend=backend, weight=w, bias=b)
        y = out[0] if isinstance(out, tuple) else out
        expected = F.layer_norm(x, (0,), w, b)
        assert y.shape == expected.shape and y.dtype == expected.dtype
        gx, gw, gb = torch.autograd.grad(y.sum(), (x, w, b), allow_unused=True, materialize_grads=True)
        assert gx.shape == x.shape and gw.shape == (0,) and gb.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS_CPU)
@pytest.mark.parametrize("op", OPS3)
def test_negative_eps(op, backend, device):
    x = randn((4, 8), FP32, device)
    for eps in (-1e-5, -1.0):
        with pytest.raises(ValueError, match="eps"):
            _call(op, x, eps=eps, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS_CPU)
@pytest.mark.parametrize("op", OPS3)
def test_nan_eps(op, backend, device):
    x = randn((4, 8), FP32, device)
    with pytest.raises(ValueError, match="eps"):
        _call(op, x, eps=float("nan"), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_bad_approximate_and_activation(backend, device):
    x = randn((4, 8), FP32, device)
    for bad in ("sigmoid", "", "None"):
        with pytest.raises(ValueError) as ei:
            ops.layer_norm_gelu(x, approximate=bad, backend=backend)
        assert "approximate" in str(ei.value) or repr(bad) in str(ei.value)
    for bad in ("relu", "", "GELU_TANH"):
        with pytest.raises(ValueError) as ei:
            ops.add_layer_norm(x, x, activation=bad, backend=backend)
        assert "activation" in str(ei.value) or repr(bad) in str(ei.value)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", BACKENDS_CPU)
@pytest.mark.parametrize("op", OPS3)
def test_device_mix(op, backend):
    x = randn((4, 8), FP32, "cuda")
    with pytest.raises(ValueError, match="weight"):
        _call(op, x, weight=randn((8,), FP32, "cpu"), backend=backend)
    with pytest.raises(ValueError, match="bias"):
        _call(op, x, bias=randn((8,), FP32, "cpu"), backend=backend)
    if op == "add_layer_norm":
        with pytest.raises(ValueError, match="residual"):
            ops.add_layer_norm(x, randn((4, 8), FP32, "cpu"), backend=backend)
        with pytest.raises(ValueError, match="residual"):
            ops.add_layer_norm(randn((4, 8), FP32, "cpu"), x, backend=backend)


# ---- NaN / Inf pass through like torch ------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS_CPU)
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=dtype_id)
@pytest.mark.parametrize("n", [7, 1025])
@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_nan_inf_propagate_like_torch(v, n, dtype, backend, device):
    m = 6
    x = randn((m, n), dtype, device)
    x[1, n // 2] = float("nan")
    x[3, 0] = float("inf")
    x[4, n - 1] = -float("inf")
    r = randn((m, n), dtype, device) if v.has_residual else None
    w, b = randn((n,), dtype, device), randn((n,), dtype, device)
    w[n - 1] = float("nan")  # one NaN column
    outs = run_pydl(v, x, r, w, b, backend=backend)
    touts = run_torch(v, x, r, w, b)
    for o, t in zip(outs, touts):
        assert torch.equal(torch.isnan(o), torch.isnan(t)), "NaN pattern differs from torch"
        assert torch.equal(torch.isposinf(o), torch.isposinf(t)) and torch.equal(torch.isneginf(o), torch.isneginf(t))
    # the clean rows are unaffected: compare them with the reference
    clean = torch.tensor([0, 2, 5], device=device)
    cols = slice(0, n - 1)  # the NaN weight column is NaN in every row
    refs = run_ref(v, x[clean], None if r is None else r[clean], w, b, h_dtype=dtype)
    tclean = run_torch(v, x[clean], None if r is None else r[clean], w, b)
    assert_close_to_ref(outs[0][clean][:, cols], refs[0][:, cols], tclean[0][:, cols], dtype=dtype, name="clean rows")
    assert torch.isfinite(outs[0][clean][:, cols]).all()


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("v", [LN, LN_GELU, ADD_LN_GELU_TANH], ids=vid)
def test_nan_row_backward_stays_in_its_row(v, backend):
    m, n = 5, 97
    x = randn((m, n), FP32, "cpu")
    x[2, 3] = float("nan")
    r = randn((m, n), FP32, "cpu") if v.has_residual else None
    x.requires_grad_()
    outs = run_pydl(v, x, r, None, None, backend=backend)
    gy = randn((m, n), FP32, "cpu")
    (dx,) = torch.autograd.grad(outs[0], [x], gy)
    assert torch.isnan(dx[2]).all()
    keep = torch.tensor([0, 1, 3, 4])
    x64 = x.detach()[keep].double().requires_grad_()
    ref = run_ref(v, x64, None if r is None else r[keep], None, None)[0]
    (want,) = torch.autograd.grad(ref, [x64], gy[keep].double())
    assert_close_to_ref(dx[keep], want, name="dx of clean rows")
