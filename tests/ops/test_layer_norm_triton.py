"""LayerNorm family, the triton backend (@pytest.mark.triton): compiled on a CUDA GPU, or run by
the Triton interpreter on CPU (small shapes; tests/conftest.py sets TRITON_INTERPRET=1 when no
GPU is usable). (The shared cases: tests/ops/layer_norm_cases.py.)"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from pydl import ops
from tests.ops.layer_norm_cases import (ADD_LN, ADD_LN_GELU, ADD_LN_GELU_TANH, LN, LN_GELU, OPTIONAL_AFFINE,
                                        VARIANTS, VIDS, check_op, constant_rows_case, make_case, recorded_calls,
                                        vid)
from tests.utils.checks import opcheck_calls
from tests.utils.inputs import BF16, FP32, dtype_id, randn

TRITON_NS = [1, 7, 97, 1025]

pytestmark = pytest.mark.triton


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=dtype_id)
@pytest.mark.parametrize("n", TRITON_NS)
@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_triton_small(v, n, dtype, triton_device):
    check_op(v, (5, n), dtype, triton_device, "triton")


@pytest.mark.parametrize("shape,layout", [((2, 3, 97), "contiguous"), ((0, 7), "contiguous"),
                                          ((2, 0, 7), "contiguous"), ((7,), "contiguous"),
                                          ((6, 33), "sliced"), ((6, 33), "transposed"), ((6, 33), "expanded"),
                                          ((6, 33), "lastdim_strided"), ((6, 33), "row_strided")],
                         ids=["3d", "zero-rows", "zero-rows-3d", "1d", "sliced", "transposed", "expanded",
                              "lastdim-strided", "row-strided"])
@pytest.mark.parametrize("v", [LN, ADD_LN_GELU_TANH], ids=vid)
def test_triton_shapes_and_layouts(v, shape, layout, triton_device):
    check_op(v, shape, FP32, triton_device, "triton", layout=layout)


@OPTIONAL_AFFINE
@pytest.mark.parametrize("v", [LN_GELU, ADD_LN], ids=vid)
def test_triton_weight_bias_optional(v, weight, bias, triton_device):
    check_op(v, (6, 97), FP32, triton_device, "triton", weight=weight, bias=bias)


@pytest.mark.parametrize("used", ["y", "h"])
def test_triton_add_layer_norm_one_output_used(used, triton_device):
    check_op(ADD_LN_GELU, (4, 33), FP32, triton_device, "triton", used=used)


@pytest.mark.parametrize("v", [LN, ADD_LN_GELU], ids=vid)
def test_triton_chunked_path(v, triton_device, monkeypatch):
    """The large-N (column-chunked) kernels, reached at a small N by lowering the tile limits."""
    tln = importlib.import_module("pydl.triton.layer_norm")
    monkeypatch.setattr(tln, "FWD_MAX_TILE", 64)
    monkeypatch.setattr(tln, "BWD_MAX_TILE", 64)
    monkeypatch.setattr(tln, "CHUNK_N", 32)
    check_op(v, (3, 200), FP32, triton_device, "triton")
    check_op(v, (3, 97), BF16, triton_device, "triton")


@pytest.mark.parametrize("v", [LN, ADD_LN_GELU], ids=vid)
def test_triton_constant_rows(v, triton_device):
    check_op(v, (5, 97), FP32, triton_device, "triton", case=constant_rows_case(v, 97, FP32, triton_device))


def test_triton_nan_propagates_like_torch(triton_device):
    x = randn((3, 33), FP32, triton_device)
    x[1, 5] = float("nan")
    y = ops.layer_norm_gelu(x, backend="triton")
    assert torch.equal(torch.isnan(y), torch.isnan(F.gelu(F.layer_norm(x, (33,)))))


def test_triton_opcheck(triton_device):
    case = make_case(ADD_LN_GELU, (3, 17), FP32, triton_device)
    calls = recorded_calls(ADD_LN_GELU, case, "triton")
    assert calls, "the triton backend does not run through a pydl:: custom op"
    opcheck_calls(calls, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
