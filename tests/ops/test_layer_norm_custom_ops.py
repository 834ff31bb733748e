"""LayerNorm family as custom ops: the pydl:: operators are registered, every call a forward +
backward makes passes torch.library.opcheck, and the public ops compile with
torch.compile(fullgraph=True) without graph breaks. (The shared cases: tests/ops/layer_norm_cases.py.)"""

from __future__ import annotations

import pytest
import torch

from tests.ops.layer_norm_cases import (ADD_LN, ADD_LN_GELU, LN, LN_GELU_TANH, compile_fn, ln_mod, make_case,
                                        recorded_calls)
from tests.tolerances import assert_close_to_ref
from tests.utils.checks import opcheck_calls
from tests.utils.inputs import FP32, FP64, dtype_id, randn


def test_custom_ops_are_registered():
    assert hasattr(torch.ops, "pydl")
    for name in ("layer_norm_fwd", "layer_norm_bwd"):
        assert hasattr(torch.ops.pydl, name), f"torch.ops.pydl.{name} is not registered"


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("dtype", [FP32, FP64], ids=dtype_id)
@pytest.mark.parametrize("v,weight,bias", [(LN, True, True), (LN_GELU_TANH, True, False),
                                            (ADD_LN_GELU, False, True), (ADD_LN, True, True)],
                         ids=["layer_norm", "gelu_tanh-weightonly", "add-gelu-biasonly", "add"])
def test_opcheck(v, weight, bias, dtype, backend):
    case = make_case(v, (3, 5, 17), dtype, "cpu", weight=weight, bias=bias)
    calls = recorded_calls(v, case, backend)
    if backend == "native":
        names = {f._schema.name for f, _, _ in calls}
        assert any("fwd" in n or "forward" in n for n in names) and any("bwd" in n or "backward" in n for n in names), \
            f"forward/backward did not go through pydl:: custom ops (saw {sorted(names)})"
    opcheck_calls(calls, forward_with_grad=True)


@pytest.mark.parametrize("compiler,backend,dynamic", [
    ("aot_eager", None, False),
    ("aot_eager", "native", False),
    ("aot_eager", "native", True),
    pytest.param("inductor", "native", False, marks=pytest.mark.slow),
])
def test_torch_compile_fullgraph(compiler, backend, dynamic):
    torch._dynamo.reset()
    f = compile_fn(backend)
    cf = torch.compile(f, fullgraph=True, backend=compiler, dynamic=dynamic)
    shapes = [(4, 6, 33), (3, 97)] if dynamic else [(4, 6, 33)]
    for shape in shapes:
        n = shape[-1]
        leaves = [randn(shape, FP32, "cpu"), randn(shape, FP32, "cpu"), randn((n,), FP32, "cpu", offset=1.0),
                  randn((n,), FP32, "cpu")]
        eager_in = [t.clone().requires_grad_() for t in leaves]
        comp_in = [t.clone().requires_grad_() for t in leaves]
        want = f(*eager_in)
        got = cf(*comp_in)
        gouts = [torch.randn_like(t) for t in want]
        gw = torch.autograd.grad(want, eager_in, gouts)
        gg = torch.autograd.grad(got, comp_in, gouts)
        for a, b in zip(list(got) + list(gg), list(want) + list(gw)):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
        # and the eager result is right in the first place
        ref_y, ref_h = ln_mod.add_layer_norm_ref(*leaves, activation="gelu")
        assert_close_to_ref(want[1], ref_h)


def test_torch_compile_no_graph_break_counter():
    """Dynamo's own graph-break counter stays at zero (belt and braces for fullgraph=True)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    f = compile_fn(None)
    cf = torch.compile(f, backend="eager")
    x = randn((2, 9), FP32, "cpu")
    cf(x, x, None, None)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
