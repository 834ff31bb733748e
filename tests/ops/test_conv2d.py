"""conv2d: F.conv2d's semantics (the reference and the default dispatch against F.conv2d), every
argument form, depthwise routing, the backend choice, bad input, property tests (hypothesis) and
every torch mode (tests/utils/modes.py) on the torch backend."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import pydl
from pydl.ops.conv2d import choose_backend, conv2d, conv2d_ref
from tests.ops.conv2d_cases import ConvCase, check_case
from tests.utils.checks import assert_error_mentions, gradcheck_named
from tests.utils.inputs import FP32, FP64

conv_mod = sys.modules["pydl.ops.conv2d"]  # the module (the attribute pydl.ops.conv2d is the function)
from tests.utils.modes import MODES, OpUnderTest, no_recompile_limit  # noqa: E402

ARG_FORMS = [
    dict(), dict(stride=2), dict(stride=(2, 1), padding=(1, 0)), dict(padding="same"), dict(padding="valid"),
    dict(padding=[2, 1], dilation=[2, 1]), dict(padding="same", dilation=2), dict(groups=2), dict(stride=(1, 3)),
]


@pytest.mark.parametrize("kw", ARG_FORMS, ids=str)
def test_reference_and_default_dispatch_are_f_conv2d(kw):
    """conv2d_ref (float64) == F.conv2d in float64; on CPU the default backend is F.conv2d itself."""
    x, w, b = torch.randn(2, 4, 9, 8), torch.randn(6, 4 // kw.get("groups", 1), 3, 2), torch.randn(6)
    torch.testing.assert_close(conv2d_ref(x, w, b, **kw), F.conv2d(x.double(), w.double(), b.double(), **kw),
                               atol=1e-12, rtol=1e-10)
    assert choose_backend(x, w, **kw) == "torch"
    assert torch.equal(conv2d(x, w, b, **kw), F.conv2d(x, w, b, **kw))


def test_unbatched_empty_and_channels_last_like_torch():
    x, w = torch.randn(4, 6, 6), torch.randn(3, 4, 3, 3)
    assert torch.equal(conv2d(x, w, padding=1), F.conv2d(x, w, padding=1))
    e = torch.randn(0, 4, 6, 6)
    assert conv2d(e, w).shape == F.conv2d(e, w).shape == (0, 3, 4, 4)
    cl = torch.randn(2, 4, 6, 6).to(memory_format=torch.channels_last)
    assert conv2d(cl, w).is_contiguous(memory_format=torch.channels_last)


def test_gradcheck_float64():
    x, w, b = torch.randn(1, 4, 5, 6, dtype=FP64), torch.randn(4, 2, 2, 3, dtype=FP64), torch.randn(4, dtype=FP64)
    assert gradcheck_named(lambda x, w, b: conv2d(x, w, b, stride=(2, 1), padding="valid", dilation=(1, 2), groups=2),
                           [("x", x), ("w", w), ("b", b)])


# ---- depthwise routing ------------------------------------------------------------------------------

def test_depthwise_calls_are_routed(monkeypatch):
    """groups == C > 1 with (C·m, 1, kh, kw) weights go to pydl.ops.depthwise_conv2d with the
    call's arguments; other grouped calls do not."""
    seen = []
    fake = types.ModuleType("pydl.ops.depthwise_conv2d")
    fake.depthwise_conv2d = lambda *a, **k: seen.append((a, k)) or F.conv2d(*a, groups=a[0].shape[1])
    monkeypatch.setitem(sys.modules, "pydl.ops.depthwise_conv2d", fake)
    monkeypatch.setattr(conv_mod, "_DEPTHWISE", None)
    x, w, b = torch.randn(2, 4, 6, 6), torch.randn(8, 1, 3, 3), torch.randn(8)
    out = conv2d(x, w, b, 1, "same", 1, 4)
    assert torch.equal(out, F.conv2d(x, w, b, 1, "same", 1, 4))
    (args, kwargs), = seen
    assert args[3:] == (1, "same", 1) and kwargs == {"backend": None}
    conv2d(x, torch.randn(8, 2, 3, 3), None, groups=2)                       # grouped, not depthwise
    assert len(seen) == 1


def test_depthwise_routing_to_the_real_op(monkeypatch):
    dw = pytest.importorskip("pydl.ops.depthwise_conv2d")
    calls = []
    real = dw.depthwise_conv2d
    monkeypatch.setattr(dw, "depthwise_conv2d", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(conv_mod, "_DEPTHWISE", None)
    x, w = torch.randn(2, 6, 9, 9), torch.randn(12, 1, 5, 5)
    torch.testing.assert_close(conv2d(x, w, None, 2, 2, 1, 6), F.conv2d(x, w, None, 2, 2, 1, 6))
    assert calls == [1]


# ---- backend choice and bad input -----------------------------------------------------------------

def test_forced_triton_says_why_not():
    x, w = torch.randn(1, 2, 5, 5, dtype=FP64), torch.randn(2, 2, 3, 3, dtype=FP64)
    with pytest.raises(pydl.BackendError) as e:
        conv2d(x, w, backend="triton")
    assert_error_mentions(e, "float64")
    with pytest.raises(ValueError) as e:
        conv2d(x, w, backend="cudnn")
    assert_error_mentions(e, "unknown backend")


def _xw(C=4, Cout=6, k=3, groups=1, dtype=FP32):
    return torch.randn(2, C, 7, 7, dtype=dtype), torch.randn(Cout, C // groups, k, k, dtype=dtype)


BAD = [
    (lambda x, w: dict(x=x, weight=w[:, :2]), ValueError, ["channels", "groups"]),          # weight/groups mismatch
    (lambda x, w: dict(x=x, weight=w[:, :2], groups=2), None, None),                          # fine: grouped
    (lambda x, w: dict(x=x, weight=w[:5, :2], groups=2), ValueError, ["divisible", "groups"]),
    (lambda x, w: dict(x=x, weight=w, groups=0), ValueError, ["groups"]),
    (lambda x, w: dict(x=x, weight=w, groups=1.0), ValueError, ["groups"]),
    (lambda x, w: dict(x=x, weight=w, padding=-1), ValueError, ["padding"]),
    (lambda x, w: dict(x=x, weight=w, padding=(1, -2)), ValueError, ["padding"]),
    (lambda x, w: dict(x=x, weight=w, padding="full"), ValueError, ["padding"]),
    (lambda x, w: dict(x=x, weight=w, padding="same", stride=2), ValueError, ["same", "strided"]),
    (lambda x, w: dict(x=x, weight=w, stride=0), ValueError, ["stride"]),
    (lambda x, w: dict(x=x, weight=w, stride=(1, 2, 3)), TypeError, ["stride"]),
    (lambda x, w: dict(x=x, weight=w, dilation=0), ValueError, ["dilation"]),
    (lambda x, w: dict(x=x.long(), weight=w), TypeError, ["x must be a floating"]),
    (lambda x, w: dict(x=x, weight=w.int()), TypeError, ["weight must be a floating"]),
    (lambda x, w: dict(x=x, weight=w.double()), TypeError, ["dtype"]),
    (lambda x, w: dict(x=x, weight=w, bias=torch.randn(5)), ValueError, ["bias"]),
    (lambda x, w: dict(x=x, weight=w, bias=torch.randn(6).long()), TypeError, ["bias"]),
    (lambda x, w: dict(x=x, weight=w[..., 0]), ValueError, ["weight"]),
    (lambda x, w: dict(x=x[0, 0], weight=w), ValueError, ["x must be"]),
    (lambda x, w: dict(x=x[..., :2, :2], weight=w), ValueError, ["smaller than the dilated kernel"]),
    (lambda x, w: dict(x=[1.0], weight=w), TypeError, ["x must be a Tensor"]),
]


@pytest.mark.parametrize("i", range(len(BAD)))
@pytest.mark.parametrize("backend", [None, "torch", "triton"])
def test_bad_input(i, backend):
    mutate, exc, words = BAD[i]
    kwargs = mutate(*_xw())
    if exc is None:
        assert conv2d(**kwargs, backend="torch").shape == (2, 6, 5, 5)
        return
    with pytest.raises(exc) as e:
        conv2d(**kwargs, backend=backend)
    assert_error_mentions(e, *words)


# ---- properties -------------------------------------------------------------------------------------

@st.composite
def conv_cases(draw, max_hw=9):
    """Random valid F.conv2d configurations (max_hw >= 7: every kernel span fits)."""
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin_g, cout_g = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    form = draw(st.sampled_from(["int", "pair", "same", "valid"]))
    sh, sw = (1, 1) if form == "same" else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    pad = {"int": draw(st.integers(0, 2)), "pair": (draw(st.integers(0, 2)), draw(st.integers(0, 2))),
           "same": "same", "valid": "valid"}[form]
    ph, pw = (pad, pad) if isinstance(pad, int) else pad if isinstance(pad, tuple) else (0, 0)
    h = draw(st.integers(max(1, dh * (kh - 1) + 1 - 2 * ph), max_hw))
    w = draw(st.integers(max(1, dw * (kw - 1) + 1 - 2 * pw), max_hw))
    return ConvCase(N=draw(st.integers(1, 2)), C=cin_g * groups, H=h, W=w, Cout=cout_g * groups, KH=kh, KW=kw,
                    stride=(sh, sw), padding=pad, dilation=(dh, dw), groups=groups, bias=draw(st.booleans()),
                    channels_last=draw(st.booleans()))


@settings(max_examples=40)
@given(c=conv_cases())
def test_property_torch_backend_vs_float64(c):
    check_case(c, FP32, "cpu", "torch")


# ---- every torch mode ---------------------------------------------------------------------------

def _inputs(dtype):
    def make(shape, requires_grad):
        g = torch.Generator().manual_seed(shape[0] * 31 + shape[1])
        mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_(requires_grad)  # noqa: E731
        return mk(shape[0], 4, 4, shape[1]), mk(4, 2, 2, 2), mk(4)
    return make


def mode_op(backend, dtype, atol, rtol, shapes=((2, 5), (3, 5))) -> OpUnderTest:
    kw = dict(stride=(1, 2), padding="valid", groups=2)
    return OpUnderTest("conv2d", lambda x, w, b: conv2d(x, w, b, **kw, backend=backend),
                       lambda x, w, b: conv2d_ref(x, w, b, **kw).to(x.dtype), _inputs(dtype), shapes=shapes,
                       vmap_in_dims=(0,), atol=atol, rtol=rtol)


@pytest.mark.parametrize("mode", [m for m in MODES if not m.startswith("compile")])
def test_modes_torch_backend(mode):
    """The torch backend is F.conv2d itself behind the checks (compiled: tests/ops/test_conv2d_triton.py
    runs every compile mode through the same function on the triton backend)."""
    with no_recompile_limit():
        MODES[mode](mode_op("torch", FP64, 1e-9, 1e-7))
