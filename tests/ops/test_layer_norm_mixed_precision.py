"""torch's mixed precision, as F.layer_norm / F.rms_norm and the unfused code give it:
float16/bfloat16 x with float32 weight/bias (output in x's dtype, parameter gradients in the
parameters' dtype), and a residual stream in another dtype than the sublayer output (the
dtypes of h = x + residual and y by type promotion)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pydl
from pydl import ops
from tests.utils.inputs import BF16, FP16, FP32, dtype_id, randn


def _leaf(t):
    return t.detach().clone().requires_grad_()


def _compare(got, want, dtype):
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == FP32 else dict(atol=2e-2, rtol=2e-2)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=dtype_id)
def test_low_precision_x_with_float32_params(op, dtype):
    x = randn((6, 33), dtype, "cpu")
    w, b = 1 + 0.1 * randn((33,), FP32, "cpu"), 0.1 * randn((33,), FP32, "cpu")
    g = randn((6, 33), dtype, "cpu")
    if op == "layer_norm":
        ours = lambda x, w, b: ops.layer_norm(x, w, b)  # noqa: E731
        theirs = lambda x, w, b: F.layer_norm(x, (33,), w, b)  # noqa: E731
    else:
        ours = lambda x, w, b: ops.rms_norm(x, w)  # noqa: E731
        theirs = lambda x, w, b: F.rms_norm(x, (33,), w)  # noqa: E731
    a = [_leaf(t) for t in (x, w, b)]
    c = [_leaf(t) for t in (x, w, b)]
    ya, yc = ours(*a), theirs(*c)
    assert ya.dtype == yc.dtype == dtype
    _compare([ya], [yc], dtype)
    used = 2 if op == "layer_norm" else 1
    ga = torch.autograd.grad(ya, a[:1 + used], g)
    gc = torch.autograd.grad(yc, c[:1 + used], g)
    assert [t.dtype for t in ga] == [dtype] + [FP32] * used  # parameter grads in their own dtype
    _compare(ga, gc, dtype)


@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
@pytest.mark.parametrize("x_dtype,r_dtype", [(BF16, FP32), (FP32, BF16), (FP16, FP32)],
                         ids=["bf16+fp32", "fp32+bf16", "fp16+fp32"])
def test_residual_stream_dtype_promotes_like_torch(op, x_dtype, r_dtype):
    x, r = randn((5, 24), x_dtype, "cpu"), randn((5, 24), r_dtype, "cpu")
    w = 1 + 0.1 * randn((24,), FP32, "cpu")
    b = 0.1 * randn((24,), FP32, "cpu")
    a = [_leaf(t) for t in (x, r, w, b)]
    c = [_leaf(t) for t in (x, r, w, b)]
    if op == "add_layer_norm":
        ya, ha = ops.add_layer_norm(a[0], a[1], a[2], a[3])
        hc = c[0] + c[1]
        yc = F.layer_norm(hc, (24,), c[2], c[3])
    else:
        ya, ha = ops.add_rms_norm(a[0], a[1], a[2])
        hc = c[0] + c[1]
        yc = F.rms_norm(hc, (24,), c[2])
    promoted = torch.promote_types(x_dtype, r_dtype)
    assert ha.dtype == hc.dtype == promoted and ya.dtype == yc.dtype
    _compare([ya, ha], [yc, hc], FP32 if promoted == FP32 else BF16)
    gy, gh = randn(ya.shape, ya.dtype, "cpu"), randn(ha.shape, ha.dtype, "cpu")
    ga = torch.autograd.grad((ya, ha), a[:2], (gy, gh))
    gc = torch.autograd.grad((yc, hc), c[:2], (gy, gh))
    assert [t.dtype for t in ga] == [x_dtype, r_dtype]
    _compare(ga, gc, BF16)


def test_forced_kernel_backend_explains_mixed_precision():
    x = randn((4, 8), BF16, "cpu")
    with pytest.raises(pydl.BackendError, match="mixed precision"):
        ops.layer_norm(x, torch.ones(8), torch.zeros(8), backend="native")


def test_module_with_float32_params_takes_bfloat16_input():
    m = pydl.nn.LayerNorm(8)  # float32 parameters: an AMP / FSDP checkpoint's layout
    x = randn((3, 8), BF16, "cpu")
    torch.testing.assert_close(m(x), torch.nn.LayerNorm(8)(x))


def test_other_mixes_are_refused_like_before():
    x = randn((4, 8), FP32, "cpu")
    with pytest.raises(TypeError, match="weight"):
        ops.layer_norm(x, torch.ones(8, dtype=BF16))
