"""depthwise_conv2d ≡ F.conv2d(..., groups=C): forward and every gradient against float64 F.conv2d over
layouts (NCHW, channels_last, non-contiguous views), dtypes, kernels 1..31 (odd, even, non-square),
stride, dilation, padding (ints, pairs, "same" with even kernels, "valid", larger than the kernel),
multipliers, batch 1 / empty; memory format kept; determinism; gradcheck; opcheck; every torch mode;
backend choice; bad input. Device-generic: PYDL_TEST_DEVICE=cuda runs the same tests on the GPU."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import pydl
from pydl.ops import depthwise_conv2d, depthwise_conv2d_ref
from tests.tolerances import assert_close_to_ref
from tests.utils.checks import assert_error_mentions, opcheck_calls, record_calls
from tests.utils.inputs import BF16, FP16, FP32, FP64
from tests.utils.modes import MODES, OpUnderTest, no_recompile_limit

DW = sys.modules["pydl.ops.depthwise_conv2d"]
LAYOUTS = ["nchw", "channels_last", "sliced", "permuted"]


def make_x(shape, dtype, device, layout="nchw"):
    """x (N, C, H, W) stored as ``layout``: NCHW, channels_last, a slice of a wider tensor (no dense
    layout: copied once), or a (N, H, C, W) tensor permuted (odd strides)."""
    N, C, H, W = shape
    base = torch.randn(shape, dtype=FP32 if dtype != FP64 else FP64).to(dtype)
    if layout == "nchw":
        t = base.to(device)
    elif layout == "channels_last":
        t = base.to(device).contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        big = torch.zeros((N, C, H, W + 3), dtype=dtype, device=device)
        big[..., 1:W + 1] = base.to(device)
        t = big[..., 1:W + 1]
    else:
        t = base.to(device).permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    return t


def make_case(N, C, H, W, kh, kw, m=1, dtype=FP32, device="cpu", layout="nchw", bias=True):
    x = make_x((N, C, H, W), dtype, device, layout).requires_grad_()
    w = (torch.randn(C * m, 1, kh, kw, dtype=FP32 if dtype != FP64 else FP64) / (kh * kw) ** 0.5).to(dtype)
    w = w.to(device).requires_grad_()
    b = torch.randn(C * m, dtype=FP32 if dtype != FP64 else FP64).to(dtype).to(device).requires_grad_() if bias else None
    return x, w, b


def magnitudes(x, w, b, dy, stride, padding, dilation):
    """The float64 results over |inputs|: the natural size of each sum (the tolerances' scale)."""
    xa, wa = x.detach().double().abs().requires_grad_(), w.detach().double().abs().requires_grad_()
    ya = depthwise_conv2d_ref(xa, wa, None, stride, padding, dilation)
    ya.backward(dy.double().abs())
    return ya.max().item(), xa.grad.max().item(), wa.grad.max().item(), dy.double().abs().sum((0, 2, 3)).max().item()


def check_call(x, w, b, stride=1, padding=0, dilation=1, backend="native", dy_layout="like"):
    """pydl's forward and gradients against float64 F.conv2d (and torch's own low-precision result)."""
    y = depthwise_conv2d(x, w, b, stride, padding, dilation, backend=backend)
    ref = depthwise_conv2d_ref(x, w, b, stride, padding, dilation)
    dy = torch.randn(ref.shape, dtype=FP32).to(x.dtype).to(x.device)
    if dy_layout == "channels_last":
        dy = dy.contiguous(memory_format=torch.channels_last)
    low = x.dtype in (BF16, FP16)
    t_out = F.conv2d(x, w, b, stride, padding, dilation, groups=x.shape[1]) if low else None
    hy, hx, hw, hb = magnitudes(x, w, b, dy, stride, padding, dilation)
    assert_close_to_ref(y, ref, t_out, dtype=x.dtype, name="y", scale=hy)
    ins = [t for t in (x, w, b) if t is not None]
    got = torch.autograd.grad(y, ins, dy)
    want = torch.autograd.grad(ref, ins, dy.double(), allow_unused=True)
    t_grads = torch.autograd.grad(t_out, ins, dy) if low else (None,) * len(ins)
    for name, g, r, tg, h in zip(("dx", "dweight", "dbias"), got, want, t_grads, (hx, hw, hb)):
        assert_close_to_ref(g, r, tg, dtype=x.dtype, name=name, scale=h)
    return y


# ---- values --------------------------------------------------------------------------------------

CONFIGS = [  # (N, C, H, W, kh, kw, m, stride, padding, dilation)
    (2, 8, 13, 11, 3, 3, 1, 1, 1, 1),
    (2, 16, 14, 14, 7, 7, 1, 1, 3, 1),  # ConvNeXt block
    (1, 5, 9, 17, 7, 7, 1, 1, 3, 1),  # batch 1, odd C
    (3, 6, 15, 15, 3, 3, 1, 2, 1, 1),  # MobileNet stride 2
    (2, 4, 12, 10, 4, 2, 1, 1, "same", 1),  # even, non-square "same"
    (2, 3, 11, 12, 3, 5, 2, 1, (1, 2), 1),  # multiplier 2
    (1, 4, 16, 16, 3, 3, 1, 1, 2, 2),  # dilation
    (2, 3, 8, 9, 5, 3, 1, (2, 1), (4, 3), (1, 2)),  # padding larger than the kernel span
    (2, 7, 10, 10, 1, 1, 1, 1, 0, 1),  # 1x1
    (1, 4, 31, 33, 31, 31, 1, 1, 15, 1),  # RepLKNet-like 31x31
    (1, 3, 5, 6, 13, 13, 1, 1, "same", 1),  # kernel larger than the input
    (2, 9, 7, 7, 7, 7, 1, 1, "valid", 1),  # 1x1 output
    (1, 3, 6, 6, 2, 2, 3, 2, 0, 1),  # even kernel, stride 2, multiplier 3
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "x".join(map(str, c[:6])) + f"-m{c[6]}-s{c[7]}-p{c[8]}-d{c[9]}")
def test_values_float32(cfg, layout, device):
    N, C, H, W, kh, kw, m, s, p, d = cfg
    x, w, b = make_case(N, C, H, W, kh, kw, m, FP32, device, layout)
    check_call(x, w, b, s, p, d)


@pytest.mark.parametrize("dtype", [BF16, FP16, FP64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[3], CONFIGS[4], CONFIGS[5]], ids=["k7", "s2", "same-even", "m2"])
def test_values_other_dtypes(cfg, layout, dtype, device):
    if dtype not in (DW._NATIVE_CUDA_DTYPES if device.type == "cuda" else DW._NATIVE_CPU_DTYPES):
        pytest.skip(f"no native {dtype} kernel on {device.type}")
    N, C, H, W, kh, kw, m, s, p, d = cfg
    x, w, b = make_case(N, C, H, W, kh, kw, m, dtype, device, layout)
    check_call(x, w, b, s, p, d)


def test_no_bias_and_dy_in_other_layout(device):
    x, w, _ = make_case(2, 8, 12, 12, 5, 5, 1, FP32, device, "nchw", bias=False)
    check_call(x, w, None, 1, 2, 1, dy_layout="channels_last")
    x, w, _ = make_case(2, 8, 12, 12, 5, 5, 1, FP32, device, "channels_last", bias=False)
    check_call(x, w, None, 1, 2, 1)


@st.composite
def problems(draw):
    k = draw(st.sampled_from([1, 2, 3, 4, 5, 7, 9, 13]))
    kw = draw(st.sampled_from([k, k, 1, 3]))
    d = draw(st.sampled_from([1, 1, 2]))
    s = draw(st.sampled_from([1, 1, 2, 3]))
    H = draw(st.integers(1, 20))
    W = draw(st.integers(1, 20))
    pad = draw(st.sampled_from(["int", "pair", "same", "valid"]))
    if pad == "same" and s != 1:
        pad = "int"
    ph = draw(st.integers(0, k + 1))
    pw = draw(st.integers(0, kw + 1))
    padding = {"int": ph, "pair": (ph, pw), "same": "same", "valid": "valid"}[pad]
    g = DW.conv_geometry("t", (k, kw), s, padding, d)
    if H + g[2] + g[3] < d * (k - 1) + 1 or W + g[4] + g[5] < d * (kw - 1) + 1:
        H, W = H + d * (k - 1) + 1, W + d * (kw - 1) + 1
    return dict(N=draw(st.integers(1, 3)), C=draw(st.integers(1, 10)), H=H, W=W, kh=k, kw=kw,
                m=draw(st.sampled_from([1, 1, 1, 2])), stride=s, padding=padding, dilation=d,
                layout=draw(st.sampled_from(LAYOUTS)), bias=draw(st.booleans()))


@settings(max_examples=60, deadline=None)
@given(p=problems())
def test_property_float32(p):
    x, w, b = make_case(p["N"], p["C"], p["H"], p["W"], p["kh"], p["kw"], p["m"], FP32, DEVICE[0], p["layout"],
                        p["bias"])
    check_call(x, w, b, p["stride"], p["padding"], p["dilation"])


DEVICE = [torch.device("cpu")]


@pytest.fixture(autouse=True)
def _device_for_properties(device):
    DEVICE[0] = device  # hypothesis tests cannot take function-scoped fixtures


# ---- layouts, determinism, edge cases --------------------------------------------------------------

@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_output_and_grad_keep_the_memory_format(layout, device):
    x, w, b = make_case(2, 8, 10, 10, 3, 3, 1, FP32, device, layout)
    y = depthwise_conv2d(x, w, b, padding=1, backend="native")
    t = F.conv2d(x, w, b, padding=1, groups=8)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt) and t.is_contiguous(memory_format=fmt)
    y.backward(torch.ones_like(y))
    assert x.grad.is_contiguous(memory_format=fmt)


def test_channels_last_input_is_not_copied(device):
    x, w, b = make_case(2, 16, 12, 12, 7, 7, 1, FP32, device, "channels_last")
    calls = record_calls(lambda: depthwise_conv2d(x.detach(), w.detach(), b.detach(), padding=3, backend="native"),
                         namespace="aten")
    assert not [c for c in calls if "clone" in str(c[0]) or "copy" in str(c[0]) or "contiguous" in str(c[0])], calls


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_weight_grad_is_deterministic(layout, device):
    x, w, b = make_case(4, 8, 20, 20, 7, 7, 1, FP32, device, layout)
    dy = torch.randn(4, 8, 20, 20, device=device)
    runs = [torch.autograd.grad(depthwise_conv2d(x, w, b, padding=3, backend="native"), (w, b), dy) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_empty_batch_and_unbatched_input(device):
    x, w, b = make_case(1, 4, 6, 6, 3, 3, 1, FP32, device)
    e = torch.empty(0, 4, 6, 6, device=device, requires_grad=True)
    y = depthwise_conv2d(e, w, b, padding=1, backend="native")
    assert y.shape == (0, 4, 6, 6)
    gw, gb = torch.autograd.grad(y.sum(), (w, b))
    assert torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros_like(b))
    u = x[0].detach()
    torch.testing.assert_close(depthwise_conv2d(u, w, b, padding=1, backend="native"),
                               F.conv2d(u, w, b, padding=1, groups=4))


def test_nan_and_inf_pass_through(device):
    x, w, b = make_case(1, 3, 8, 8, 3, 3, 1, FP32, device)
    x = x.detach().clone()
    x[0, 1, 4, 4] = float("nan")
    x[0, 2, 0, 0] = float("inf")
    y = depthwise_conv2d(x, w, b, padding=1, backend="native")
    t = F.conv2d(x, w, b, padding=1, groups=3)
    assert torch.equal(torch.isnan(y), torch.isnan(t)) and torch.equal(torch.isinf(y), torch.isinf(t))


def test_gradcheck_float64(device):
    x, w, b = make_case(2, 3, 7, 6, 3, 2, 2, FP64, device)
    for args in ((1, 1, 1), (2, "valid", 1), (1, "same", 2)):
        assert torch.autograd.gradcheck(lambda x_, w_, b_: depthwise_conv2d(x_, w_, b_, *args, backend="native"),
                                        (x, w, b))


def test_opcheck_of_the_custom_ops(device):
    x, w, b = make_case(2, 4, 7, 8, 3, 3, 2, FP32, device, "channels_last")
    calls = record_calls(lambda: torch.ops.pydl.depthwise_conv2d_fwd(x, w, b, [2, 1, 1, 2, 0, 1, 1, 2]).sum().backward())
    assert {c[0]._schema.name for c in calls} == {"pydl::depthwise_conv2d_fwd", "pydl::depthwise_conv2d_bwd"}
    opcheck_calls(calls, forward_with_grad=True)


# ---- torch modes ---------------------------------------------------------------------------------

def _op(stride, padding, dilation, layout):
    def inputs(shape, requires_grad):  # the same tensors for the same shape (modes compare two calls)
        torch.manual_seed(shape[0])
        x, w, b = make_case(shape[0], 3, 9, 8, 3, 3, 2, FP64, DEVICE[0], layout)
        return tuple(t.detach().requires_grad_(requires_grad) for t in (x, w, b))

    return OpUnderTest(f"depthwise_conv2d-{layout}", lambda x, w, b: depthwise_conv2d(x, w, b, stride, padding,
                                                                                        dilation, backend="native"),
                       lambda x, w, b: F.conv2d(x, w, b, stride, padding, dilation, groups=x.shape[1]), inputs,
                       shapes=((2, 3), (3, 3)), vmap_in_dims=(0,))


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_modes(mode, layout, device):
    with no_recompile_limit():
        MODES[mode](_op(1, "same", 1, layout) if layout == "nchw" else _op(2, 1, 1, layout))


def test_autocast_runs_in_the_autocast_dtype(device):
    x, w, b = make_case(2, 8, 10, 10, 3, 3, 1, FP32, device, "channels_last")
    low = BF16 if device.type == "cpu" else FP16
    with torch.autocast(device.type, dtype=low):
        y = depthwise_conv2d(x, w, b, padding=1, backend="native")
        t = F.conv2d(x, w, b, padding=1, groups=8)
    assert y.dtype == t.dtype == low
    assert_close_to_ref(y, depthwise_conv2d_ref(x.to(low), w.to(low), b.to(low), 1, 1), t, dtype=low)


# ---- backend choice and bad input -----------------------------------------------------------------

def test_default_backend_and_large_kernels(device):
    x = torch.randn(1, 2, 40, 40, device=device)
    assert DW.choose_backend(x, torch.randn(2, 1, 7, 7, device=device)) == "native"
    w = torch.randn(2, 1, 33, 3, device=device)
    assert DW.choose_backend(x, w) == "torch"
    torch.testing.assert_close(depthwise_conv2d(x, w, padding=16), F.conv2d(x, w, padding=16, groups=2))
    with pytest.raises(pydl.backends.BackendError) as e:
        depthwise_conv2d(x, w, padding=16, backend="native")
    assert_error_mentions(e, "31")


def test_torch_backend_is_f_conv2d(device):
    x, w, b = make_case(2, 4, 9, 9, 3, 3, 1, FP32, device, "channels_last")
    check_call(x, w, b, 2, 1, 1, backend="torch")


def _bad(mutate):
    x, w, b = torch.randn(2, 4, 8, 8), torch.randn(4, 1, 3, 3), torch.randn(4)
    args = dict(x=x, weight=w, bias=b, stride=1, padding=1, dilation=1)
    mutate(args)
    return args


BAD = [
    (lambda a: a.update(weight=torch.randn(6, 1, 3, 3)), ValueError, ["multiple", "channels"]),
    (lambda a: a.update(weight=torch.randn(4, 2, 3, 3)), ValueError, ["weight", "(C*m, 1, KH, KW)"]),
    (lambda a: a.update(weight=torch.randn(4, 3, 3)), ValueError, ["weight"]),
    (lambda a: a.update(bias=torch.randn(5)), ValueError, ["bias"]),
    (lambda a: a.update(padding=-1), ValueError, ["padding", ">= 0"]),
    (lambda a: a.update(padding="full"), ValueError, ["padding"]),
    (lambda a: a.update(stride=0), ValueError, ["stride", ">= 1"]),
    (lambda a: a.update(stride=(1, 2, 3)), TypeError, ["stride"]),
    (lambda a: a.update(dilation=0), ValueError, ["dilation"]),
    (lambda a: a.update(stride=2, padding="same"), ValueError, ["same", "strided"]),
    (lambda a: a.update(x=torch.randint(0, 3, (2, 4, 8, 8))), TypeError, ["x", "floating"]),
    (lambda a: a.update(weight=a["weight"].double()), TypeError, ["dtype"]),
    (lambda a: a.update(x=torch.randn(4, 8)), ValueError, ["x", "(N, C, H, W)"]),
    (lambda a: a.update(x=torch.randn(2, 4, 2, 2), padding=0), ValueError, ["smaller than the dilated kernel"]),
    (lambda a: a.update(x=[1.0]), TypeError, ["x", "Tensor"]),
]


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("mutate,exc,words", BAD, ids=range(len(BAD)))
def test_bad_input(mutate, exc, words, backend):
    with pytest.raises(exc) as e:
        depthwise_conv2d(**_bad(mutate), backend=backend)
    assert_error_mentions(e, *words)
