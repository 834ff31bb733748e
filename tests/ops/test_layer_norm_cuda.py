"""LayerNorm family on a CUDA GPU (@pytest.mark.cuda; skipped without one): the native and
triton backends (the triton ones also @pytest.mark.triton), float32/float16/bfloat16 at odd and
GPU-size shapes, layouts, NaN/Inf, opcheck + torch.compile, a non-default stream.
(The shared cases: tests/ops/layer_norm_cases.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pydl import ops
from tests.ops.layer_norm_cases import (ADD_LN_GELU, ADD_LN_GELU_TANH, LN, LN_GELU_TANH, OPTIONAL_AFFINE, VARIANTS,
                                        VIDS, check_op, compile_fn, constant_rows_case, ln_mod, make_case,
                                        recorded_calls, vid)
from tests.tolerances import assert_close_to_ref
from tests.utils.checks import opcheck_calls
from tests.utils.inputs import BF16, FP16, FP32, LAYOUTS, randn, shape_id

pytestmark = pytest.mark.cuda

CUDA_BACKENDS = [pytest.param("native", id="native"), pytest.param("triton", id="triton", marks=pytest.mark.triton)]
CUDA_DTYPES = [pytest.param(FP32, id="fp32"), pytest.param(FP16, id="fp16"), pytest.param(BF16, id="bf16")]
CUDA_ODD_SHAPES = [(64, 1), (64, 7), (64, 59), (64, 97), (33, 1023), (33, 1025), (3, 5, 1500),
                   (16, 4096), (16, 8191), (0, 768), (2, 0, 97)]
CUDA_BIG_SHAPES = [(16384, 768), (4096, 1024), (2048, 4096), (8, 65536), (1, 65536)]


@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("shape", CUDA_ODD_SHAPES, ids=shape_id)
@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_cuda_sizes(v, shape, backend, dtype):
    check_op(v, shape, dtype, "cuda", backend)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("shape", CUDA_BIG_SHAPES, ids=shape_id)
@pytest.mark.parametrize("v", [LN, ADD_LN_GELU], ids=vid)
def test_cuda_big_shapes(v, shape, backend, dtype):
    check_op(v, shape, dtype, "cuda", backend)


@pytest.mark.parametrize("layout", LAYOUTS[1:])
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("v", [LN, LN_GELU_TANH, ADD_LN_GELU], ids=vid)
def test_cuda_noncontiguous(v, backend, layout):
    check_op(v, (3, 40, 769), BF16, "cuda", backend, layout=layout)
    check_op(v, (3, 40, 769), FP32, "cuda", backend, layout=layout, grad_layout="transposed")


@OPTIONAL_AFFINE
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_cuda_weight_bias_optional(v, backend, weight, bias):
    check_op(v, (300, 1025), FP16, "cuda", backend, weight=weight, bias=bias)


@pytest.mark.parametrize("used", ["y", "h"])
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_add_layer_norm_one_output_used(backend, used):
    check_op(ADD_LN_GELU_TANH, (512, 768), BF16, "cuda", backend, used=used)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_cuda_nan_inf_propagate(backend, dtype):
    x = randn((64, 1024), dtype, "cuda")
    x[3, 7] = float("nan")
    x[9, 0] = float("inf")
    w = randn((1024,), dtype, "cuda")
    y = ops.layer_norm_gelu(x, w, None, backend=backend)
    t = F.gelu(F.layer_norm(x, (1024,), w, None))
    assert torch.equal(torch.isnan(y), torch.isnan(t))
    assert torch.isfinite(y[torch.tensor([0, 1, 2, 4])]).all()


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_large_mean_and_constant_rows(backend):
    check_op(LN, (256, 4096), FP32, "cuda", backend, offset=1e3)
    for v in (LN, ADD_LN_GELU):
        for dtype in (FP32, BF16):
            for n in (97, 65536):
                check_op(v, (5, n), dtype, "cuda", backend, case=constant_rows_case(v, n, dtype, "cuda"))


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_opcheck_and_compile(backend):
    case = make_case(ADD_LN_GELU, (4, 7, 96), FP32, "cuda")
    opcheck_calls(recorded_calls(ADD_LN_GELU, case, backend))
    torch._dynamo.reset()
    f = compile_fn(backend)
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [randn((4, 96), FP32, "cuda"), randn((4, 96), FP32, "cuda"), randn((96,), FP32, "cuda"),
              randn((96,), FP32, "cuda")]
    torch.testing.assert_close(cf(*leaves), f(*leaves), rtol=1e-5, atol=1e-5)


def test_cuda_non_default_stream():
    """Kernels run on the current stream (a side stream here), not the legacy default stream."""
    s = torch.cuda.Stream()
    x = randn((4096, 1024), FP16, "cuda")
    w = randn((1024,), FP16, "cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        y = ops.layer_norm(x, w, None, backend="native")
        z = y * 2
    s.synchronize()
    want = F.layer_norm(x, (1024,), w, None) * 2
    assert_close_to_ref(z, ln_mod.layer_norm_ref(x, w) * 2, want)
