"""torch's mixed precision on every backend, as F.layer_norm / F.rms_norm and the unfused code give
it: float16/bfloat16 x with float32 weight/bias (output in x's dtype, parameter gradients in the
parameters' float32), run by the fused kernels themselves (native CPU: bfloat16 x; the triton
backend, in the interpreter on CPU; native CUDA and triton on a GPU, @pytest.mark.cuda), and a
residual stream in another dtype than the sublayer output (h = x + residual and y in the dtype
of type promotion). Every output and every gradient is compared with the float64 reference by
the rule of tests/tolerances.py: the low-precision outputs and dx at most 2x torch's own error,
the float32 parameter gradients by float32's bound. (The CUDA kernels' mixed instantiations also
run in tests/cuda_emulation: `build/cuda-emulated-layer-norm mixed`.)"""

from __future__ import annotations

import importlib

import pytest
import torch

import pydl
from pydl import ops
from tests.ops.layer_norm_cases import (ADD_LN, ADD_LN_GELU, ADD_RMS, LN, LN_GELU_TANH, OPTIONAL_AFFINE, RMS,
                                        VARIANTS, VIDS, check_op, ln_mod, make_case, recorded_calls, vid)
from tests.tolerances import assert_close_to_ref
from tests.utils.checks import opcheck_calls
from tests.utils.inputs import BF16, FP16, FP32, FP64, LAYOUTS, dtype_id, randn, shape_id

LOW = [pytest.param(BF16, id="bf16"), pytest.param(FP16, id="fp16")]
CUDA_BACKENDS = [pytest.param("native", id="native"), pytest.param("triton", id="triton", marks=pytest.mark.triton)]


# ---- native CPU (bfloat16 x: the CPU kernels' 16-bit dtype) ------------------------------------

@pytest.mark.parametrize("n", [1, 7, 97, 1025])
@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_native_cpu(v, n):
    check_op(v, (6, n), BF16, "cpu", "native", param_dtype=FP32)


@pytest.mark.parametrize("layout", LAYOUTS[1:])
@pytest.mark.parametrize("v", [LN_GELU_TANH, ADD_LN_GELU, ADD_RMS], ids=vid)
def test_native_cpu_layouts(v, layout):
    """Non-contiguous x (and sliced / strided parameters, which the op makes contiguous)."""
    check_op(v, (3, 5, 97), BF16, "cpu", "native", layout=layout, param_dtype=FP32)


@OPTIONAL_AFFINE
@pytest.mark.parametrize("v", [LN, ADD_LN], ids=vid)
def test_native_cpu_weight_bias_optional(v, weight, bias):
    """The parameters' dtype comes from whichever of weight / bias is given."""
    check_op(v, (6, 97), BF16, "cpu", "native", weight=weight, bias=bias, param_dtype=FP32)


@pytest.mark.parametrize("shape", [(0, 7), (2, 0, 7)], ids=shape_id)
@pytest.mark.parametrize("v", [LN, ADD_RMS], ids=vid)
def test_native_cpu_zero_rows(v, shape):
    """No rows: no kernel; the parameter gradients are float32 zeros."""
    check_op(v, shape, BF16, "cpu", "native", param_dtype=FP32)


def test_native_cpu_many_rows_threads():
    """Rows split over threads: the per-thread dweight/dbias partials, stored as float32."""
    check_op(ADD_LN_GELU, (512, 192), BF16, "cpu", "native", param_dtype=FP32)


def test_kernels_are_chosen():
    """No backend gives a mixed-precision reason any more: the default choice is the fused kernel."""
    x = randn((4, 8), BF16, "cpu")
    assert ops.layer_norm(x, torch.ones(8), torch.zeros(8), backend="native").dtype == BF16
    assert ln_mod.choose_backend(x) == "native"
    assert not ln_mod.DISPATCH.reasons("native", ln_mod._key(x))


def test_opcheck_and_compile_cpu():
    """The custom ops (fake impls: parameter gradients in the parameters' dtype) and
    torch.compile(fullgraph=True) with float32 parameters of a bfloat16 x."""
    case = make_case(ADD_LN_GELU, (3, 17), BF16, "cpu", param_dtype=FP32)
    calls = recorded_calls(ADD_LN_GELU, case, "native")
    assert calls, "the native backend does not run through a pydl:: custom op"
    assert any("bwd" in func._schema.name for func, _, _ in calls), "no backward op recorded"
    opcheck_calls(calls)
    torch._dynamo.reset()

    def f(x, r, w, b):
        y, h = ops.add_layer_norm(x, r, w, b, 1e-5, "gelu", backend="native")
        return ops.rms_norm(y + h, w, backend="native")

    leaves = [randn((4, 96), BF16, "cpu"), randn((4, 96), BF16, "cpu"), 1 + randn((96,), FP32, "cpu"),
              randn((96,), FP32, "cpu")]
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    a = [t.clone().requires_grad_() for t in leaves]
    c = [t.clone().requires_grad_() for t in leaves]
    ya, yc = cf(*a), f(*c)
    assert ya.dtype == yc.dtype == BF16
    torch.testing.assert_close(ya, yc)
    ga, gc = torch.autograd.grad(ya.float().sum(), a), torch.autograd.grad(yc.float().sum(), c)
    assert [g.dtype for g in ga] == [BF16, BF16, FP32, FP32]
    for g1, g2 in zip(ga, gc):
        torch.testing.assert_close(g1, g2)


# ---- triton (interpreter on CPU, compiled on a GPU) ----------------------------------------------

@pytest.mark.triton
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("n", [1, 97, 1025])
@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_triton(v, n, dtype, triton_device):
    check_op(v, (5, n), dtype, triton_device, "triton", param_dtype=FP32)


@pytest.mark.triton
@OPTIONAL_AFFINE
def test_triton_weight_bias_optional(weight, bias, triton_device):
    check_op(LN_GELU_TANH, (6, 33), BF16, triton_device, "triton", weight=weight, bias=bias, param_dtype=FP32)


@pytest.mark.triton
@pytest.mark.parametrize("v", [LN, ADD_LN_GELU, RMS], ids=vid)
def test_triton_chunked_path(v, triton_device, monkeypatch):
    """The large-N (column-chunked) kernels, reached at a small N by lowering the tile limits."""
    tln = importlib.import_module("pydl.triton.layer_norm")
    monkeypatch.setattr(tln, "FWD_MAX_TILE", 64)
    monkeypatch.setattr(tln, "BWD_MAX_TILE", 64)
    monkeypatch.setattr(tln, "CHUNK_N", 32)
    check_op(v, (3, 200), BF16, triton_device, "triton", param_dtype=FP32)


# ---- CUDA GPU: native and triton ----------------------------------------------------------------

# One shape per kernel path of each backend: cached forward / row backward with vector and scalar
# loads, the long-row forward (with h) and backward (dweight in shared memory, in the workspace),
# triton's chunked kernels, zero rows.
CUDA_SHAPES = [(64, 97), (33, 768), (16, 4096), (16, 8191), (4, 12288), (4, 16392), (2, 32776), (0, 768)]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=shape_id)
@pytest.mark.parametrize("v", [LN_GELU_TANH, ADD_LN, RMS, ADD_RMS], ids=vid)
def test_cuda(v, shape, backend):
    if backend == "triton" and shape[-1] > ln_mod.TRITON_MAX_N:
        pytest.skip("beyond the triton backend's range")
    check_op(v, shape, BF16, "cuda", backend, param_dtype=FP32)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("shape", [(64, 97), (33, 1024), (4, 12288)], ids=shape_id)
def test_cuda_fp16(shape, backend):
    check_op(ADD_LN_GELU, shape, FP16, "cuda", backend, param_dtype=FP32)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS[1:])
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_layouts(backend, layout):
    check_op(ADD_LN_GELU, (3, 40, 769), BF16, "cuda", backend, layout=layout, param_dtype=FP32)
    check_op(LN, (3, 40, 768), FP16, "cuda", backend, layout=layout, param_dtype=FP32)


@pytest.mark.cuda
@OPTIONAL_AFFINE
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("v", [LN_GELU_TANH, ADD_LN], ids=vid)
def test_cuda_weight_bias_optional(v, backend, weight, bias):
    check_op(v, (300, 1024), BF16, "cuda", backend, weight=weight, bias=bias, param_dtype=FP32)


# ---- the residual stream in another dtype: promotion, on every backend ---------------------------

# (x, residual, parameters) dtypes; h and y get promote_types(x, residual).
PROMOTIONS = [(BF16, FP32, FP32), (FP32, BF16, FP32), (FP16, FP32, FP32), (BF16, FP16, FP32), (BF16, BF16, FP32),
              (FP16, FP32, FP16)]
PROMOTION_IDS = ["-".join(dtype_id(d) for d in p) for p in PROMOTIONS]


def _promotion_check(v, dtypes, device, backend):
    x_dtype, r_dtype, p_dtype = dtypes
    case = make_case(v, (5, 97), x_dtype, device, param_dtype=p_dtype, residual_dtype=r_dtype)
    check_op(v, (5, 97), torch.promote_types(x_dtype, r_dtype), device, backend, case=case)


@pytest.mark.parametrize("dtypes", PROMOTIONS, ids=PROMOTION_IDS)
@pytest.mark.parametrize("v", [ADD_LN, ADD_LN_GELU, ADD_RMS], ids=vid)
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_residual_stream_promotes_like_torch(backend, v, dtypes):
    _promotion_check(v, dtypes, "cpu", backend)


@pytest.mark.triton
@pytest.mark.parametrize("dtypes", PROMOTIONS, ids=PROMOTION_IDS)
@pytest.mark.parametrize("v", [ADD_LN_GELU, ADD_RMS], ids=vid)
def test_triton_residual_stream_promotes_like_torch(v, dtypes, triton_device):
    _promotion_check(v, dtypes, triton_device, "triton")


@pytest.mark.cuda
@pytest.mark.parametrize("dtypes", PROMOTIONS, ids=PROMOTION_IDS)
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_residual_stream_promotes_like_torch(backend, dtypes):
    _promotion_check(ADD_LN_GELU, dtypes, "cuda", backend)
    _promotion_check(ADD_RMS, dtypes, "cuda", backend)


# ---- modules, autocast, refused mixes ------------------------------------------------------------

@pytest.mark.parametrize("module", ["LayerNorm", "RMSNorm"])
def test_module_with_float32_params_takes_low_precision_input(module):
    """A bf16 model whose norms kept float32 parameters (AMP / FSDP checkpoints): the kernels run it,
    with torch's dtypes, under CPU autocast as well (which leaves the norms alone)."""
    ours, theirs = getattr(pydl.nn, module)(64), getattr(torch.nn, module)(64)
    with torch.no_grad():
        theirs.weight.normal_(1.0, 0.2)
    ours.load_state_dict(theirs.state_dict())
    x = randn((3, 7, 64), BF16, "cpu")
    ref = (ln_mod.layer_norm_ref(x, theirs.weight, theirs.bias, theirs.eps) if module == "LayerNorm"
           else ops.rms_norm_ref(x, theirs.weight, theirs.eps))
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=BF16, enabled=autocast):
            got, want = ours(x), theirs(x)
        assert got.dtype == want.dtype == BF16
        assert_close_to_ref(got, ref, want, name=f"{module} autocast={autocast}")
    assert ln_mod.choose_backend(x) == "native"


@pytest.mark.cuda
def test_cuda_autocast_output_dtype_is_torchs():
    """CUDA autocast runs the norms in float32 (its float32 list), as torch does: float32 output."""
    x = randn((4, 64), BF16, "cuda")
    for module in ("LayerNorm", "RMSNorm"):
        ours, theirs = getattr(pydl.nn, module)(64).cuda(), getattr(torch.nn, module)(64).cuda()
        with torch.autocast("cuda", dtype=BF16):
            got, want = ours(x), theirs(x)
        assert got.dtype == want.dtype == FP32
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_other_mixes_are_refused(backend):
    x = randn((4, 8), FP32, "cpu")
    with pytest.raises(TypeError, match="weight"):
        ops.layer_norm(x, torch.ones(8, dtype=BF16), backend=backend)
    xb = randn((4, 8), BF16, "cpu")
    with pytest.raises(TypeError, match="bias dtype torch.bfloat16 must match weight dtype torch.float32"):
        ops.layer_norm(xb, torch.ones(8), torch.zeros(8, dtype=BF16), backend=backend)
    with pytest.raises(TypeError, match="bias"):
        ops.layer_norm(xb, None, torch.zeros(8, dtype=FP64), backend=backend)


def test_native_binding_checks_parameter_dtypes():
    """The C++ safety net for direct pydl._C callers: the parameters' dtype is x's or float32
    (16-bit x). (Mismatched weight / bias / gradient dtypes: tests/cuda_emulation.)"""
    from pydl import _native

    c = _native.module()
    codes = _native.DTYPE_CODES
    x = randn((2, 8), BF16, "cpu")
    y = torch.empty_like(x)
    w32, w16 = torch.ones(8), torch.ones(8, dtype=FP16)
    fwd = lambda w, b, p_code: c.layer_norm_fwd_cpu(  # noqa: E731
        2, 8, codes[BF16], x.data_ptr(), 8, 0, 8, p_code, w.data_ptr(), 0 if b is None else b.data_ptr(),
        y.data_ptr(), 0, 0, 0, 1e-5, 0, 0, 1)
    fwd(w32, None, codes[FP32])  # mixed precision: accepted
    with pytest.raises(ValueError, match="weight dtype float16 must be x's dtype bfloat16"):
        fwd(w16, None, codes[FP16])
    x32, wb = randn((2, 8), FP32, "cpu"), torch.ones(8, dtype=BF16)
    with pytest.raises(ValueError, match="weight dtype bfloat16 must be x's dtype float32"):
        c.layer_norm_fwd_cpu(2, 8, codes[FP32], x32.data_ptr(), 8, 0, 8, codes[BF16], wb.data_ptr(), 0,
                             torch.empty_like(x32).data_ptr(), 0, 0, 0, 1e-5, 0, 0, 1)
