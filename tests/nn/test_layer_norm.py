"""pydl.nn.LayerNorm / LayerNormGELU are drop-in replacements for torch.nn.LayerNorm (+ GELU).

Same constructor, parameters, state_dict keys, extra_repr; they load a torch LayerNorm's
state_dict and give torch's output and gradients (multi-dim normalized_shape included).
"""

from __future__ import annotations

import copy
import os
import importlib
import inspect
import pickle

import pytest
import torch
import torch.nn.functional as F

import pydl
from tests.tolerances import assert_close_to_ref

ln_mod = importlib.import_module("pydl.ops.layer_norm")
FP32, BF16, FP64 = torch.float32, torch.bfloat16, torch.float64

SHAPES = [8, (8,), (4, 8), [3, 5], (1,), (2, 3, 4)]
AFFINE = [(True, True), (True, False), (False, True), (False, False)]


def _torch_ln(normalized_shape, **kw):
    m = torch.nn.LayerNorm(normalized_shape, **kw)
    with torch.no_grad():  # non-trivial parameters, so a swapped/ignored weight or bias shows
        for p in m.parameters():
            p.copy_(torch.randn_like(p))
    return m


def _ns(normalized_shape):
    return (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)


def _input(ns, lead=(2, 3), dtype=FP32):
    return torch.randn(*lead, *_ns(ns), dtype=dtype)


def _check_grads(pm, tm, x, approximate=None):
    """pydl module's dx, dweight, dbias vs a float64 copy of the torch module (and torch's own)."""
    x1 = x.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    t64 = copy.deepcopy(tm).double()
    act = (lambda z: z) if approximate is None else (lambda z: F.gelu(z, approximate=approximate))  # noqa: E731
    y1, y2, y64 = pm(x1), act(tm(x2)), act(t64(x64))
    gy = torch.randn_like(y1)
    names = ["x"] + [n for n, _ in pm.named_parameters()]
    g1 = torch.autograd.grad(y1, [x1, *pm.parameters()], gy)
    g2 = torch.autograd.grad(y2, [x2, *tm.parameters()], gy)
    g64 = torch.autograd.grad(y64, [x64, *t64.parameters()], gy.double())
    # dx = rstd * (...) can cancel to ~0; judge it relative to its natural size rstd * |w| * |dy|
    k = len(tm.normalized_shape)
    rows = x64.detach().flatten(x64.dim() - k) if x64.numel() else x64.detach().reshape(0, 1)
    rstd = torch.rsqrt(rows.var(-1, correction=0) + tm.eps).max().item() if rows.numel() else 0.0
    wmax = 1.0 if tm.weight is None else max(1.0, tm.weight.abs().max().item())
    dx_scale = rstd * 1.13 * wmax * gy.abs().max().item()
    for name, a, b, r in zip(names, g1, g2, g64):
        assert_close_to_ref(a, r, b, name=f"d{name}", scale=dx_scale if name == "x" else None)


def _ref_forward(tm, x, approximate=None):
    """float64 LayerNorm(+GELU) with the torch module's parameters."""
    w = None if tm.weight is None else tm.weight.detach().double()
    b = None if tm.bias is None else tm.bias.detach().double()
    y = F.layer_norm(x.detach().double(), tm.normalized_shape, w, b, tm.eps)
    return y if approximate is None else F.gelu(y, approximate=approximate)


@pytest.mark.parametrize("elementwise_affine,bias", AFFINE)
@pytest.mark.parametrize("normalized_shape", SHAPES, ids=str)
def test_layer_norm_is_a_drop_in(normalized_shape, elementwise_affine, bias):
    kw = dict(eps=1e-4, elementwise_affine=elementwise_affine, bias=bias)
    tm = _torch_ln(normalized_shape, **kw)
    pm = pydl.nn.LayerNorm(normalized_shape, **kw)
    assert isinstance(pm, torch.nn.Module)
    assert pm.normalized_shape == tm.normalized_shape and isinstance(pm.normalized_shape, tuple)
    assert pm.eps == tm.eps and pm.elementwise_affine == tm.elementwise_affine
    assert pm.extra_repr() == tm.extra_repr()
    assert list(pm.state_dict()) == list(tm.state_dict())
    assert [(n, p.shape) for n, p in pm.named_parameters()] == [(n, p.shape) for n, p in tm.named_parameters()]
    assert pm.load_state_dict(tm.state_dict(), strict=True) is not None
    for (n, p), (_, q) in zip(pm.named_parameters(), tm.named_parameters()):
        assert torch.equal(p, q), n

    x = _input(normalized_shape)
    y, yt = pm(x), tm(x)
    assert y.shape == yt.shape and y.dtype == yt.dtype
    assert_close_to_ref(y, _ref_forward(tm, x), yt, name="y")
    _check_grads(pm, tm, x)


@pytest.mark.parametrize("normalized_shape", [8, (4, 8)], ids=str)
def test_layer_norm_defaults_match_torch(normalized_shape):
    pm, tm = pydl.nn.LayerNorm(normalized_shape), torch.nn.LayerNorm(normalized_shape)
    assert pm.eps == tm.eps == 1e-5
    assert repr(pm).split("(", 1)[1] == repr(tm).split("(", 1)[1]
    for (n, p), (_, q) in zip(pm.named_parameters(), tm.named_parameters()):
        assert torch.equal(p, q), f"initial {n} differs from torch's"
    with torch.no_grad():
        pm.weight.mul_(3)
        pm.bias.add_(1)
    pm.reset_parameters()
    assert torch.equal(pm.weight, torch.ones_like(pm.weight)) and torch.equal(pm.bias, torch.zeros_like(pm.bias))


def test_constructor_signatures():
    params = list(inspect.signature(pydl.nn.LayerNorm).parameters)
    assert params[:6] == ["normalized_shape", "eps", "elementwise_affine", "bias", "device", "dtype"]
    gparams = inspect.signature(pydl.nn.LayerNormGELU).parameters
    assert list(gparams)[:4] == ["normalized_shape", "eps", "elementwise_affine", "bias"]
    assert gparams["approximate"].default == "none"
    assert gparams["eps"].default == 1e-5
    for name in ("device", "dtype"):
        assert gparams[name].default is None


def test_torch_state_dict_round_trip():
    """pydl -> torch -> pydl, and nested inside a model (prefixed keys)."""
    tm = _torch_ln(16)
    pm = pydl.nn.LayerNorm(16)
    pm.load_state_dict(tm.state_dict())
    tm2 = torch.nn.LayerNorm(16)
    tm2.load_state_dict(pm.state_dict())
    assert torch.equal(tm2.weight, tm.weight) and torch.equal(tm2.bias, tm.bias)
    tmodel = torch.nn.Sequential(torch.nn.Linear(16, 16), _torch_ln(16))
    pmodel = torch.nn.Sequential(torch.nn.Linear(16, 16), pydl.nn.LayerNorm(16))
    pmodel.load_state_dict(tmodel.state_dict(), strict=True)
    x = torch.randn(5, 16)
    assert_close_to_ref(pmodel(x), tmodel.double()(x.double()), tmodel.float()(x))


@pytest.mark.parametrize("dtype", [FP32, BF16, FP64], ids=["fp32", "bf16", "fp64"])
def test_layer_norm_device_dtype_kwargs(dtype):
    pm = pydl.nn.LayerNorm(64, device="cpu", dtype=dtype)
    tm = torch.nn.LayerNorm(64, device="cpu", dtype=dtype)
    assert pm.weight.dtype == dtype and pm.bias.dtype == dtype and pm.weight.device.type == "cpu"
    with torch.no_grad():
        for p, q in zip(pm.parameters(), tm.parameters()):
            p.copy_(torch.randn_like(p))
            q.copy_(p)
    x = torch.randn(3, 7, 64).to(dtype)
    y = pm(x)
    assert y.dtype == dtype
    assert_close_to_ref(y, _ref_forward(tm, x), tm(x), dtype=dtype)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("elementwise_affine,bias", AFFINE)
@pytest.mark.parametrize("normalized_shape", [8, (4, 8), (1,)], ids=str)
def test_layer_norm_gelu(normalized_shape, elementwise_affine, bias, approximate):
    kw = dict(eps=1e-5, elementwise_affine=elementwise_affine, bias=bias)
    tm = _torch_ln(normalized_shape, **kw)
    pm = pydl.nn.LayerNormGELU(normalized_shape, approximate=approximate, **kw)
    assert pm.approximate == approximate
    assert list(pm.state_dict()) == list(tm.state_dict())
    pm.load_state_dict(tm.state_dict(), strict=True)  # loads a plain LayerNorm's checkpoint
    x = _input(normalized_shape)
    y = pm(x)
    yt = F.gelu(tm(x), approximate=approximate)
    assert_close_to_ref(y, _ref_forward(tm, x, approximate), yt, name="y")
    _check_grads(pm, tm, x, approximate)


def test_layer_norm_gelu_default_is_erf_and_repr_mentions_approximate():
    pm = pydl.nn.LayerNormGELU(32)
    x = torch.randn(4, 32)
    assert_close_to_ref(pm(x), F.gelu(F.layer_norm(x.double(), (32,))), F.gelu(F.layer_norm(x, (32,))))
    # erf and tanh GELU differ by ~1e-4 here; the default must be erf
    assert (pm(x).double() - F.gelu(F.layer_norm(x.double(), (32,)), approximate="tanh")).abs().max() > 1e-5
    assert "approximate" in repr(pydl.nn.LayerNormGELU(32, approximate="tanh"))


def test_layer_norm_gelu_rejects_bad_approximate():
    with pytest.raises(ValueError, match="approximate|sigmoid"):
        m = pydl.nn.LayerNormGELU(8, approximate="sigmoid")
        m(torch.randn(2, 8))


@pytest.mark.parametrize("cls", ["LayerNorm", "LayerNormGELU"])
def test_wrong_trailing_shape_is_an_error(cls):
    m = getattr(pydl.nn, cls)((4, 8))
    for shape in [(2, 8, 4), (2, 32), (8,)]:
        with pytest.raises((ValueError, RuntimeError)):
            m(torch.randn(shape))


@pytest.mark.parametrize("cls", ["LayerNorm", "LayerNormGELU"])
def test_noncontiguous_and_empty_inputs(cls):
    tm = _torch_ln((4, 8))
    pm = getattr(pydl.nn, cls)((4, 8))
    pm.load_state_dict(tm.state_dict())
    act = None if cls == "LayerNorm" else "none"
    base = torch.randn(8, 4, 3, 5)
    for x in (base.permute(2, 3, 1, 0), torch.randn(6, 4, 16)[..., ::2], torch.randn(1, 4, 8).expand(5, 4, 8),
              torch.randn(0, 4, 8), torch.randn(4, 8)):
        ref = _ref_forward(tm, x, act)
        t = tm(x) if act is None else F.gelu(tm(x))
        y = pm(x)
        assert y.shape == x.shape
        assert_close_to_ref(y, ref, t, name=f"input {tuple(x.shape)} stride {x.stride()}")


def test_deepcopy_pickle_and_train_step():
    pm = pydl.nn.LayerNorm(16)
    pm2 = pickle.loads(pickle.dumps(copy.deepcopy(pm)))
    assert type(pm2) is type(pm) and list(pm2.state_dict()) == ["weight", "bias"]
    tm = torch.nn.LayerNorm(16)
    opt_p = torch.optim.SGD(pm.parameters(), lr=0.1)
    opt_t = torch.optim.SGD(tm.parameters(), lr=0.1)
    for _ in range(3):
        x = torch.randn(8, 16)
        for m, opt in ((pm, opt_p), (tm, opt_t)):
            opt.zero_grad()
            (m(x) ** 2 * torch.arange(16.0)).sum().backward()
            opt.step()
    torch.testing.assert_close(pm.weight, tm.weight, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pm.bias, tm.bias, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(pm.weight, torch.ones(16), atol=1e-2), "the weight was never updated"


class _Doubled(torch.nn.Module):
    def forward(self, w):
        return 2 * w


@pytest.mark.parametrize("cls,make", [("LayerNorm", lambda: torch.nn.LayerNorm(16)),
                                      ("RMSNorm", lambda: torch.nn.RMSNorm(16)),
                                      ("DepthwiseConv2d", lambda: torch.nn.Conv2d(4, 4, 3, padding=1, groups=4))])
def test_parametrized_weight_is_used(cls, make):
    """The modules read parameters from their dict for speed; a weight moved out of it by
    torch.nn.utils.parametrize (a property) must still be the one used, with its gradient."""
    from torch.nn.utils import parametrize

    ref = make()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
    mine = (pydl.nn.DepthwiseConv2d(4, 3, padding=1) if cls == "DepthwiseConv2d" else getattr(pydl.nn, cls)(16))
    mine.load_state_dict(ref.state_dict())
    for m in (ref, mine):
        parametrize.register_parametrization(m, "weight", _Doubled())
    x = torch.randn(2, 4, 5, 5) if cls == "DepthwiseConv2d" else torch.randn(3, 16)
    outs = [m(x) for m in (ref, mine)]
    torch.testing.assert_close(outs[1], outs[0])
    grads = [torch.autograd.grad(o.sum(), m.parametrizations.weight.original) for o, m in zip(outs, (ref, mine))]
    torch.testing.assert_close(grads[1], grads[0])


def test_module_under_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(24, 24), pydl.nn.LayerNormGELU(24, approximate="tanh"),
                                torch.nn.Linear(24, 12), torch.nn.Unflatten(1, (3, 4)), pydl.nn.LayerNorm((3, 4)))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 24)
    want = model(x)
    got = compiled(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(want)
    gw = torch.autograd.grad(want, list(model.parameters()), g)
    gg = torch.autograd.grad(compiled(x), list(model.parameters()), g)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _autocast_case(device_type, dtype):
    """(pydl module, torch module, pydl functional) outputs under bf16 autocast; x and the
    parameters in ``dtype``."""
    torch.manual_seed(0)
    x = torch.randn(4, 8, dtype=dtype, device=device_type)
    theirs = torch.nn.LayerNorm(8, device=device_type, dtype=dtype)
    ours = pydl.nn.LayerNorm(8, device=device_type, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    with torch.autocast(device_type, dtype=torch.bfloat16):
        return ours(x), theirs(x), pydl.ops.layer_norm(x, theirs.weight, theirs.bias)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
def test_cpu_autocast_output_dtype_is_torchs(dtype):
    """CPU autocast leaves layer_norm alone: the output keeps the input's dtype, as torch's."""
    got, want, functional = _autocast_case("cpu", dtype)
    assert got.dtype == want.dtype == functional.dtype == dtype
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(functional, want)


@pytest.mark.cuda
def test_cuda_autocast_output_dtype_is_torchs():
    """CUDA autocast runs layer_norm in float32 (its float32 list): float32 output, as torch's."""
    for dtype in (FP32, BF16):
        got, want, functional = _autocast_case("cuda", dtype)
        assert got.dtype == want.dtype == functional.dtype == torch.float32
        torch.testing.assert_close(got, want)


def test_pydl_info_reports_a_bad_backend_variable():
    import subprocess
    import sys

    env = dict(os.environ, PYDL_BACKEND="nonsense")
    out = subprocess.run([sys.executable, "-m", "pydl", "info"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "PYDL_BACKEND='nonsense'" in out.stdout


def _timm_layer_norm_2d(x, weight, bias, eps):
    """What timm.layers.LayerNorm2d computes: LayerNorm over C through an NHWC view."""
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), weight, bias, eps).permute(0, 3, 1, 2)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 7, 5, 3), (1, 96, 4, 4), (3, 1, 2, 2)], ids=str)
def test_layer_norm_2d_is_timms(shape, memory_format):
    torch.manual_seed(1)
    m = pydl.nn.LayerNorm2d(shape[1])
    assert list(m.state_dict()) == ["weight", "bias"] and m.eps == 1e-6
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    x = torch.randn(shape).to(memory_format=memory_format).requires_grad_()
    y = m(x)
    xr = x.detach().double().requires_grad_()
    wr, br = (p.detach().double().requires_grad_() for p in (m.weight, m.bias))
    want = _timm_layer_norm_2d(xr, wr, br, m.eps)
    assert y.shape == want.shape
    cl = torch.channels_last
    assert y.is_contiguous(memory_format=cl) == want.is_contiguous(memory_format=cl)  # timm's layout
    torch.testing.assert_close(y, want.float())
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, m.weight, m.bias), g)
    ref = torch.autograd.grad(want, (xr, wr, br), g.double())
    for a, b in zip(got, ref):  # float64 reference: rstd = 1/sqrt(eps) amplifies rounding at C = 1
        torch.testing.assert_close(a, b.float(), atol=1e-4, rtol=1e-4)


def test_layer_norm_2d_constructor_and_errors():
    m = pydl.nn.LayerNorm2d(8, eps=1e-5, affine=False, dtype=torch.float64)
    assert m.weight is None and m.bias is None and m.eps == 1e-5
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(m(x), _timm_layer_norm_2d(x, None, None, 1e-5))
    for bad in (torch.randn(2, 7, 3, 3, dtype=torch.float64), torch.randn(8, 3, 3, dtype=torch.float64)):
        with pytest.raises(ValueError, match="LayerNorm2d"):
            m(bad)
