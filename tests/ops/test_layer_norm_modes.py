"""The LayerNorm and RMSNorm families in every torch mode (tests/utils/modes.py), on each CPU
backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pydl
from pydl import ops
from tests.utils.modes import MODES, OpUnderTest, no_recompile_limit

N = 7


def _inputs(shape, requires_grad, residual=False):
    g = torch.Generator().manual_seed(hash(shape) & 0xFFFF)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(requires_grad)  # noqa: E731
    x = mk(*shape)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g, dtype=torch.float64)).requires_grad_(requires_grad)
    b = mk(shape[-1])
    return (x, mk(*shape), w, b) if residual else (x, w, b)


def _mixed_inputs(shape, requires_grad, residual=False):
    """bfloat16 x (and residual) with float32 parameters: torch's mixed precision."""
    def low(t):
        return t.detach().to(torch.bfloat16).requires_grad_(requires_grad)

    def high(t):
        return t.detach().float().requires_grad_(requires_grad)

    t = _inputs(shape, requires_grad, residual)
    return (*(low(a) for a in t[:-2]), *(high(a) for a in t[-2:]))


# pydl's fused kernels vs torch's unfused bfloat16 composition: bfloat16 rounding apart.
_MIXED_TOL = dict(atol=3e-2, rtol=2e-2)


def _ops(backend):
    return [
        # The reference is what torch's mixed-precision kernel computes (float32, y rounded to
        # x's dtype), composed: torch 2.13's own jacrev of F.layer_norm fails on this mix.
        OpUnderTest("layer_norm-mixed", lambda x, w, b: ops.layer_norm(x, w, b, 1e-5, backend=backend),
                    lambda x, w, b: F.layer_norm(x.float(), (x.shape[-1],), w, b, 1e-5).to(x.dtype),
                    lambda s, rg: _mixed_inputs(s, rg), **_MIXED_TOL),
        OpUnderTest("add_rms_norm-mixed", lambda x, r, w: ops.add_rms_norm(x, r, w, backend=backend),
                    lambda x, r, w: (F.rms_norm(x + r, (x.shape[-1],), w), x + r),
                    lambda s, rg: _mixed_inputs(s, rg, residual=True)[:3], vmap_in_dims=(0, 0), **_MIXED_TOL),
        OpUnderTest("layer_norm", lambda x, w, b: ops.layer_norm(x, w, b, 1e-5, backend=backend),
                    lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5),
                    lambda s, rg: _inputs(s, rg)),
        OpUnderTest("layer_norm_gelu",
                    lambda x, w, b: ops.layer_norm_gelu(x, w, b, 1e-5, "tanh", backend=backend),
                    lambda x, w, b: F.gelu(F.layer_norm(x, (x.shape[-1],), w, b, 1e-5), approximate="tanh"),
                    lambda s, rg: _inputs(s, rg), shapes=((3, 2, N), (5, 2, N))),
        OpUnderTest("add_layer_norm",
                    lambda x, r, w, b: ops.add_layer_norm(x, r, w, b, 1e-5, "gelu", backend=backend),
                    lambda x, r, w, b: (F.gelu(F.layer_norm(x + r, (x.shape[-1],), w, b, 1e-5)), x + r),
                    lambda s, rg: _inputs(s, rg, residual=True), vmap_in_dims=(0, 0)),
        OpUnderTest("nn.LayerNorm", _module_fn(backend), _module_ref, lambda s, rg: _inputs(s, rg)),
        OpUnderTest("rms_norm", lambda x, w: ops.rms_norm(x, w, 1e-6, backend=backend),
                    lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-6),
                    lambda s, rg: _inputs(s, rg)[:2]),
        OpUnderTest("add_rms_norm", lambda x, r, w: ops.add_rms_norm(x, r, w, backend=backend),
                    lambda x, r, w: (F.rms_norm(x + r, (x.shape[-1],), w), x + r),
                    lambda s, rg: _inputs(s, rg, residual=True)[:3], vmap_in_dims=(0, 0)),
    ]


def _module_fn(backend):
    """pydl.nn.LayerNorm(N) with the test's weight and bias bound (built once, outside any trace)."""
    if backend is not None:
        return None  # the module has no backend argument
    module = pydl.nn.LayerNorm(N, dtype=torch.float64)
    return lambda x, w, b: torch.func.functional_call(module, {"weight": w, "bias": b}, (x,))


_TORCH_MODULE = torch.nn.LayerNorm(N, dtype=torch.float64)


def _module_ref(x, w, b):
    return torch.func.functional_call(_TORCH_MODULE, {"weight": w, "bias": b}, (x,))


CASES = [(backend, op) for backend in (None, "native") for op in _ops(backend) if op.fn is not None]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend,op", CASES, ids=[f"{b or 'default'}-{o.name}" for b, o in CASES])
def test_layer_norm_in_every_mode(backend, op, mode):
    with no_recompile_limit():
        MODES[mode](op)


def test_default_backend_is_native_on_cpu():
    """The modes above exercise the kernels, not a silent torch fallback."""
    assert ops.layer_norm.__module__ == "pydl.ops.layer_norm"
    from pydl.ops.layer_norm import choose_backend

    assert choose_backend(torch.empty(2, 8, dtype=torch.float64)) == "native"
