"""The LayerNorm and RMSNorm families' test cases, shared by tests/ops/test_layer_norm*.py
(not collected): the two families run on one set of kernels, so every test covers both.

* :data:`VARIANTS`: layer_norm, layer_norm_gelu (erf / tanh), add_layer_norm (no activation,
  erf, tanh), rms_norm, add_rms_norm, each a :class:`Variant` (RMS variants never get a bias);
* :func:`run_pydl` / :func:`run_ref` / :func:`run_torch`: one variant through the public
  op, the float64 reference (pydl.ops.layer_norm's *_ref) and torch's unfused composition;
* :class:`Case` / :func:`make_case`: one call's inputs (x, residual, weight, bias) in any layout;
* :func:`check_op`: run a variant through all three and compare outputs and every gradient
  (the generic comparisons live in tests/utils/checks.py, the inputs in tests/utils/inputs.py).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from pydl import ops
from tests.utils.checks import (assert_grads_close, assert_outputs_close, assert_outputs_like, assert_unchanged,
                                grads, record_calls, snapshot)
from tests.utils.inputs import FP64, TensorCase, make_grad, make_input, make_param, param_layout

_grads = grads  # check_op's keyword argument ``grads`` shadows the helper inside it

ln_mod = importlib.import_module("pydl.ops.layer_norm")  # the module (ops.layer_norm is the function)


# ---- the op variants -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    op: str              # "layer_norm" | "layer_norm_gelu" | "add_layer_norm" | "rms_norm" | "add_rms_norm"
    act: Optional[str]   # the reference's activation: None | "gelu" | "gelu_tanh"

    @property
    def has_residual(self) -> bool:
        return self.op.startswith("add_")

    @property
    def rms(self) -> bool:
        return "rms" in self.op

    @property
    def id(self) -> str:
        return self.op if self.act is None else f"{self.op}-{self.act}"


VARIANTS = [
    Variant("layer_norm", None),
    Variant("layer_norm_gelu", "gelu"),
    Variant("layer_norm_gelu", "gelu_tanh"),
    Variant("add_layer_norm", None),
    Variant("add_layer_norm", "gelu"),
    Variant("add_layer_norm", "gelu_tanh"),
    Variant("rms_norm", None),
    Variant("add_rms_norm", None),
]
VIDS = [v.id for v in VARIANTS]
LN, LN_GELU, LN_GELU_TANH, ADD_LN, ADD_LN_GELU, ADD_LN_GELU_TANH, RMS, ADD_RMS = VARIANTS
APPROXIMATE = {"gelu": "none", "gelu_tanh": "tanh"}  # reference activation -> F.gelu's approximate


def vid(v: Variant) -> str:
    """The pytest id of a variant (for ``ids=`` of a subset of VARIANTS)."""
    return v.id


# The parametrizations several files share.
OPTIONAL_AFFINE = pytest.mark.parametrize("weight,bias", [(False, False), (True, False), (False, True)],
                                          ids=["noaffine", "weightonly", "biasonly"])


def run_pydl(v: Variant, x, residual, weight, bias, eps=1e-5, backend=None) -> tuple:
    """The public op (positional arguments in the documented order)."""
    if v.op == "layer_norm":
        return (ops.layer_norm(x, weight, bias, eps, backend=backend),)
    if v.op == "layer_norm_gelu":
        return (ops.layer_norm_gelu(x, weight, bias, eps, APPROXIMATE[v.act], backend=backend),)
    if v.op == "rms_norm":
        return (ops.rms_norm(x, weight, eps, backend=backend),)
    if v.op == "add_rms_norm":
        out = ops.add_rms_norm(x, residual, weight, eps, backend=backend)
    else:
        out = ops.add_layer_norm(x, residual, weight, bias, eps, v.act, backend=backend)
    assert isinstance(out, tuple) and len(out) == 2, f"add_layer_norm must return (y, h), got {type(out)}"
    return out


def run_ref(v: Variant, x, residual, weight, bias, eps=1e-5, h_dtype=None) -> tuple:
    """float64 reference outputs.

    h_dtype: for add_layer_norm with inputs of that dtype, normalize h rounded to h_dtype, as the
    op (and the unfused torch code) does, with a straight-through gradient; the returned h is
    the exact sum. Without it: pydl's add_layer_norm_ref (exact h throughout).
    """
    norm = ((lambda t: ops.rms_norm_ref(t, weight, eps)) if v.rms else
            (lambda t: ln_mod.layer_norm_ref(t, weight, bias, eps, v.act)))
    if v.has_residual:
        h = x.double() + residual.double()
        if h_dtype is None or h_dtype == torch.float64:
            return norm(h), h
        rounded = (x.detach().to(h_dtype) + residual.detach().to(h_dtype)).to(torch.float64)
        h_used = h + (rounded - h).detach()
        return norm(h_used), h
    return (norm(x),)


def run_torch(v: Variant, x, residual, weight, bias, eps=1e-5) -> tuple:
    """torch's own unfused composition, in the inputs' dtype (the low-precision yardstick)."""
    h = x + residual if v.has_residual else x
    if h.dtype != x.dtype:  # a promoted residual stream promotes x's parameters too (pydl, F.rms_norm)
        weight, bias = (t if t is None else t.to(h.dtype) for t in (weight, bias))
    if v.rms:
        y = F.rms_norm(h, (h.shape[-1],), weight, eps)
        return (y, h) if v.has_residual else (y,)
    if weight is None and bias is not None and bias.dtype != h.dtype:
        # torch 2.13's CPU backward of a float32 bias without a weight for a 16-bit h fails
        # ("expected scalar type BFloat16 but found Float"): the same computation with weight 1.
        weight = torch.ones_like(bias)
    y = F.layer_norm(h, (h.shape[-1],), weight, bias, eps)
    if v.act is not None:
        y = F.gelu(y, approximate=APPROXIMATE[v.act])
    return (y, h) if v.has_residual else (y,)


def output_names(v: Variant) -> list[str]:
    return ["y", "h"] if v.has_residual else ["y"]


# ---- inputs --------------------------------------------------------------------------------------

@dataclass
class Case(TensorCase):
    """One call's inputs, with names for messages."""

    x: torch.Tensor
    residual: Optional[torch.Tensor]
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]


def make_case(v: Variant, shape, dtype, device, *, weight=True, bias=True, layout="contiguous",
              scale=1.0, offset=0.0, requires_grad=True, param_dtype=None, residual_dtype=None) -> Case:
    """Random inputs of ``v``: x (and residual) of ``shape`` in ``layout``, weight ~ 1 + randn;
    never a bias for the RMSNorm family. ``param_dtype`` (default ``dtype``): weight and bias
    (float32 with a float16/bfloat16 x: mixed precision); ``residual_dtype`` (default ``dtype``):
    the residual stream's."""
    n = shape[-1]
    bias = bias and not v.rms
    playout = param_layout(layout)
    pdt = param_dtype or dtype
    x = make_input(shape, dtype, device, layout, scale=scale, offset=offset, requires_grad=requires_grad)
    r = (make_input(shape, residual_dtype or dtype, device, layout, scale=scale, requires_grad=requires_grad)
         if v.has_residual else None)
    w = make_param(n, pdt, device, playout, requires_grad=requires_grad, offset=1.0) if weight else None
    b = make_param(n, pdt, device, playout, requires_grad=requires_grad) if bias else None
    return Case(x, r, w, b)


def _copy_case(case: Case, dtype, requires_grad=True) -> Case:
    """Fresh leaf copies of ``case`` in ``dtype`` (kept under this name for existing importers)."""
    return case.copy(dtype, requires_grad=requires_grad)


def constant_rows_case(v: Variant, n, dtype, device) -> Case:
    """5 rows of N equal values each (3.3, -7.77, 0, ~1000): zero variance, xhat = 0 exactly."""
    x = torch.full((5, n), 3.3, dtype=dtype, device=device)
    x[1] = -7.77
    x[2] = 0.0
    x[3] = 1000.5 if dtype == torch.float32 else 1000.0
    x[4] = 1000.1 if dtype == torch.float32 else -0.123
    r = torch.full((5, n), 0.25, dtype=dtype, device=device).requires_grad_() if v.has_residual else None
    w = make_param(n, dtype, device, offset=1.0, requires_grad=True)
    b = make_param(n, dtype, device, requires_grad=True)
    return Case(x.requires_grad_(), r, w, b)


# ---- the check -----------------------------------------------------------------------------------

def check_op(v: Variant, shape, dtype, device="cpu", backend="native", *, weight=True, bias=True,
             eps=1e-5, layout="contiguous", grad_layout="contiguous", used="all", scale=1.0,
             offset=0.0, grads=True, case: Optional[Case] = None, stress=False, param_dtype=None):
    """Run one variant through pydl, the float64 reference and torch on the same inputs (each in
    its own dtype); compare the outputs (all of ``dtype``) and every gradient (each in its
    input's dtype).

    used: which outputs feed the loss: "all", "y" or "h" (add_layer_norm only).
    param_dtype: as in make_case (mixed precision). A ``case`` with a residual stream of another
    dtype than x has outputs of the promoted dtype (x + residual's): pass that as ``dtype``.
    """
    device = torch.device(device)
    if case is None:
        case = make_case(v, shape, dtype, device, weight=weight, bias=bias, layout=layout,
                         scale=scale, offset=offset, requires_grad=grads, param_dtype=param_dtype)
    named = case.named()
    before = snapshot(named)

    outs = run_pydl(v, case.x, case.residual, case.weight, case.bias, eps, backend)
    names = output_names(v)
    assert_outputs_like(names, outs, shape=case.x.shape, dtype=dtype, device=case.x.device)
    assert_unchanged(named, before)

    c64 = case.copy(FP64, requires_grad=grads)
    refs = run_ref(v, c64.x, c64.residual, c64.weight, c64.bias, eps, h_dtype=dtype)
    ct = None
    touts = [None] * len(outs)
    if dtype != FP64:
        ct = case.copy(requires_grad=grads)
        touts = run_torch(v, ct.x, ct.residual, ct.weight, ct.bias, eps)
    assert_outputs_close(names, outs, refs, touts, dtype=dtype, label=v.id, stress=stress)
    if not grads:
        return outs

    use = {"all": names, "y": ["y"], "h": ["h"]}[used]
    gouts = [make_grad(case.x.shape, dtype, device, grad_layout) if n in use else None for n in names]
    got = _grads(outs, case.tensors(), gouts)
    want = _grads(refs, c64.tensors(), [None if g is None else g.to(FP64) for g in gouts])
    have_torch = [None] * len(named)
    if ct is not None:
        have_torch = _grads(touts, ct.tensors(), gouts)
    dx_scale = _dx_scale(v, c64, gouts, eps)
    assert_grads_close(named, got, want, have_torch, label=v.id,
                       scales={"x": dx_scale, "residual": dx_scale}, stress=stress)
    return outs


def _dx_scale(v, c64: Case, gouts, eps) -> float:
    """Natural size of dx: rstd * |act'| * |w| * |dy| (+ |dh|); dx itself may cancel to ~0."""
    with torch.no_grad():
        h = c64.x + c64.residual if v.has_residual else c64.x
        if h.numel() == 0:
            return 0.0
        spread = h.square().mean(-1) if v.rms else h.var(-1, correction=0)
        rstd = torch.rsqrt(spread + eps).max().item()
        w = 1.0 if c64.weight is None else max(1.0, c64.weight.abs().max().item())
        gy = 0.0 if gouts[0] is None else gouts[0].abs().max().item()
        gh = 0.0 if len(gouts) < 2 or gouts[1] is None else gouts[1].abs().max().item()
        return rstd * 1.13 * w * gy + gh


# ---- custom ops and torch.compile ----------------------------------------------------------------

def recorded_calls(v: Variant, case: Case, backend) -> list:
    """The pydl:: ops a forward + backward of the public op runs, with their arguments."""
    def run():
        outs = run_pydl(v, case.x, case.residual, case.weight, case.bias, 1e-5, backend)
        grads(outs, case.tensors(), [torch.randn_like(o) for o in outs])
    return record_calls(run, "pydl")


def compile_fn(backend):
    """All three ops in one function (for torch.compile tests): (x, r, w, b) -> (y + z * u, h)."""
    def f(x, r, w, b):
        y, h = ops.add_layer_norm(x, r, w, b, 1e-5, "gelu", backend=backend)
        z = ops.layer_norm_gelu(h * 0.5, w, b, 1e-5, "tanh", backend=backend)
        u = ops.layer_norm(y, w, None, 1e-4, backend=backend)
        return y + z * u, h
    return f
