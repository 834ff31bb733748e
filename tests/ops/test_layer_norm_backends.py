"""LayerNorm family, backend selection: the torch backend (the reference composition), the
automatic choice (backend=None), forced backends that cannot run a call (BackendError with
the reason), N above the kernels' limit, and $PYDL_BACKEND (read once, at import).
(The shared cases: tests/ops/layer_norm_cases.py.)"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import pydl
from pydl import ops
from tests.ops.layer_norm_cases import (ADD_LN, ADD_LN_GELU, ADD_LN_GELU_TANH, LN, LN_GELU, VARIANTS, VIDS,
                                        check_op, ln_mod, make_case, run_pydl, run_ref, vid)
from tests.tolerances import assert_close_to_ref
from tests.utils.checks import assert_error_mentions
from tests.utils.inputs import BF16, FP16, FP32, FP64, dtype_id, randn, shape_id


# ---- torch backend and automatic choice ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [FP32, BF16, FP16, FP64], ids=dtype_id)
@pytest.mark.parametrize("shape", [(9, 7), (2, 3, 1025), (0, 5)], ids=shape_id)
@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_torch_backend(v, shape, dtype):
    check_op(v, shape, dtype, "cpu", "torch")


@pytest.mark.parametrize("layout", ["transposed", "expanded", "lastdim_strided"])
@pytest.mark.parametrize("v", [LN_GELU, ADD_LN_GELU_TANH], ids=vid)
def test_torch_backend_noncontiguous(v, layout):
    check_op(v, (6, 33), FP32, "cpu", "torch", layout=layout)


@pytest.mark.parametrize("dtype", [FP32, BF16, FP16], ids=dtype_id)
@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_default_backend(v, dtype, device):
    """backend=None picks a backend that can run the call (float16 on CPU: not native)."""
    check_op(v, (2, 5, 97), dtype, device, None)


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("v", [LN, ADD_LN_GELU], ids=vid)
def test_n_above_kernel_limit(v, backend):
    """N > 65536: the default choice still computes it (torch fallback); a forced backend
    either computes it or refuses with BackendError, never crashes."""
    n = 65536 + 7
    if backend == "native":
        case = make_case(v, (2, n), FP32, "cpu", requires_grad=False)
        try:
            outs = run_pydl(v, case.x, case.residual, case.weight, case.bias, backend="native")
        except pydl.BackendError as e:
            assert "65536" in str(e) or str(n) in str(e), str(e)
            return
        ref = run_ref(v, *[None if t is None else t.double() for t in (case.x, case.residual, case.weight, case.bias)])
        assert_close_to_ref(outs[0], ref[0])
    else:
        check_op(v, (2, n), FP32, "cpu", None)


# ---- forced backends ------------------------------------------------------------------------------

@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_forced_native_rejects_float16_on_cpu(v):
    case = make_case(v, (4, 8), FP16, "cpu", requires_grad=False)
    with pytest.raises(pydl.BackendError) as ei:
        run_pydl(v, case.x, case.residual, case.weight, case.bias, backend="native")
    assert_error_mentions(ei, "float16", "Half", "half")


@pytest.mark.parametrize("v", [LN, ADD_LN_GELU], ids=vid)
def test_forced_triton_rejects_float64_on_cpu(v):
    case = make_case(v, (4, 8), FP64, "cpu", requires_grad=False)
    with pytest.raises(pydl.BackendError) as ei:
        run_pydl(v, case.x, case.residual, case.weight, case.bias, backend="triton")
    assert_error_mentions(ei, "float64", "Double", "double")


@pytest.mark.parametrize("v", [LN, LN_GELU, ADD_LN], ids=vid)
def test_unknown_backend_name(v):
    case = make_case(v, (4, 8), FP32, "cpu", requires_grad=False)
    with pytest.raises((ValueError, pydl.BackendError), match="no_such_backend"):
        run_pydl(v, case.x, case.residual, case.weight, case.bias, backend="no_such_backend")


# ---- $PYDL_BACKEND ------------------------------------------------------------------------------

@pytest.fixture
def force_env(monkeypatch):
    """force_env(value): set $PYDL_BACKEND as a user would before starting Python (pydl reads
    it once, at import; reload_env() re-reads it). Undone, and re-read, after the test."""
    def force(value):
        monkeypatch.setenv("PYDL_BACKEND", value)
        pydl.backends.reload_env()

    yield force
    monkeypatch.undo()
    pydl.backends.reload_env()


def test_env_var_forces_backend(force_env):
    x16 = randn((4, 8), FP16, "cpu")
    force_env("native")
    with pytest.raises(pydl.BackendError) as ei:
        ops.layer_norm(x16)
    assert_error_mentions(ei, "float16", "Half", "half")
    with pytest.raises(pydl.BackendError):
        ops.add_layer_norm(x16, x16)
    # the explicit argument wins over the environment
    assert_close_to_ref(ops.layer_norm(x16, backend="torch"), ln_mod.layer_norm_ref(x16),
                        F.layer_norm(x16, (8,)))
    force_env("torch")
    assert_close_to_ref(ops.layer_norm_gelu(x16), ln_mod.layer_norm_ref(x16, activation="gelu"),
                        F.gelu(F.layer_norm(x16, (8,))))
    force_env("triton")
    with pytest.raises(pydl.BackendError):
        ops.layer_norm(randn((4, 8), FP64, "cpu"))
    force_env("no_such_backend")
    with pytest.raises(ValueError, match="PYDL_BACKEND='no_such_backend'"):
        ops.layer_norm(randn((4, 8), FP32, "cpu"))
    assert "PYDL_BACKEND" in pydl.backends.env_problem()


def test_env_var_is_read_once(monkeypatch, force_env):
    """No per-call environment reads: a change takes effect at reload_env() (or a new process)."""
    x16 = randn((4, 8), FP16, "cpu")
    monkeypatch.setenv("PYDL_BACKEND", "native")
    ops.layer_norm(x16)  # still the automatic choice (torch for float16 on CPU)
    pydl.backends.reload_env()
    with pytest.raises(pydl.BackendError):
        ops.layer_norm(x16)


def test_kernel_buffers_follow_x_not_the_default_device():
    """The row statistics are allocated on x's device even when torch's default device is another
    one (a meta or CUDA stats buffer handed to the CPU kernel would be a wrong pointer)."""
    ln = importlib.import_module("pydl.ops.layer_norm")
    x = torch.randn(4, 8, requires_grad=True)
    g = torch.randn(4, 8)
    with torch.device("meta"):
        y, _, stats = ln._native_fwd(x.detach(), None, None, None, 1e-5, ln.ACT_NONE, ln.NORM_LAYER)
        got = torch.autograd.grad(ops.layer_norm(x, backend="native"), x, g)[0]
    assert stats.device == x.device and y.device == x.device
    want = torch.autograd.grad(F.layer_norm(x, (8,)), x, g)[0]
    torch.testing.assert_close(got, want)
