"""conv2d, the triton backend (@pytest.mark.triton): compiled on a CUDA GPU, or run by the Triton
interpreter on CPU (tiny shapes: the whole file runs in about a minute on one core). Every kernel
— forward (per-tap and FLAT K), data gradient (stride phases), weight gradient (split-K, per-tap
and FLAT N), the 1×1 GEMM path — against float64 F.conv2d, both layouts, float32 / bfloat16 /
float16, determinism, the custom ops (opcheck), torch.compile and every torch mode."""

from __future__ import annotations

import importlib
import os

os.environ.setdefault("PYDL_CONV2D_AUTOTUNE", "0")  # table tiles in tests (pydl/triton/conv2d.py)

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402

from pydl.ops.conv2d import conv2d, conv2d_ref  # noqa: E402
from tests.ops.conv2d_cases import ConvCase, check_case, make_inputs  # noqa: E402
from tests.ops.test_conv2d import conv_cases, mode_op  # noqa: E402
from tests.utils.checks import grads, opcheck_calls, record_calls  # noqa: E402
from tests.utils.inputs import BF16, FP16, FP32  # noqa: E402
from tests.utils.modes import MODES, no_recompile_limit  # noqa: E402

pytestmark = pytest.mark.triton
kernels = importlib.import_module("pydl.triton.conv2d")


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """float32 compared at fp32 tolerances: no tf32 on a GPU (F.conv2d's flag, which the op obeys)."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


CASES = [
    ConvCase(),                                                                       # 3×3 s1 p1
    ConvCase(N=1, C=32, Cout=8, H=5, W=4, stride=2, channels_last=True),             # 2 Cin chunks, dx phases
    ConvCase(C=6, Cout=4, H=9, W=8, stride=(2, 3), padding=(1, 2), dilation=(2, 1), groups=2, bias=False),
    ConvCase(C=3, Cout=16, H=8, W=8, KH=4, KW=4, stride=4, padding=0, channels_last=True),  # ConvNeXt stem (FLAT)
    ConvCase(C=16, Cout=8, H=6, W=6, KH=2, KW=2, stride=2, padding=0),                # ConvNeXt downsample
    ConvCase(C=16, Cout=24, H=5, W=4, KH=1, KW=1, padding=0, channels_last=True),     # 1×1: the GEMM path
    ConvCase(C=16, Cout=8, H=5, W=4, KH=1, KW=1, padding=0),                          # 1×1 NCHW (implicit)
    ConvCase(C=16, Cout=16, H=7, W=7, KH=1, KW=1, stride=2, padding=0, channels_last=True),  # 1×1 s2: dx zeros
    ConvCase(C=4, Cout=6, H=6, W=7, KH=2, KW=4, padding="same", dilation=(2, 1)),     # "same", even kernels
    ConvCase(C=8, Cout=8, H=5, W=5, KH=3, KW=3, stride=3, padding=2, dilation=2, groups=4),  # gcd(s, d) = 1
    ConvCase(C=4, Cout=4, H=9, W=9, KH=3, KW=3, stride=2, padding=1, dilation=2, groups=1),  # gcd(s, d) = 2
]


@pytest.mark.parametrize("c", CASES, ids=ConvCase.id)
def test_cases_fp32(c, triton_device):
    check_case(c, FP32, triton_device, "triton")


@pytest.mark.parametrize("dtype", [BF16, FP16], ids=str)
@pytest.mark.parametrize("c", [CASES[1], CASES[3], CASES[5]], ids=ConvCase.id)
def test_low_precision(c, dtype, triton_device):
    check_case(c, dtype, triton_device, "triton")


@settings(max_examples=6)
@given(c=conv_cases(max_hw=7))
def test_property_vs_float64(c):
    """Random configurations (F.conv2d's argument forms, groups, layouts) on the interpreter."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if c.groups > 1 and c.groups == c.C:  # depthwise calls go to depthwise_conv2d; keep them here
        c = ConvCase(**{**c.__dict__, "C": c.C * 2, "Cout": c.Cout * 2})
    check_case(c, FP32, device, "triton")


def test_weight_gradient_is_deterministic_over_splits(triton_device):
    """dW from several split-K chunks, reduced in a fixed order: bitwise equal run to run."""
    c = ConvCase(N=1, C=16, Cout=16, H=6, W=6)
    P = kernels.problem((1, 16, 6, 6), (16, 16, 3, 3), (1, 1, 1, 1, 1, 1, 1, 1), 1, False)
    split, _ = kernels.split_k(P.N * P.HO * P.WO, 1, kernels.config("dw", 16, FP32).block_k, triton_device)
    assert split > 1
    x, w, _ = make_inputs(c, FP32, triton_device)
    dy = torch.randn(1, 16, 6, 6, device=triton_device)
    first = grads([conv2d(x, w, padding=1, backend="triton")], [x, w], [dy])
    second = grads([conv2d(x, w, padding=1, backend="triton")], [x, w], [dy])
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_unbatched_and_non_contiguous_views(triton_device):
    x = torch.randn(2, 6, 9, 9, device=triton_device)[:, 1:5, ::2, 1:]              # sliced, strided
    w = torch.randn(6, 4, 3, 3, device=triton_device).transpose(2, 3)               # non-contiguous weight
    torch.testing.assert_close(conv2d(x, w, padding=1, backend="triton").double(), conv2d_ref(x, w, padding=1),
                               atol=2e-5, rtol=1e-5)
    u = torch.randn(4, 5, 5, device=triton_device)
    torch.testing.assert_close(conv2d(u, w, backend="triton").double(), conv2d_ref(u, w), atol=2e-5, rtol=1e-5)


def test_empty_batch(triton_device):
    x, w = torch.randn(0, 4, 5, 5, device=triton_device, requires_grad=True), torch.randn(2, 4, 3, 3, device=triton_device)
    out = conv2d(x, w, backend="triton")
    assert out.shape == (0, 2, 3, 3)
    out.sum().backward()
    assert x.grad.shape == x.shape


# ---- custom ops, compile, modes -----------------------------------------------------------------

def test_opcheck(triton_device):
    c = ConvCase(N=1, C=4, Cout=4, H=5, W=5, stride=2, groups=2)
    x, w, b = make_inputs(c, FP32, triton_device)

    def fwd_bwd():
        out = conv2d(x, w, b, **c.args(), backend="triton")
        out.backward(torch.randn_like(out))

    calls = record_calls(fwd_bwd)
    assert {f._schema.name for f, _, _ in calls} == {"pydl::conv2d_fwd", "pydl::conv2d_bwd_data",
                                                     "pydl::conv2d_bwd_weight"}
    opcheck_calls(calls, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


TRITON_MODE_OP = mode_op("triton", FP32, 5e-5, 1e-4, shapes=((1, 4), (2, 4)))  # jacrev: 16 outputs


# The interpreter makes every kernel run cost seconds: the modes that exercise the custom ops' fake
# impls, vmap and autograd registrations (the torch backend's modes are in test_conv2d.py).
TRITON_MODES = ["eager", "compile_static", "compile_dynamic", "export", "func_grad", "func_vmap", "double_backward"]


@pytest.mark.parametrize("mode", TRITON_MODES)
def test_modes_triton_backend(mode):
    with no_recompile_limit():
        MODES[mode](TRITON_MODE_OP)


@pytest.mark.cuda
def test_autotuned_launch(monkeypatch):
    """The GPU launch path users get (autotuning over candidate tiles), every kernel."""
    monkeypatch.setattr(kernels, "AUTOTUNE", True)
    cuda = torch.device("cuda")
    for c in (ConvCase(N=4, C=64, Cout=64, H=28, W=28, channels_last=True),
              ConvCase(N=4, C=64, Cout=256, H=14, W=14, KH=1, KW=1, padding=0, channels_last=True),
              ConvCase(N=2, C=3, Cout=96, H=32, W=32, KH=4, KW=4, stride=4, padding=0, channels_last=True)):
        check_case(c, BF16, cuda, "triton")
