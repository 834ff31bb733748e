"""Fused LayerNorm family: pydl.ops.layer_norm, layer_norm_gelu and add_layer_norm.

Every result (forward output and every gradient) is compared with the float64 references
of pydl.ops.layer_norm (themselves checked against F.layer_norm / F.gelu first), using the
one tolerance table in tests/tolerances.py. Per backend:

* native on CPU: float32, bfloat16 (and float64: fixed tolerance + gradcheck), every
  N of DESIGN §7 up to 65536, leading shapes incl. zero rows, non-contiguous inputs;
* torch: the reference composition, same checks at a few sizes;
* triton: @pytest.mark.triton, on the GPU or under the Triton interpreter (small shapes);
* CUDA: @pytest.mark.cuda, native and triton, fp32/fp16/bf16 at GPU-size shapes.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

import pydl
from pydl import ops
from tests.tolerances import assert_close_to_ref

ln_mod = importlib.import_module("pydl.ops.layer_norm")  # the module (ops.layer_norm is the function)

FP32, BF16, FP16, FP64 = torch.float32, torch.bfloat16, torch.float16, torch.float64


# ---- the op variants -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    op: str              # "layer_norm" | "layer_norm_gelu" | "add_layer_norm"
    act: Optional[str]   # the reference's activation: None | "gelu" | "gelu_tanh"

    @property
    def has_residual(self) -> bool:
        return self.op == "add_layer_norm"

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
]
VIDS = [v.id for v in VARIANTS]
LN, LN_GELU, LN_GELU_TANH, ADD_LN, ADD_LN_GELU, ADD_LN_GELU_TANH = VARIANTS
_APPROXIMATE = {"gelu": "none", "gelu_tanh": "tanh"}


def run_pydl(v: Variant, x, residual, weight, bias, eps=1e-5, backend=None) -> tuple:
    """The public op (positional arguments in the documented order)."""
    if v.op == "layer_norm":
        return (ops.layer_norm(x, weight, bias, eps, backend=backend),)
    if v.op == "layer_norm_gelu":
        return (ops.layer_norm_gelu(x, weight, bias, eps, _APPROXIMATE[v.act], backend=backend),)
    out = ops.add_layer_norm(x, residual, weight, bias, eps, v.act, backend=backend)
    assert isinstance(out, tuple) and len(out) == 2, f"add_layer_norm must return (y, h), got {type(out)}"
    return out


def run_ref(v: Variant, x, residual, weight, bias, eps=1e-5, h_dtype=None) -> tuple:
    """float64 reference outputs.

    h_dtype: for add_layer_norm with inputs of that dtype, normalize h rounded to h_dtype, as the
    op (and the unfused torch code) does, with a straight-through gradient; the returned h is
    the exact sum. Without it: pydl's add_layer_norm_ref (exact h throughout).
    """
    if v.has_residual:
        if h_dtype is None or h_dtype == torch.float64:
            return tuple(ln_mod.add_layer_norm_ref(x, residual, weight, bias, eps, v.act))
        h = x + residual
        rounded = (x.detach().to(h_dtype) + residual.detach().to(h_dtype)).to(torch.float64)
        h_used = h + (rounded - h).detach()
        return ln_mod.layer_norm_ref(h_used, weight, bias, eps, v.act), h
    return (ln_mod.layer_norm_ref(x, weight, bias, eps, v.act),)


def run_torch(v: Variant, x, residual, weight, bias, eps=1e-5) -> tuple:
    """torch's own unfused composition, in the inputs' dtype (the low-precision yardstick)."""
    h = x + residual if v.has_residual else x
    y = F.layer_norm(h, (h.shape[-1],), weight, bias, eps)
    if v.act is not None:
        y = F.gelu(y, approximate=_APPROXIMATE[v.act])
    return (y, h) if v.has_residual else (y,)


# ---- inputs --------------------------------------------------------------------------------------

LAYOUTS = ["contiguous", "transposed", "sliced", "row_strided", "expanded", "lastdim_strided"]


def _randn(shape, dtype, device, scale=1.0, offset=0.0):
    gen_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    t = torch.randn(shape, dtype=gen_dtype)
    if scale != 1.0:
        t = t * scale
    if offset != 0.0:
        t = t + offset
    return t.to(dtype=dtype, device=device)


def make_input(shape, dtype, device, layout="contiguous", *, scale=1.0, offset=0.0, requires_grad=True):
    """A random tensor of logical ``shape`` stored as ``layout``.

    The returned tensor is a view of a leaf (when requires_grad) so gradients can be taken w.r.t.
    the view itself: transposed (last-dim stride != 1), sliced (``big[..., 1:N+1]``: misaligned
    start and row stride N+3), row_strided (every other row), expanded (stride-0 leading dim),
    lastdim_strided (``big[..., ::2]``).
    """
    shape = tuple(shape)
    lead, n = shape[:-1], shape[-1]
    if layout in ("transposed", "row_strided", "expanded") and not lead:
        layout = "sliced"  # a 1-D x has no rows to permute / skip / broadcast
    if layout == "contiguous":
        base = _randn(shape, dtype, device, scale, offset)
        view = lambda b: b  # noqa: E731
    elif layout == "transposed":
        base = _randn(lead[:-1] + (n, lead[-1]), dtype, device, scale, offset)
        view = lambda b: b.transpose(-1, -2)  # noqa: E731
    elif layout == "sliced":
        base = _randn(lead + (n + 3,), dtype, device, scale, offset)
        view = lambda b: b[..., 1:n + 1]  # noqa: E731
    elif layout == "row_strided":
        base = _randn(lead[:-1] + (2 * lead[-1], n), dtype, device, scale, offset)
        view = lambda b: b[..., ::2, :]  # noqa: E731
    elif layout == "expanded":
        base = _randn(lead[:-1] + (1, n), dtype, device, scale, offset)
        view = lambda b: b.expand(shape)  # noqa: E731
    elif layout == "lastdim_strided":
        base = _randn(lead + (2 * n,), dtype, device, scale, offset)
        view = lambda b: b[..., ::2]  # noqa: E731
    else:
        raise ValueError(layout)
    if requires_grad:
        base.requires_grad_(True)
    t = view(base)
    assert tuple(t.shape) == shape
    return t


def make_param(n, dtype, device, layout="contiguous", *, requires_grad=True, offset=0.0):
    """weight / bias of shape (n,): contiguous, misaligned slice, or strided."""
    if layout == "sliced":
        base = _randn((n + 2,), dtype, device, offset=offset)
        view = lambda b: b[1:n + 1]  # noqa: E731
    elif layout == "lastdim_strided":
        base = _randn((2 * n,), dtype, device, offset=offset)
        view = lambda b: b[::2]  # noqa: E731
    else:
        base = _randn((n,), dtype, device, offset=offset)
        view = lambda b: b  # noqa: E731
    if requires_grad:
        base.requires_grad_(True)
    return view(base)


def make_grad(shape, dtype, device, layout="contiguous"):
    """An upstream gradient: random, random-row expanded, all-ones expanded (y.sum()), transposed."""
    shape = tuple(shape)
    if layout == "contiguous":
        return _randn(shape, dtype, device)
    if layout == "ones":  # what y.sum().backward() sends: stride 0 everywhere
        return torch.ones((), dtype=dtype, device=device).expand(shape)
    if layout == "expanded":
        return _randn(shape[-1:], dtype, device).expand(shape)
    if layout == "transposed" and len(shape) >= 2:
        return _randn(shape[:-2] + (shape[-1], shape[-2]), dtype, device).transpose(-1, -2)
    return _randn(shape, dtype, device)


@dataclass
class Case:
    """One call's inputs, with names for messages."""

    x: torch.Tensor
    residual: Optional[torch.Tensor]
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]

    def named(self):
        return [(n, t) for n, t in (("x", self.x), ("residual", self.residual), ("weight", self.weight),
                                     ("bias", self.bias)) if t is not None]


def make_case(v: Variant, shape, dtype, device, *, weight=True, bias=True, layout="contiguous",
              scale=1.0, offset=0.0, requires_grad=True) -> Case:
    n = shape[-1]
    playout = layout if layout in ("sliced", "lastdim_strided") else "contiguous"
    x = make_input(shape, dtype, device, layout, scale=scale, offset=offset, requires_grad=requires_grad)
    r = (make_input(shape, dtype, device, layout, scale=scale, requires_grad=requires_grad)
         if v.has_residual else None)
    w = make_param(n, dtype, device, playout, requires_grad=requires_grad, offset=1.0) if weight else None
    b = make_param(n, dtype, device, playout, requires_grad=requires_grad) if bias else None
    return Case(x, r, w, b)


def _copy_case(case: Case, dtype, requires_grad=True) -> Case:
    def cp(t):
        if t is None:
            return None
        return t.detach().to(dtype).clone().requires_grad_(requires_grad)
    return Case(cp(case.x), cp(case.residual), cp(case.weight), cp(case.bias))


def _grads(outs, inputs, gouts):
    """d(sum_i <outs_i, gouts_i>)/d inputs; unused inputs get zeros (not None)."""
    pairs = [(o, g) for o, g in zip(outs, gouts) if g is not None]
    res = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)
    return [torch.zeros_like(t) if r is None else r for r, t in zip(res, inputs)]


def check_op(v: Variant, shape, dtype, device="cpu", backend="native", *, weight=True, bias=True,
             eps=1e-5, layout="contiguous", grad_layout="contiguous", used="all", scale=1.0,
             offset=0.0, grads=True, case: Optional[Case] = None, stress=False):
    """Run one variant through pydl, the float64 reference and torch in ``dtype``; compare all.

    used: which outputs feed the loss: "all", "y" or "h" (add_layer_norm only).
    """
    device = torch.device(device)
    if case is None:
        case = make_case(v, shape, dtype, device, weight=weight, bias=bias, layout=layout,
                         scale=scale, offset=offset, requires_grad=grads)
    named = case.named()
    before = [t.detach().clone() for _, t in named]

    outs = run_pydl(v, case.x, case.residual, case.weight, case.bias, eps, backend)
    names = ["y", "h"] if v.has_residual else ["y"]
    assert len(outs) == len(names)
    for name, o in zip(names, outs):
        assert isinstance(o, torch.Tensor), f"{name} is {type(o).__name__}"
        assert tuple(o.shape) == tuple(case.x.shape), f"{name}: shape {tuple(o.shape)} != x's {tuple(case.x.shape)}"
        assert o.dtype == dtype and o.device == case.x.device, f"{name}: {o.dtype} on {o.device}"
    for (n, t), b in zip(named, before):
        assert torch.equal(t.detach(), b), f"the op modified its input {n}"

    c64 = _copy_case(case, FP64, requires_grad=grads)
    refs = run_ref(v, c64.x, c64.residual, c64.weight, c64.bias, eps, h_dtype=dtype)
    for r in refs:
        assert r.dtype == FP64, f"reference returned {r.dtype}"
    ct = None
    touts = [None] * len(outs)
    if dtype != FP64:
        ct = _copy_case(case, dtype, requires_grad=grads)
        touts = run_torch(v, ct.x, ct.residual, ct.weight, ct.bias, eps)
    for name, o, r, t in zip(names, outs, refs, touts):
        assert_close_to_ref(o, r, t, dtype=dtype, name=f"{v.id} {name}", stress=stress)
    if not grads:
        return outs

    use = {"all": names, "y": ["y"], "h": ["h"]}[used]
    gouts = [make_grad(case.x.shape, dtype, device, grad_layout) if n in use else None for n in names]
    got = _grads(outs, [t for _, t in named], gouts)
    want = _grads(refs, [t for _, t in c64.named()], [None if g is None else g.to(FP64) for g in gouts])
    have_torch = [None] * len(named)
    if ct is not None:
        have_torch = _grads(touts, [t for _, t in ct.named()], gouts)
    dx_scale = _dx_scale(v, c64, gouts, eps)
    for (n, t), g, w, tg in zip(named, got, want, have_torch):
        assert tuple(g.shape) == tuple(t.shape), f"d{n}: shape {tuple(g.shape)} != {tuple(t.shape)}"
        assert_close_to_ref(g, w, tg, dtype=dtype, name=f"{v.id} d{n}",
                            scale=dx_scale if n in ("x", "residual") else None, stress=stress)
    return outs


def _dx_scale(v, c64: Case, gouts, eps) -> float:
    """Natural size of dx: rstd * |act'| * |w| * |dy| (+ |dh|); dx itself may cancel to ~0."""
    with torch.no_grad():
        h = c64.x + c64.residual if v.has_residual else c64.x
        if h.numel() == 0:
            return 0.0
        rstd = torch.rsqrt(h.var(-1, correction=0) + eps).max().item()
        w = 1.0 if c64.weight is None else max(1.0, c64.weight.abs().max().item())
        gy = 0.0 if gouts[0] is None else gouts[0].abs().max().item()
        gh = 0.0 if len(gouts) < 2 or gouts[1] is None else gouts[1].abs().max().item()
        return rstd * 1.13 * w * gy + gh


def _sid(shape):
    return "x".join(str(s) for s in shape) if shape else "scalar"


# ---- the references themselves --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [FP32, BF16, FP64])
@pytest.mark.parametrize("act", [None, "gelu", "gelu_tanh"])
def test_refs_match_torch_in_float64(act, dtype):
    x = _randn((3, 5, 33), dtype, "cpu")
    r = _randn((3, 5, 33), dtype, "cpu")
    w, b = _randn((33,), dtype, "cpu"), _randn((33,), dtype, "cpu")
    x64, r64, w64, b64 = (t.double() for t in (x, r, w, b))

    def act_fn(z):
        return z if act is None else F.gelu(z, approximate=_APPROXIMATE[act])

    for kw in ({}, {"weight": w}, {"weight": w, "bias": b}, {"bias": b}):
        kw64 = {k: t.double() for k, t in kw.items()}
        y = ln_mod.layer_norm_ref(x, eps=1e-3, activation=act, **kw)
        assert y.dtype == FP64 and y.shape == x.shape
        torch.testing.assert_close(y, act_fn(F.layer_norm(x64, (33,), eps=1e-3, **kw64)), rtol=1e-12, atol=1e-12)
        y2, h2 = ln_mod.add_layer_norm_ref(x, r, eps=1e-3, activation=act, **kw)
        assert y2.dtype == FP64 and h2.dtype == FP64
        torch.testing.assert_close(h2, x64 + r64, rtol=0, atol=0)
        torch.testing.assert_close(y2, act_fn(F.layer_norm(x64 + r64, (33,), eps=1e-3, **kw64)),
                                   rtol=1e-12, atol=1e-12)
    # defaults: eps=1e-5, activation None, no affine (tiny variance so eps matters)
    xs = x64 * 1e-3
    torch.testing.assert_close(ln_mod.layer_norm_ref(xs), F.layer_norm(xs, (33,), eps=1e-5), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(ln_mod.layer_norm_ref(xs), F.layer_norm(xs, (33,), eps=1e-6))
    y0, h0 = ln_mod.add_layer_norm_ref(xs, xs)
    torch.testing.assert_close(y0, F.layer_norm(2 * xs, (33,), eps=1e-5), rtol=1e-12, atol=1e-12)


def test_public_signatures():
    """Argument names, order and defaults follow F.layer_norm / F.gelu (DESIGN §3)."""
    def params(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    P, K, E = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.empty
    assert params(ops.layer_norm) == [("x", P, E), ("weight", P, None), ("bias", P, None), ("eps", P, 1e-5),
                                      ("backend", K, None)]
    assert params(ops.layer_norm_gelu) == [("x", P, E), ("weight", P, None), ("bias", P, None),
                                           ("eps", P, 1e-5), ("approximate", P, "none"), ("backend", K, None)]
    assert params(ops.add_layer_norm) == [("x", P, E), ("residual", P, E), ("weight", P, None),
                                          ("bias", P, None), ("eps", P, 1e-5), ("activation", P, None),
                                          ("backend", K, None)]
    assert issubclass(pydl.BackendError, RuntimeError)


def test_keyword_arguments(device):
    x = _randn((4, 33), FP32, device)
    w, b, r = _randn((33,), FP32, device), _randn((33,), FP32, device), _randn((4, 33), FP32, device)
    ref = ln_mod.layer_norm_ref(x, w, b, 1e-3)
    assert_close_to_ref(ops.layer_norm(x, weight=w, bias=b, eps=1e-3), ref)
    assert_close_to_ref(ops.layer_norm(x, bias=b, weight=w, eps=1e-3), ref)
    assert_close_to_ref(ops.layer_norm_gelu(x, bias=b, approximate="tanh", weight=w, eps=1e-3),
                        ln_mod.layer_norm_ref(x, w, b, 1e-3, "gelu_tanh"))
    y, h = ops.add_layer_norm(x, residual=r, bias=b, activation="gelu", weight=w, eps=1e-3)
    ry, rh = ln_mod.add_layer_norm_ref(x, r, w, b, 1e-3, "gelu")
    assert_close_to_ref(y, ry)
    assert_close_to_ref(h, rh)


# ---- native CPU: every size --------------------------------------------------------------------------

# rows bounded so that M * N stays small (each case also runs the float64 reference + autograd)
NATIVE_CPU_SHAPES = [(37, 1), (37, 7), (37, 59), (37, 97), (19, 1023), (19, 1025), (19, 1500),
                     (5, 4096), (5, 8191), (2, 65536)]


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", NATIVE_CPU_SHAPES, ids=_sid)
@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_native_cpu_sizes(v, shape, dtype):
    check_op(v, shape, dtype, "cpu", "native")


@pytest.mark.parametrize("shape", [(37, 1), (37, 7), (37, 1025), (9, 8191), (3, 65536)], ids=_sid)
@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_native_cpu_float64(v, shape):
    check_op(v, shape, FP64, "cpu", "native")


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("v", [LN, ADD_LN_GELU], ids=lambda v: v.id)
def test_native_cpu_many_rows(v, dtype):
    """Many short rows: the row-parallel split and the cross-row dweight/dbias reduction."""
    check_op(v, (4099, 33), dtype, "cpu", "native")


@pytest.mark.parametrize("v", [LN, ADD_LN_GELU], ids=lambda v: v.id)
def test_native_cpu_outputs_over_the_huge_page_threshold(v):
    """y, h and dx of 8.4 MB each: the kernels first advise huge pages on their whole 2 MiB
    pages (cpu_utils.h, threshold 4 MiB); every element, head and tail included, must be right."""
    check_op(v, (2048, 1031), FP32, "cpu", "native")


@pytest.mark.parametrize("shape", [(4099, 33), (3, 65536), (1, 1)], ids=_sid)
def test_native_cpu_single_thread(shape):
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        check_op(ADD_LN_GELU, shape, FP32, "cpu", "native")
        check_op(LN, shape, FP32, "cpu", "native")
    finally:
        torch.set_num_threads(old)


LEADING = [(), (1,), (2, 3), (2, 3, 4), (0,), (2, 0), (0, 3)]


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [7, 1025])
@pytest.mark.parametrize("lead", LEADING, ids=lambda s: "lead" + _sid(s))
@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_native_cpu_leading_shapes(v, lead, n, dtype):
    check_op(v, lead + (n,), dtype, "cpu", "native")


@pytest.mark.parametrize("shape", [(0, 7), (2, 0, 1025)], ids=_sid)
@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_zero_rows_give_zero_param_grads(v, backend, shape):
    """No rows: empty y/h/dx, and dweight/dbias exactly zero (not uninitialized memory)."""
    case = make_case(v, shape, FP32, "cpu")
    outs = run_pydl(v, case.x, case.residual, case.weight, case.bias, backend=backend)
    assert all(o.shape == case.x.shape for o in outs)
    gouts = [torch.ones_like(o) for o in outs]
    named = case.named()
    grads = _grads(outs, [t for _, t in named], gouts)
    for (n, t), g in zip(named, grads):
        assert g.shape == t.shape, n
        if n in ("weight", "bias"):
            assert torch.equal(g, torch.zeros_like(g)), f"d{n} with zero rows: {g[:8]}"


@pytest.mark.parametrize("layout", LAYOUTS[1:])
@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 1025)], ids=_sid)
@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_native_cpu_noncontiguous(v, shape, layout):
    check_op(v, shape, FP32, "cpu", "native", layout=layout)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
@pytest.mark.parametrize("v", [LN, LN_GELU_TANH, ADD_LN_GELU], ids=lambda v: v.id)
def test_native_cpu_noncontiguous_bf16(v, layout):
    check_op(v, (6, 97), BF16, "cpu", "native", layout=layout)


@pytest.mark.parametrize("grad_layout", ["ones", "expanded", "transposed"])
@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_native_cpu_noncontiguous_upstream_grad(v, grad_layout):
    check_op(v, (6, 97), FP32, "cpu", "native", grad_layout=grad_layout)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("used", ["y", "h"])
@pytest.mark.parametrize("v", [ADD_LN, ADD_LN_GELU, ADD_LN_GELU_TANH], ids=lambda v: v.id)
def test_add_layer_norm_one_output_used(v, used, dtype):
    """Gradients when only y or only h feeds the loss (the other's gradient is None)."""
    check_op(v, (6, 97), dtype, "cpu", "native", used=used)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("weight,bias", [(False, False), (True, False), (False, True)],
                         ids=["noaffine", "weightonly", "biasonly"])
@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_native_cpu_weight_bias_optional(v, weight, bias, dtype):
    check_op(v, (13, 97), dtype, "cpu", "native", weight=weight, bias=bias)


@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_partial_requires_grad(v):
    """Only some inputs require grad: those get correct gradients, the others none."""
    case = make_case(v, (5, 59), FP32, "cpu", requires_grad=False)
    named = case.named()
    for i, (name, _) in enumerate(named):
        leaves = [t.detach().clone().requires_grad_(j == i) for j, (_, t) in enumerate(named)]
        c = Case(*[dict(zip([n for n, _ in named], leaves)).get(k) for k in ("x", "residual", "weight", "bias")])
        outs = run_pydl(v, c.x, c.residual, c.weight, c.bias, backend="native")
        loss = sum((o * torch.linspace(-1, 1, o.shape[-1])).sum() for o in outs)
        (g,) = torch.autograd.grad(loss, [leaves[i]])
        c64 = _copy_case(c, FP64)
        refs = run_ref(v, c64.x, c64.residual, c64.weight, c64.bias)
        loss64 = sum((o * torch.linspace(-1, 1, o.shape[-1], dtype=FP64)).sum() for o in refs)
        (want,) = torch.autograd.grad(loss64, [dict(c64.named())[name]])
        assert_close_to_ref(g, want, name=f"{v.id} d{name}")
        for j, leaf in enumerate(leaves):
            if j != i:
                assert leaf.grad is None


@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_outputs_do_not_alias_inputs(v):
    case = make_case(v, (4, 33), FP32, "cpu", requires_grad=False)
    before = [t.clone() for _, t in case.named()]
    outs = run_pydl(v, case.x, case.residual, case.weight, case.bias, backend="native")
    for o in outs:
        o.add_(1.0)
    for (n, t), b in zip(case.named(), before):
        assert torch.equal(t, b), f"writing to an output changed {n}"
    if v.has_residual:
        assert outs[0].data_ptr() != outs[1].data_ptr()


def test_no_grad_and_inference_mode(device):
    x = _randn((4, 33), FP32, device).requires_grad_()
    w = _randn((33,), FP32, device).requires_grad_()
    ref = ln_mod.layer_norm_ref(x.detach(), w.detach())
    with torch.no_grad():
        y = ops.layer_norm(x, w)
    assert not y.requires_grad
    assert_close_to_ref(y, ref)
    with torch.inference_mode():
        y2, h2 = ops.add_layer_norm(x, x, w, activation="gelu")
        assert y2.grad_fn is None and h2.grad_fn is None
    assert_close_to_ref(y2, ln_mod.add_layer_norm_ref(x.detach(), x.detach(), w.detach(), activation="gelu")[0])


# ---- eps and numerically hard inputs --------------------------------------------------------------

@pytest.mark.parametrize("eps", [0.0, 1e-6, 1e-5, 1e-3, 0.5])
@pytest.mark.parametrize("v", [LN, LN_GELU, ADD_LN_GELU_TANH], ids=lambda v: v.id)
def test_eps_is_inside_the_sqrt(v, eps):
    """Variance ~1e-6, comparable to eps: a misplaced or ignored eps is a large error."""
    check_op(v, (9, 97), FP32, "cpu", "native", eps=eps, scale=1e-3)
    check_op(v, (9, 97), FP64, "cpu", "native", eps=eps, scale=1e-3)


def test_default_eps_is_1e_5(device):
    x = _randn((6, 97), FP32, device, scale=1e-3)
    other = ln_mod.layer_norm_ref(x, eps=1e-6)
    assert_close_to_ref(ops.layer_norm(x), ln_mod.layer_norm_ref(x, eps=1e-5))
    assert_close_to_ref(ops.layer_norm_gelu(x), ln_mod.layer_norm_ref(x, eps=1e-5, activation="gelu"))
    assert_close_to_ref(ops.add_layer_norm(x, torch.zeros_like(x))[0], ln_mod.layer_norm_ref(x, eps=1e-5))
    assert (ln_mod.layer_norm_ref(x, eps=1e-5) - other).abs().max() > 1e-2  # eps really matters here


@pytest.mark.parametrize("offset", [1e3, -3e4])
@pytest.mark.parametrize("n", [7, 1025])
@pytest.mark.parametrize("v", [LN, ADD_LN_GELU], ids=lambda v: v.id)
def test_large_mean_small_variance(v, n, offset):
    """mean >> std: a one-pass E[x^2] - E[x]^2 variance in float32 is >1000x torch's error here."""
    rows = min(64, max(5, 65536 // n))
    check_op(v, (rows, n), FP32, "cpu", "native", offset=offset, stress=True)


def _constant_rows_case(v, n, dtype, device):
    x = torch.full((5, n), 3.3, dtype=dtype, device=device)
    x[1] = -7.77
    x[2] = 0.0
    x[3] = 1000.5 if dtype == FP32 else 1000.0
    x[4] = 1000.1 if dtype == FP32 else -0.123
    r = torch.full((5, n), 0.25, dtype=dtype, device=device).requires_grad_() if v.has_residual else None
    w = make_param(n, dtype, device, offset=1.0, requires_grad=True)
    b = make_param(n, dtype, device, requires_grad=True)
    return Case(x.requires_grad_(), r, w, b)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [97, 1025, 65536])
@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_constant_rows(v, n, dtype):
    """Zero variance: xhat = 0 exactly, so y = act(bias) (torch gets this exactly); never NaN.

    rstd = 1/sqrt(eps) ~ 316 amplifies any rounding error in the mean of a constant row
    (e.g. padding rows): the mean of a constant row must come out exact.
    """
    outs = check_op(v, (5, n), dtype, "cpu", "native", case=_constant_rows_case(v, n, dtype, "cpu"))
    assert torch.isfinite(outs[0]).all()


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("v", [LN, ADD_LN_GELU], ids=lambda v: v.id)
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


# ---- gradcheck in float64 -----------------------------------------------------------------------------

def _gradcheck_native(v, case, eps):
    """torch.autograd.gradcheck of the native op over every tensor argument of ``case``."""
    named = case.named()
    leaves = [t.detach().clone().requires_grad_() for _, t in named]
    keys = [n for n, _ in named]

    def fn(*args):
        d = dict(zip(keys, args))
        return run_pydl(v, d["x"], d.get("residual"), d.get("weight"), d.get("bias"), eps, "native")

    return torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("shape", [(3, 7), (2, 2, 5), (1, 1)], ids=_sid)
@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_gradcheck_native_float64(v, shape):
    assert _gradcheck_native(v, make_case(v, shape, FP64, "cpu"), 1e-3)


@pytest.mark.parametrize("weight,bias", [(False, False), (True, False), (False, True)],
                         ids=["noaffine", "weightonly", "biasonly"])
@pytest.mark.parametrize("v", [LN, LN_GELU_TANH, ADD_LN_GELU], ids=lambda v: v.id)
def test_gradcheck_native_float64_optional_affine(v, weight, bias):
    case = make_case(v, (3, 6), FP64, "cpu", weight=weight, bias=bias, layout="sliced")
    assert _gradcheck_native(v, case, 1e-5)


# ---- torch backend and automatic choice ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [FP32, BF16, FP16, FP64], ids=["fp32", "bf16", "fp16", "fp64"])
@pytest.mark.parametrize("shape", [(9, 7), (2, 3, 1025), (0, 5)], ids=_sid)
@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_torch_backend(v, shape, dtype):
    check_op(v, shape, dtype, "cpu", "torch")


@pytest.mark.parametrize("layout", ["transposed", "expanded", "lastdim_strided"])
@pytest.mark.parametrize("v", [LN_GELU, ADD_LN_GELU_TANH], ids=lambda v: v.id)
def test_torch_backend_noncontiguous(v, layout):
    check_op(v, (6, 33), FP32, "cpu", "torch", layout=layout)


@pytest.mark.parametrize("dtype", [FP32, BF16, FP16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_default_backend(v, dtype, device):
    """backend=None picks a backend that can run the call (float16 on CPU: not native)."""
    check_op(v, (2, 5, 97), dtype, device, None)


# ---- forced backends ------------------------------------------------------------------------------

def _backend_error(excinfo, *words):
    msg = str(excinfo.value)
    assert msg.strip(), "BackendError without a message"
    assert any(w in msg for w in words), f"message does not give the reason ({words}): {msg!r}"


@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_forced_native_rejects_float16_on_cpu(v):
    case = make_case(v, (4, 8), FP16, "cpu", requires_grad=False)
    with pytest.raises(pydl.BackendError) as ei:
        run_pydl(v, case.x, case.residual, case.weight, case.bias, backend="native")
    _backend_error(ei, "float16", "Half", "half")


@pytest.mark.parametrize("v", [LN, ADD_LN_GELU], ids=lambda v: v.id)
def test_forced_triton_rejects_float64_on_cpu(v):
    case = make_case(v, (4, 8), FP64, "cpu", requires_grad=False)
    with pytest.raises(pydl.BackendError) as ei:
        run_pydl(v, case.x, case.residual, case.weight, case.bias, backend="triton")
    _backend_error(ei, "float64", "Double", "double")


@pytest.mark.parametrize("v", [LN, LN_GELU, ADD_LN], ids=lambda v: v.id)
def test_unknown_backend_name(v):
    case = make_case(v, (4, 8), FP32, "cpu", requires_grad=False)
    with pytest.raises((ValueError, pydl.BackendError), match="no_such_backend"):
        run_pydl(v, case.x, case.residual, case.weight, case.bias, backend="no_such_backend")


def test_env_var_forces_backend(monkeypatch):
    x16 = _randn((4, 8), FP16, "cpu")
    monkeypatch.setenv("PYDL_BACKEND", "native")
    with pytest.raises(pydl.BackendError) as ei:
        ops.layer_norm(x16)
    _backend_error(ei, "float16", "Half", "half")
    with pytest.raises(pydl.BackendError):
        ops.add_layer_norm(x16, x16)
    # the explicit argument wins over the environment
    assert_close_to_ref(ops.layer_norm(x16, backend="torch"), ln_mod.layer_norm_ref(x16),
                        F.layer_norm(x16, (8,)))
    monkeypatch.setenv("PYDL_BACKEND", "torch")
    assert_close_to_ref(ops.layer_norm_gelu(x16), ln_mod.layer_norm_ref(x16, activation="gelu"),
                        F.gelu(F.layer_norm(x16, (8,))))
    monkeypatch.setenv("PYDL_BACKEND", "triton")
    with pytest.raises(pydl.BackendError):
        ops.layer_norm(_randn((4, 8), FP64, "cpu"))
    monkeypatch.setenv("PYDL_BACKEND", "no_such_backend")
    with pytest.raises((ValueError, pydl.BackendError), match="no_such_backend"):
        ops.layer_norm(_randn((4, 8), FP32, "cpu"))


# ---- bad input --------------------------------------------------------------------------------------

OPS3 = ["layer_norm", "layer_norm_gelu", "add_layer_norm"]
BACKENDS_CPU = [None, "native", "torch"]


def _call(op, x, residual=None, *, backend=None, **kw):
    if op == "add_layer_norm":
        return ops.add_layer_norm(x, x.detach().clone() if residual is None else residual, backend=backend, **kw)
    return getattr(ops, op)(x, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS_CPU)
@pytest.mark.parametrize("op", OPS3)
def test_bad_weight_shape(op, backend, device):
    x = _randn((4, 8), FP32, device)
    for w in (_randn((9,), FP32, device), _randn((1, 8), FP32, device), _randn((4,), FP32, device)):
        with pytest.raises(ValueError, match="weight"):
            _call(op, x, weight=w, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS_CPU)
@pytest.mark.parametrize("op", OPS3)
def test_bad_bias_shape(op, backend, device):
    x = _randn((4, 8), FP32, device)
    for b in (_randn((7,), FP32, device), _randn((8, 1), FP32, device)):
        with pytest.raises(ValueError, match="bias"):
            _call(op, x, weight=_randn((8,), FP32, device), bias=b, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_bad_residual_shape(backend, device):
    x = _randn((4, 8), FP32, device)
    for r in (_randn((4, 9), FP32, device), _randn((5, 8), FP32, device), _randn((2, 4, 8), FP32, device)):
        with pytest.raises(ValueError, match="residual"):
            ops.add_layer_norm(x, r, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS_CPU)
@pytest.mark.parametrize("op", OPS3)
def test_dtype_mismatch(op, backend, device):
    x = _randn((4, 8), FP32, device)
    for other in (BF16, FP64):
        with pytest.raises(TypeError, match="weight"):
            _call(op, x, weight=_randn((8,), other, device), backend=backend)
        with pytest.raises(TypeError, match="bias"):
            _call(op, x, bias=_randn((8,), other, device), backend=backend)
    if op == "add_layer_norm":
        with pytest.raises(TypeError, match="residual"):
            ops.add_layer_norm(x, _randn((4, 8), BF16, device), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS_CPU)
@pytest.mark.parametrize("op", OPS3)
def test_integer_x(op, backend, device):
    for dt in (torch.int64, torch.int32, torch.bool):
        x = torch.ones((4, 8), dtype=dt, device=device)
        with pytest.raises(TypeError, match=r"\bx\b"):
            _call(op, x, residual=torch.ones((4, 8), device=device), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS_CPU)
@pytest.mark.parametrize("op", OPS3)
def test_x_without_a_normalized_dim(op, backend, device):
    for shape in ((), (3, 0), (0,), (0, 0), (2, 3, 0)):
        x = torch.zeros(shape, device=device)
        with pytest.raises(ValueError, match=r"\bx\b"):
            _call(op, x, residual=torch.zeros(shape, device=device), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS_CPU)
@pytest.mark.parametrize("op", OPS3)
def test_negative_eps(op, backend, device):
    x = _randn((4, 8), FP32, device)
    for eps in (-1e-5, -1.0):
        with pytest.raises(ValueError, match="eps"):
            _call(op, x, eps=eps, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS_CPU)
@pytest.mark.parametrize("op", OPS3)
def test_nan_eps(op, backend, device):
    x = _randn((4, 8), FP32, device)
    with pytest.raises(ValueError, match="eps"):
        _call(op, x, eps=float("nan"), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_bad_approximate_and_activation(backend, device):
    x = _randn((4, 8), FP32, device)
    for bad in ("sigmoid", "", "None"):
        with pytest.raises(ValueError) as ei:
            ops.layer_norm_gelu(x, approximate=bad, backend=backend)
        assert "approximate" in str(ei.value) or repr(bad) in str(ei.value)
    for bad in ("relu", "", "GELU_TANH"):
        with pytest.raises(ValueError) as ei:
            ops.add_layer_norm(x, x, activation=bad, backend=backend)
        assert "activation" in str(ei.value) or repr(bad) in str(ei.value)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", [None, "native", "torch"])
@pytest.mark.parametrize("op", OPS3)
def test_device_mix(op, backend):
    x = _randn((4, 8), FP32, "cuda")
    with pytest.raises(ValueError, match="weight"):
        _call(op, x, weight=_randn((8,), FP32, "cpu"), backend=backend)
    with pytest.raises(ValueError, match="bias"):
        _call(op, x, bias=_randn((8,), FP32, "cpu"), backend=backend)
    if op == "add_layer_norm":
        with pytest.raises(ValueError, match="residual"):
            ops.add_layer_norm(x, _randn((4, 8), FP32, "cpu"), backend=backend)
        with pytest.raises(ValueError, match="residual"):
            ops.add_layer_norm(_randn((4, 8), FP32, "cpu"), x, backend=backend)


# ---- the activation alone, over a wide range --------------------------------------------------------

@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_native_cpu_activation_accuracy_over_a_wide_range(approximate):
    """weight = 0 makes z = bias, so y = gelu(bias) and dbias = gelu'(bias) (dy = 1, one row).

    A dense float32 sweep of [-12, 12] (both tails and the CPU normal-CDF clamp at |z| = 5.5):
    the error relative to 1 + |z| may be at most twice torch's own float32 F.gelu error;
    gelu(+-inf) and its gradient are inf/NaN exactly where float64 torch's are (float32
    F.gelu gives NaN at +inf, float64 gives inf)."""
    n = 20001
    z = torch.linspace(-12, 12, n)
    z[n // 2 + 1] = 5.5  # the clamp point itself
    z[0], z[-1] = -float("inf"), float("inf")
    b = z.clone().requires_grad_()
    y = ops.layer_norm_gelu(_randn((1, n), FP32, "cpu"), torch.zeros(n), b, approximate=approximate,
                            backend="native")
    (db,) = torch.autograd.grad(y, [b], torch.ones_like(y))
    z64 = z.double().requires_grad_()
    ref = F.gelu(z64, approximate=approximate)
    (dref,) = torch.autograd.grad(ref, [z64], torch.ones_like(ref))
    tz = z.clone().requires_grad_()
    ty = F.gelu(tz, approximate=approximate)
    (tdb,) = torch.autograd.grad(ty, [tz], torch.ones_like(ty))
    for out, exact in ((y[0], ref), (db, dref)):
        out, exact = out.detach(), exact.detach()
        assert torch.equal(out.isnan(), exact.isnan()) and torch.equal(out.isinf(), exact.isinf())
    finite = slice(1, n - 1)
    size = 1 + z64.detach()[finite].abs()

    def err(out, exact):
        return ((out.detach().double()[finite] - exact.detach()[finite]).abs() / size).max().item()

    assert err(y[0], ref) <= 2 * err(ty, ref) + 1e-8, "forward"
    assert err(db, dref) <= 2 * err(tdb, dref) + 1e-8, "backward"


# ---- NaN / Inf pass through like torch ------------------------------------------------------------

@pytest.mark.parametrize("backend", [None, "native", "torch"])
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [7, 1025])
@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_nan_inf_propagate_like_torch(v, n, dtype, backend, device):
    m = 6
    x = _randn((m, n), dtype, device)
    x[1, n // 2] = float("nan")
    x[3, 0] = float("inf")
    x[4, n - 1] = -float("inf")
    r = _randn((m, n), dtype, device) if v.has_residual else None
    w, b = _randn((n,), dtype, device), _randn((n,), dtype, device)
    w[n - 1] = float("nan")  # one NaN column
    outs = run_pydl(v, x, r, w, b, backend=backend)
    touts = run_torch(v, x, r, w, b)
    for o, t in zip(outs, touts):
        assert torch.equal(torch.isnan(o), torch.isnan(t)), "NaN pattern differs from torch"
        assert torch.equal(torch.isposinf(o), torch.isposinf(t)) and torch.equal(torch.isneginf(o), torch.isneginf(t))
    # the clean rows are unaffected: compare them with the reference
    clean = torch.tensor([0, 2, 5], device=device)
    cols = slice(0, n - 1)  # the NaN weight column is NaN in every row
    refs = run_ref(v, x[clean], None if r is None else r[clean], w, b, h_dtype=dtype)
    tclean = run_torch(v, x[clean], None if r is None else r[clean], w, b)
    assert_close_to_ref(outs[0][clean][:, cols], refs[0][:, cols], tclean[0][:, cols], dtype=dtype, name="clean rows")
    assert torch.isfinite(outs[0][clean][:, cols]).all()


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("v", [LN, LN_GELU, ADD_LN_GELU_TANH], ids=lambda v: v.id)
def test_nan_row_backward_stays_in_its_row(v, backend):
    m, n = 5, 97
    x = _randn((m, n), FP32, "cpu")
    x[2, 3] = float("nan")
    r = _randn((m, n), FP32, "cpu") if v.has_residual else None
    x.requires_grad_()
    outs = run_pydl(v, x, r, None, None, backend=backend)
    gy = _randn((m, n), FP32, "cpu")
    (dx,) = torch.autograd.grad(outs[0], [x], gy)
    assert torch.isnan(dx[2]).all()
    keep = torch.tensor([0, 1, 3, 4])
    x64 = x.detach()[keep].double().requires_grad_()
    ref = run_ref(v, x64, None if r is None else r[keep], None, None)[0]
    (want,) = torch.autograd.grad(ref, [x64], gy[keep].double())
    assert_close_to_ref(dx[keep], want, name="dx of clean rows")


# ---- custom ops: opcheck and torch.compile --------------------------------------------------------

class _RecordPydlOps(TorchDispatchMode):
    """Records every pydl:: operator call (with cloned arguments) made under it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "namespace", None) == "pydl":
            cl = lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t  # noqa: E731
            self.calls.append((func, tree_map(cl, args), tree_map(cl, kwargs)))
        return func(*args, **kwargs)


def _recorded_calls(v, case, backend):
    """The pydl:: ops a forward + backward of the public op runs, with their arguments."""
    rec = _RecordPydlOps()
    with rec:
        outs = run_pydl(v, case.x, case.residual, case.weight, case.bias, 1e-5, backend)
        _grads(outs, [t for _, t in case.named()], [torch.randn_like(o) for o in outs])
    return rec.calls


def _with_requires_grad(func, args, kwargs):
    """Set requires_grad on the floating-point tensor inputs the schema does not write to."""
    schema = func._schema
    args = list(args)
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            info = schema.arguments[i].alias_info if i < len(schema.arguments) else None
            if info is None or not info.is_write:
                args[i] = a.detach().clone().requires_grad_()
    return tuple(args), kwargs


def test_custom_ops_are_registered():
    assert hasattr(torch.ops, "pydl")
    for name in ("layer_norm_fwd", "layer_norm_bwd"):
        assert hasattr(torch.ops.pydl, name), f"torch.ops.pydl.{name} is not registered"


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("dtype", [FP32, FP64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("v,weight,bias", [(LN, True, True), (LN_GELU_TANH, True, False),
                                            (ADD_LN_GELU, False, True), (ADD_LN, True, True)],
                         ids=["layer_norm", "gelu_tanh-weightonly", "add-gelu-biasonly", "add"])
def test_opcheck(v, weight, bias, dtype, backend):
    case = make_case(v, (3, 5, 17), dtype, "cpu", weight=weight, bias=bias)
    calls = _recorded_calls(v, case, backend)
    if backend == "native":
        names = {f._schema.name for f, _, _ in calls}
        assert any("fwd" in n or "forward" in n for n in names) and any("bwd" in n or "backward" in n for n in names), \
            f"forward/backward did not go through pydl:: custom ops (saw {sorted(names)})"
    for func, args, kwargs in calls:
        torch.library.opcheck(func, args, kwargs)
        name = func._schema.name
        if "bwd" not in name and "backward" not in name:
            a2, k2 = _with_requires_grad(func, args, kwargs)
            torch.library.opcheck(func, a2, k2)


def _compile_fn(backend):
    def f(x, r, w, b):
        y, h = ops.add_layer_norm(x, r, w, b, 1e-5, "gelu", backend=backend)
        z = ops.layer_norm_gelu(h * 0.5, w, b, 1e-5, "tanh", backend=backend)
        u = ops.layer_norm(y, w, None, 1e-4, backend=backend)
        return y + z * u, h
    return f


@pytest.mark.parametrize("compiler,backend,dynamic", [
    ("aot_eager", None, False),
    ("aot_eager", "native", False),
    ("aot_eager", "native", True),
    pytest.param("inductor", "native", False, marks=pytest.mark.slow),
])
def test_torch_compile_fullgraph(compiler, backend, dynamic):
    torch._dynamo.reset()
    f = _compile_fn(backend)
    cf = torch.compile(f, fullgraph=True, backend=compiler, dynamic=dynamic)
    shapes = [(4, 6, 33), (3, 97)] if dynamic else [(4, 6, 33)]
    for shape in shapes:
        n = shape[-1]
        leaves = [_randn(shape, FP32, "cpu"), _randn(shape, FP32, "cpu"), _randn((n,), FP32, "cpu", offset=1.0),
                  _randn((n,), FP32, "cpu")]
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
    f = _compile_fn(None)
    cf = torch.compile(f, backend="eager")
    x = _randn((2, 9), FP32, "cpu")
    cf(x, x, None, None)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])


# ---- Triton (interpreter on CPU, compiled on a GPU) ---------------------------------------------------

TRITON_NS = [1, 7, 97, 1025]


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", TRITON_NS)
@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_triton_small(v, n, dtype, triton_device):
    check_op(v, (5, n), dtype, triton_device, "triton")


@pytest.mark.triton
@pytest.mark.parametrize("shape,layout", [((2, 3, 97), "contiguous"), ((0, 7), "contiguous"),
                                          ((2, 0, 7), "contiguous"), ((7,), "contiguous"),
                                          ((6, 33), "sliced"), ((6, 33), "transposed"), ((6, 33), "expanded"),
                                          ((6, 33), "lastdim_strided"), ((6, 33), "row_strided")],
                         ids=["3d", "zero-rows", "zero-rows-3d", "1d", "sliced", "transposed", "expanded",
                              "lastdim-strided", "row-strided"])
@pytest.mark.parametrize("v", [LN, ADD_LN_GELU_TANH], ids=lambda v: v.id)
def test_triton_shapes_and_layouts(v, shape, layout, triton_device):
    check_op(v, shape, FP32, triton_device, "triton", layout=layout)


@pytest.mark.triton
@pytest.mark.parametrize("weight,bias", [(False, False), (True, False), (False, True)],
                         ids=["noaffine", "weightonly", "biasonly"])
@pytest.mark.parametrize("v", [LN_GELU, ADD_LN], ids=lambda v: v.id)
def test_triton_weight_bias_optional(v, weight, bias, triton_device):
    check_op(v, (6, 97), FP32, triton_device, "triton", weight=weight, bias=bias)


@pytest.mark.triton
@pytest.mark.parametrize("used", ["y", "h"])
def test_triton_add_layer_norm_one_output_used(used, triton_device):
    check_op(ADD_LN_GELU, (4, 33), FP32, triton_device, "triton", used=used)


@pytest.mark.triton
@pytest.mark.parametrize("v", [LN, ADD_LN_GELU], ids=lambda v: v.id)
def test_triton_chunked_path(v, triton_device, monkeypatch):
    """The large-N (column-chunked) kernels, reached at a small N by lowering the tile limits."""
    tln = importlib.import_module("pydl.triton.layer_norm")
    monkeypatch.setattr(tln, "FWD_MAX_TILE", 64)
    monkeypatch.setattr(tln, "BWD_MAX_TILE", 64)
    monkeypatch.setattr(tln, "CHUNK_N", 32)
    check_op(v, (3, 200), FP32, triton_device, "triton")
    check_op(v, (3, 97), BF16, triton_device, "triton")


@pytest.mark.triton
@pytest.mark.parametrize("v", [LN, ADD_LN_GELU], ids=lambda v: v.id)
def test_triton_constant_rows(v, triton_device):
    check_op(v, (5, 97), FP32, triton_device, "triton", case=_constant_rows_case(v, 97, FP32, triton_device))


@pytest.mark.triton
def test_triton_nan_propagates_like_torch(triton_device):
    x = _randn((3, 33), FP32, triton_device)
    x[1, 5] = float("nan")
    y = ops.layer_norm_gelu(x, backend="triton")
    assert torch.equal(torch.isnan(y), torch.isnan(F.gelu(F.layer_norm(x, (33,)))))


@pytest.mark.triton
def test_triton_opcheck(triton_device):
    case = make_case(ADD_LN_GELU, (3, 17), FP32, triton_device)
    calls = _recorded_calls(ADD_LN_GELU, case, "triton")
    assert calls, "the triton backend does not run through a pydl:: custom op"
    for func, args, kwargs in calls:
        torch.library.opcheck(func, args, kwargs, test_utils=("test_schema", "test_faketensor",
                                                              "test_autograd_registration"))


# ---- CUDA: native and triton at GPU sizes ------------------------------------------------------------

CUDA_BACKENDS = [pytest.param("native", id="native"), pytest.param("triton", id="triton", marks=pytest.mark.triton)]
CUDA_DTYPES = [pytest.param(FP32, id="fp32"), pytest.param(FP16, id="fp16"), pytest.param(BF16, id="bf16")]
CUDA_ODD_SHAPES = [(64, 1), (64, 7), (64, 59), (64, 97), (33, 1023), (33, 1025), (3, 5, 1500),
                   (16, 4096), (16, 8191), (0, 768), (2, 0, 97)]
CUDA_BIG_SHAPES = [(16384, 768), (4096, 1024), (2048, 4096), (8, 65536), (1, 65536)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("shape", CUDA_ODD_SHAPES, ids=_sid)
@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_cuda_sizes(v, shape, backend, dtype):
    check_op(v, shape, dtype, "cuda", backend)


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("shape", CUDA_BIG_SHAPES, ids=_sid)
@pytest.mark.parametrize("v", [LN, ADD_LN_GELU], ids=lambda v: v.id)
def test_cuda_big_shapes(v, shape, backend, dtype):
    check_op(v, shape, dtype, "cuda", backend)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS[1:])
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("v", [LN, LN_GELU_TANH, ADD_LN_GELU], ids=lambda v: v.id)
def test_cuda_noncontiguous(v, backend, layout):
    check_op(v, (3, 40, 769), BF16, "cuda", backend, layout=layout)
    check_op(v, (3, 40, 769), FP32, "cuda", backend, layout=layout, grad_layout="transposed")


@pytest.mark.cuda
@pytest.mark.parametrize("weight,bias", [(False, False), (True, False), (False, True)],
                         ids=["noaffine", "weightonly", "biasonly"])
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_cuda_weight_bias_optional(v, backend, weight, bias):
    check_op(v, (300, 1025), FP16, "cuda", backend, weight=weight, bias=bias)


@pytest.mark.cuda
@pytest.mark.parametrize("used", ["y", "h"])
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_add_layer_norm_one_output_used(backend, used):
    check_op(ADD_LN_GELU_TANH, (512, 768), BF16, "cuda", backend, used=used)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_cuda_nan_inf_propagate(backend, dtype):
    x = _randn((64, 1024), dtype, "cuda")
    x[3, 7] = float("nan")
    x[9, 0] = float("inf")
    w = _randn((1024,), dtype, "cuda")
    y = ops.layer_norm_gelu(x, w, None, backend=backend)
    t = F.gelu(F.layer_norm(x, (1024,), w, None))
    assert torch.equal(torch.isnan(y), torch.isnan(t))
    assert torch.isfinite(y[torch.tensor([0, 1, 2, 4])]).all()


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_large_mean_and_constant_rows(backend):
    check_op(LN, (256, 4096), FP32, "cuda", backend, offset=1e3)
    for v in (LN, ADD_LN_GELU):
        for dtype in (FP32, BF16):
            for n in (97, 65536):
                check_op(v, (5, n), dtype, "cuda", backend, case=_constant_rows_case(v, n, dtype, "cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_opcheck_and_compile(backend):
    case = make_case(ADD_LN_GELU, (4, 7, 96), FP32, "cuda")
    for func, args, kwargs in _recorded_calls(ADD_LN_GELU, case, backend):
        torch.library.opcheck(func, args, kwargs)
    torch._dynamo.reset()
    f = _compile_fn(backend)
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [_randn((4, 96), FP32, "cuda"), _randn((4, 96), FP32, "cuda"), _randn((96,), FP32, "cuda"),
              _randn((96,), FP32, "cuda")]
    torch.testing.assert_close(cf(*leaves), f(*leaves), rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_cuda_non_default_stream():
    """Kernels run on the current stream (a side stream here), not the legacy default stream."""
    s = torch.cuda.Stream()
    x = _randn((4096, 1024), FP16, "cuda")
    w = _randn((1024,), FP16, "cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        y = ops.layer_norm(x, w, None, backend="native")
        z = y * 2
    s.synchronize()
    want = F.layer_norm(x, (1024,), w, None) * 2
    assert_close_to_ref(z, ln_mod.layer_norm_ref(x, w) * 2, want)
