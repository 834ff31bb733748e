"""RMSNorm in the LayerNorm Triton kernels (@pytest.mark.triton): the launchers
``pydl.triton.layer_norm.layer_norm_fwd/bwd(..., rms=True)`` called directly (no pydl.ops layer),
on a CUDA GPU or under the Triton interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1).

Reference: float64 ``F.rms_norm`` (+ GELU) and its autograd, on the same rounded inputs
(h = x + residual rounded to x's dtype, like torch); low precision is judged against torch's
own result in that dtype (tests/tolerances.py)."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from tests.tolerances import assert_close_to_ref
from tests.utils.inputs import BF16, FP16, FP32, dtype_id

pytestmark = pytest.mark.triton

EPS = 1e-5
ACTS = {0: None, 1: "none", 2: "tanh"}  # activation code -> F.gelu approximate


def _tln():
    return importlib.import_module("pydl.triton.layer_norm")


def _act(z, act):
    return z if act == 0 else F.gelu(z, approximate=ACTS[act])


def _forward(h, w, act):
    """y = act(rms_norm(h) * w) in h's dtype (torch's own composition)."""
    return _act(F.rms_norm(h, (h.shape[-1],), w, EPS), act)


def _inputs(shape, dtype, device, residual, weight, seed):
    g = torch.Generator().manual_seed(seed)
    M, N = shape
    x = (torch.randn(M, N, generator=g) * 1.5 + 0.3).to(dtype)
    r = torch.randn(M, N, generator=g).to(dtype) if residual else None
    w = (torch.randn(N, generator=g) * 0.5 + 1.0).to(dtype) if weight else None
    dy = torch.randn(M, N, generator=g).to(dtype)
    dh = torch.randn(M, N, generator=g).to(dtype) if residual else None
    to = (lambda t: None if t is None else t.to(device))
    return to(x), to(r), to(w), to(dy), to(dh)


def _check(shape, dtype, device, residual, weight, act, seed=0):
    tln = _tln()
    x, r, w, dy, dh = _inputs(shape, dtype, device, residual, weight, seed)
    M, N = shape
    y, h, stats = tln.layer_norm_fwd(x, r, w, None, EPS, act, rms=True)
    assert stats.shape == (2, M) and stats.dtype == torch.float32
    # the normalized input, rounded to the dtype like torch's x + residual
    h_ref = (x + r) if residual else x
    if residual:
        assert torch.equal(h, h_ref), "h = x + residual, rounded to x.dtype"
    else:
        assert h is None

    # float64 reference, forward and backward (autograd)
    h64 = h_ref.detach().cpu().double().requires_grad_(True)
    w64 = w.detach().cpu().double().requires_grad_(True) if weight else None
    y64 = _forward(h64, w64, act)
    rstd64 = torch.rsqrt(h64.detach().pow(2).mean(-1) + EPS)
    dy64 = dy.cpu().double()
    gh64, gw64 = torch.autograd.grad(y64, [h64] + ([w64] if weight else []), dy64) + ((None,) if not weight else ())
    dx64 = gh64 + (dh.cpu().double() if residual else 0.0)

    # torch's own result in the dtype (for the low-precision rule)
    ht = h_ref.detach().cpu().clone().requires_grad_(True)
    wt = w.detach().cpu().clone().requires_grad_(True) if weight else None
    yt = _forward(ht, wt, act)
    ght, gwt = torch.autograd.grad(yt, [ht] + ([wt] if weight else []), dy.cpu()) + ((None,) if not weight else ())
    dxt = ght + (dh.cpu() if residual else 0)

    assert_close_to_ref(y.cpu(), y64, yt, dtype=dtype, name="y")
    assert torch.equal(stats[0].cpu(), torch.zeros(M)), "rms: the mean row is written as 0"
    assert_close_to_ref(stats[1].cpu(), rstd64.float(), dtype=torch.float32, name="rstd")

    dx, dw, db = tln.layer_norm_bwd(dy, dh, h if residual else x, w, None, stats[0], stats[1], act,
                                    True, True, rms=True)
    assert db is None
    scale = float(rstd64.max()) * float(dy64.abs().max()) * (float(w64.detach().abs().max()) if weight else 1.0)
    assert_close_to_ref(dx.cpu(), dx64, dxt, dtype=dtype, name="dx", scale=scale)
    if weight:
        xhat = h64.detach() * rstd64[:, None]
        dw_scale = float((dy64.abs() * xhat.abs()).sum(0).max())
        assert_close_to_ref(dw.cpu(), gw64, gwt, dtype=dtype, name="dweight", scale=dw_scale)
    else:
        assert dw is None

    # the mean is never read: a garbage mean row gives the same bits
    dx2, dw2, _ = tln.layer_norm_bwd(dy, dh, h if residual else x, w, None,
                                     torch.full_like(stats[0], 123.0), stats[1], act, True, True, rms=True)
    assert torch.equal(dx2, dx) and (dw is None or torch.equal(dw2, dw))


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=dtype_id)
@pytest.mark.parametrize("shape", [(5, 7), (3, 97), (4, 1024)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("residual,weight", [(False, True), (True, True), (True, False)],
                         ids=["rms_norm", "add_rms_norm", "add_rms_norm-no-weight"])
def test_rms_norm_triton(residual, weight, shape, dtype, triton_device):
    _check(shape, dtype, triton_device, residual, weight, act=0)


@pytest.mark.parametrize("act", [1, 2], ids=["gelu", "gelu_tanh"])
def test_rms_norm_triton_activation(act, triton_device):
    _check((3, 97), FP32, triton_device, True, True, act)


def test_rms_norm_triton_fp16_no_weight(triton_device):
    _check((5, 7), FP16, triton_device, False, False, act=0)


@pytest.mark.parametrize("residual", [False, True], ids=["rms_norm", "add_rms_norm"])
def test_rms_norm_triton_chunked_path(residual, triton_device, monkeypatch):
    """The large-N (column-chunked) kernels, reached at a small N by lowering the tile limits."""
    tln = _tln()
    monkeypatch.setattr(tln, "FWD_MAX_TILE", 64)
    monkeypatch.setattr(tln, "BWD_MAX_TILE", 64)
    monkeypatch.setattr(tln, "CHUNK_N", 32)
    assert tln._fwd_tile_config(3, 200, None) is None and tln._bwd_tile_config(3, 200) is None
    _check((3, 200), FP32, triton_device, residual, True, act=2 if residual else 0)
    _check((3, 97), BF16, triton_device, residual, True, act=0, seed=1)


def test_rms_norm_triton_rejects_bias(triton_device):
    tln = _tln()
    x = torch.randn(2, 8, device=triton_device)
    b = torch.zeros(8, device=triton_device)
    with pytest.raises(ValueError, match="rms_norm has no bias"):
        tln.layer_norm_fwd(x, None, None, b, EPS, 0, rms=True)
    stats = torch.ones(2, 2, device=triton_device)
    with pytest.raises(ValueError, match="rms_norm has no bias"):
        tln.layer_norm_bwd(x, None, x, None, b, stats[0], stats[1], 0, True, True, rms=True)
