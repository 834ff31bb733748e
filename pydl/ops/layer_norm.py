"""Fused LayerNorm family: ``layer_norm``, ``layer_norm_gelu`` and ``add_layer_norm``.

All three normalize over the last dim of ``x`` (any size N, any leading shape), with PyTorch's
semantics:

    layer_norm(x, w, b, eps)              == F.layer_norm(x, (N,), w, b, eps)
    layer_norm_gelu(x, w, b, eps, approx) == F.gelu(F.layer_norm(x, (N,), w, b, eps), approximate=approx)
    add_layer_norm(x, r, w, b, eps, act)  == (act(F.layer_norm(x + r, (N,), w, b, eps)), x + r)

Backends: ``native`` (csrc/cpu, csrc/cuda), ``triton`` (pydl/triton/layer_norm.py) and
``torch`` (torch's own ``F.layer_norm`` / ``F.gelu``, with torch's autograd). The kernel
backends share two custom ops, ``pydl::layer_norm_fwd`` and ``pydl::layer_norm_bwd`` (fake
impls, vmap rules, autograd), which the traced path uses; plain eager calls reach the kernels
directly (pydl/ops/_common.py explains the two paths). Kernel backends see ``(..., N)`` tensors
and reduce them to ``(M, N)`` rows with a unit last stride.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _native, backends
from ._common import (EAGER, EAGER_GRAD, cuda_autocast_fp32, device_type, differentiable_grads, eager_apply,
                      eager_mode, in_functorch_transform, vmap_by_loop)

# Activation codes shared with the kernels (csrc/include/pydl/layer_norm.h, pydl/triton).
ACT_NONE, ACT_GELU, ACT_GELU_TANH = 0, 1, 2
# Normalization codes (csrc/include/pydl/layer_norm.h `Norm`): the RMSNorm family
# (pydl/ops/rms_norm.py) runs on the same kernels with NORM_RMS.
NORM_LAYER, NORM_RMS = 0, 1
_ACTIVATION_CODES = {None: ACT_NONE, "gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH}
_APPROXIMATE_CODES = {"none": ACT_GELU, "tanh": ACT_GELU_TANH}
_GELU_APPROXIMATE = {ACT_GELU: "none", ACT_GELU_TANH: "tanh"}
TRITON_MAX_N = 65536  # the Triton kernels' chunked path is sized up to here

_NATIVE_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
_NATIVE_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---- public API ------------------------------------------------------------------------------

def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, *, backend: Optional[str] = None) -> Tensor:
    """LayerNorm over the last dim.

    x: (..., N) floating tensor; weight, bias: (N,) on x's device, or None, of x's dtype or
    (mixed precision, float16/bfloat16 x) both float32. Returns y: x's shape and dtype.
    ``backend`` forces "native", "triton" or "torch".
    """
    return _forward("layer_norm", x, None, weight, bias, eps, ACT_NONE, backend)[0]


def layer_norm_gelu(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                    eps: float = 1e-5, approximate: str = "none", *,
                    backend: Optional[str] = None) -> Tensor:
    """GELU(LayerNorm(x)) in one pass; ``approximate`` is "none" (erf) or "tanh", as in F.gelu.

    x: (..., N); weight, bias: (N,) or None. Returns y of x's shape and dtype.
    """
    act = _APPROXIMATE_CODES.get(approximate)
    if act is None:
        raise ValueError(f"layer_norm_gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _forward("layer_norm_gelu", x, None, weight, bias, eps, act, backend)[0]


def add_layer_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, eps: float = 1e-5, activation: Optional[str] = None,
                   *, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """The pre-LN residual stream step: h = x + residual; y = activation(LayerNorm(h)).

    x, residual: (..., N) on one device; weight, bias: (N,) or None (dtypes as in layer_norm);
    activation: None, "gelu" or "gelu_tanh". Returns (y, h), both of x's shape and of the dtype
    of x + residual (type promotion, as torch; h is rounded to that dtype before it is
    normalized, exactly like the unfused torch code).
    """
    act = _ACTIVATION_CODES.get(activation) if isinstance(activation, (str, type(None))) else None
    if act is None:
        raise ValueError(f"add_layer_norm: activation must be None, 'gelu' or 'gelu_tanh', got {activation!r}")
    if not isinstance(residual, Tensor):
        raise TypeError(f"add_layer_norm: residual must be a Tensor, got {type(residual).__name__}")
    return _forward("add_layer_norm", x, residual, weight, bias, eps, act, backend)


def layer_norm_ref(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   eps: float = 1e-5, activation: Optional[str] = None) -> Tensor:
    """float64 reference of layer_norm / layer_norm_gelu (activation None, "gelu", "gelu_tanh")."""
    up = lambda t: None if t is None else t.double()  # noqa: E731
    return _torch_norm(x.double(), up(weight), up(bias), eps, _ACTIVATION_CODES[activation], NORM_LAYER)


def add_layer_norm_ref(x: Tensor, residual: Tensor, weight: Optional[Tensor] = None,
                       bias: Optional[Tensor] = None, eps: float = 1e-5,
                       activation: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """float64 reference of add_layer_norm: (y, h) with h = x + residual."""
    h = x.double() + residual.double()
    return layer_norm_ref(h, weight, bias, eps, activation), h


# ---- argument checks and backend choice --------------------------------------------------------

_INF = float("inf")


def _allowed_mix(name: str, other: torch.dtype, dtype: torch.dtype) -> bool:
    """The dtype mixes torch accepts: a residual of any floating dtype (the sum is promoted, as
    ``x + residual`` is), and float32 weight/bias with float16/bfloat16 x (mixed precision)."""
    if name == "residual":
        return other.is_floating_point
    return other is torch.float32 and dtype in (torch.float16, torch.bfloat16)


def _check_args(op: str, x, residual, weight, bias, eps) -> tuple:
    """Argument checks, written for speed (a model's forward pays them on every call): each
    tensor attribute read costs ~0.1 us, so each is read once; torch.device objects are never
    built (a device is compared through is_cpu / get_device()). Returns x's dispatch key
    (``_key``) from the attributes already read."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a Tensor, got {type(x).__name__}")
    dtype, shape, on_cpu = x.dtype, x.shape, x.is_cpu
    if not dtype.is_floating_point:
        raise TypeError(f"{op}: x must be a floating-point tensor, got dtype {dtype}")
    if not shape:
        raise ValueError(f"{op}: x must have at least one dim to normalize, got a 0-dim tensor")
    vector = (shape[-1],)
    for name, t, want in (("residual", residual, shape), ("weight", weight, vector), ("bias", bias, vector)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor or None, got {type(t).__name__}")
        if t.shape != want:
            raise ValueError(f"{op}: {name} must have shape {tuple(want)}, got {tuple(t.shape)}")
        if t.dtype is not dtype and not _allowed_mix(name, t.dtype, dtype):
            raise TypeError(f"{op}: {name} dtype {t.dtype} must match x dtype {dtype}"
                            + ("" if name == "residual" else
                               " (or be float32 for float16/bfloat16 x: torch's mixed precision)"))
        if name == "bias" and weight is not None and t.dtype is not weight.dtype:
            raise TypeError(f"{op}: bias dtype {t.dtype} must match weight dtype {weight.dtype}")
        if t.is_cpu is not on_cpu or (not on_cpu and t.get_device() != x.get_device()):
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if type(eps) is not float and (isinstance(eps, bool) or not isinstance(eps, (int, float))):
        raise TypeError(f"{op}: eps must be a float, got {type(eps).__name__}")
    if not 0.0 <= eps < _INF:  # also refuses NaN
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps}")
    return ("cpu" if on_cpu else device_type(x)), dtype, shape[-1] > TRITON_MAX_N


def _native_reasons(key: tuple) -> list:
    return backends.native_reasons(key[0], key[1], _NATIVE_CPU_DTYPES, _NATIVE_CUDA_DTYPES)


def _triton_reasons(key: tuple) -> list:
    reasons = backends.triton_reasons(key[0], key[1], _TRITON_DTYPES)
    if key[2]:
        reasons.append(f"normalized size > {TRITON_MAX_N}")
    return reasons


# Unmeasured on a GPU so far: native first because its backward reduction was designed for
# small N; revisit with benchmarks/results (docs/architecture.md, "Backend priorities").
DISPATCH = backends.Dispatcher(
    "layer_norm", {"native": _native_reasons, "triton": _triton_reasons, "torch": lambda key: []},
    {"cpu": ("native", "torch"), "cuda": ("native", "triton", "torch")})


def _key(x: Tensor) -> tuple:
    """The call class the backend choice depends on: (device type, dtype, N above Triton's range);
    both norms run on the same kernels, and every kernel backend takes float32 parameters with a
    float16/bfloat16 x (mixed precision) as well as parameters of x's dtype."""
    return device_type(x), x.dtype, x.shape[-1] > TRITON_MAX_N


def choose_backend(x: Tensor, backend: Optional[str] = None, op: str = "layer_norm") -> str:
    """The backend that would run a LayerNorm- or RMSNorm-family call on ``x``."""
    return DISPATCH.choose(_key(x), backend)


def _forward(op, x, residual, weight, bias, eps, act, backend, norm=NORM_LAYER):
    """(y, h) of one LayerNorm- or RMSNorm-family call; h is None without a residual."""
    key = _check_args(op, x, residual, weight, bias, eps)
    if key[0] == "cuda":
        x, residual, weight, bias = cuda_autocast_fp32("cuda", (x, residual, weight, bias))
        key = _key(x)
    if residual is not None and residual.dtype is not x.dtype:  # h = x + residual promotes, as torch
        dtype = torch.promote_types(x.dtype, residual.dtype)  # float32 or float64: dtypes differ
        x, residual = x.to(dtype), residual.to(dtype)
        # Parameters of x's old dtype are promoted with it (as F.rms_norm's composition does).
        if weight is not None and weight.dtype is not dtype:
            weight = weight.to(dtype)
        if bias is not None and bias.dtype is not dtype:
            bias = bias.to(dtype)
        key = _key(x)
    tensors = (x, residual, weight, bias)
    name = DISPATCH.choose(key, backend)
    if name == "torch":
        return _torch_forward(x, residual, weight, bias, eps, act, norm)
    eps = float(eps)
    mode = eager_mode(tensors)
    if mode == EAGER:  # inference: no statistics needed
        y, h, _ = _FWD[name](x, residual, weight, bias, eps, act, norm, False)
        return y, h
    if mode == EAGER_GRAD:
        if residual is None:
            return _eager_norm_apply(x, weight, bias, (eps, act, norm, name)), None
        return _eager_add_norm_apply(x, residual, weight, bias, (eps, act, norm, name))
    if in_functorch_transform():
        y, h, _ = _FunctorchLayerNorm.apply(x, residual, weight, bias, eps, act, norm, name)
    else:  # torch.compile / torch.export / fake tensors / dispatch modes / subclasses
        y, h, _ = torch.ops.pydl.layer_norm_fwd(x, residual, weight, bias, eps, act, norm, name)
    return y, (h if residual is not None else None)


# ---- the torch backend: torch's own fused ops, torch's autograd ----------------------------------

def _torch_norm(x, weight, bias, eps, act, norm):
    if norm == NORM_RMS:
        y = F.rms_norm(x, (x.shape[-1],), weight, eps)
    else:
        y = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return y if act == ACT_NONE else F.gelu(y, approximate=_GELU_APPROXIMATE[act])


def _torch_forward(x, residual, weight, bias, eps, act, norm):
    h = x + residual if residual is not None else None
    return _torch_norm(h if h is not None else x, weight, bias, eps, act, norm), h


# ---- kernel backends: (..., N) tensors in, outputs of x's shape --------------------------------
#
# Forward: (y, h, stats) — y, h contiguous of x's shape (h None without residual); stats (2, M)
# float32 (float64 for float64 x): row 0 the mean, row 1 rstd = 1/sqrt(biased var + eps); None
# when ``with_stats`` is False (inference: a backend may then skip computing them).
# Backward: (dx, dweight, dbias) — dx contiguous of x's shape (dh included); dweight/dbias (N,)
# or None when not requested.

def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(t: Tensor, n: int) -> tuple:
    """(t', ld): t as rows of length n with unit last stride — t itself when contiguous, else an
    (M, N) view (a copy when torch cannot view it) — and the row stride ``ld``."""
    if t.is_contiguous():
        return t, n
    if t.stride(-1) != 1 and n != 1:
        return t.contiguous(), n
    t = t.reshape(-1, n)
    return t, (t.stride(0) if t.shape[0] > 1 else n)


def _matrix(t: Optional[Tensor], n: int) -> Optional[Tensor]:
    """t as an (M, N) view with unit last stride (a copy when torch cannot view it)."""
    if t is None:
        return None
    if t.stride(-1) != 1 and n != 1:
        t = t.contiguous()
    return t.reshape(-1, n)


def _empty_stats(x: Tensor, m: int) -> Tensor:
    """(2, M) uninitialized statistics for x's rows, on x's device whatever torch's default device
    is (torch.empty: ~2 us cheaper than x.new_empty)."""
    return torch.empty(2, m, dtype=_stats_dtype(x.dtype), device=x.device)


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _stats_ptrs(stats: Tensor) -> tuple:
    """Data pointers of (mean, rstd) = the rows of ``stats`` (2, M) (any row stride)."""
    if stats.stride(-1) != 1:
        stats = stats.contiguous()
    base = stats.data_ptr()
    return base, base + stats.stride(0) * stats.element_size()


def _empty_fwd(x, residual):
    """Zero-element calls (M == 0 or N == 0): empty outputs, as torch gives them; no kernel."""
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    h = x + residual if residual is not None else None
    return y, h, _empty_stats(x, m)


def _native_fwd(x, residual, weight, bias, eps, act, norm, with_stats=True):
    n, numel = x.shape[-1], x.numel()
    if numel == 0:
        return _empty_fwd(x, residual)
    if x.is_contiguous():
        x_ld, y = n, torch.empty_like(x)
    else:
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        x, x_ld = _rows(x, n)
    m = numel // n
    h, r_ld = None, n
    if residual is not None:
        residual, r_ld = _rows(residual, n)
        h = torch.empty_like(y)
    stats, mean_ptr, rstd_ptr = None, 0, 0
    if with_stats:
        stats = _empty_stats(x, m)
        mean_ptr, rstd_ptr = _stats_ptrs(stats)
    code = _native.DTYPE_CODES[x.dtype]
    weight, bias = _contiguous(weight), _contiguous(bias)
    p_code = _param_code(weight, bias, code)
    w_ptr = 0 if weight is None else weight.data_ptr()
    b_ptr = 0 if bias is None else bias.data_ptr()
    r_ptr = 0 if residual is None else residual.data_ptr()
    h_ptr = 0 if h is None else h.data_ptr()
    if x.is_cuda:
        with _native.cuda_device(x):
            _native.module().layer_norm_fwd_cuda(
                m, n, code, x.data_ptr(), x_ld, r_ptr, r_ld, p_code, w_ptr, b_ptr, y.data_ptr(), h_ptr,
                mean_ptr, rstd_ptr, eps, act, norm, _native.cuda_stream(x))
    else:
        _native.module().layer_norm_fwd_cpu(
            m, n, code, x.data_ptr(), x_ld, r_ptr, r_ld, p_code, w_ptr, b_ptr, y.data_ptr(), h_ptr,
            mean_ptr, rstd_ptr, eps, act, norm, torch.get_num_threads())
    return y, h, stats


def _native_bwd(dy, dh, x, weight, bias, stats, act, norm, need_dw, need_db):
    n = x.shape[-1]
    if x.numel() == 0:
        return _empty_bwd(dh, x, weight, bias, need_dw, need_db)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    x, x_ld = _rows(x, n)
    dy, dy_ld = _rows(dy, n)
    dh_ld = n
    if dh is not None:
        dh, dh_ld = _rows(dh, n)
    m = x.numel() // n
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_dw else None
    db = torch.empty_like(bias, memory_format=torch.contiguous_format) if need_db else None
    code = _native.DTYPE_CODES[x.dtype]
    weight, bias = _contiguous(weight), _contiguous(bias)
    args = (m, n, code, dy.data_ptr(), dy_ld, _ptr(dh), dh_ld, x.data_ptr(), x_ld,
            _param_code(weight, bias, code), _ptr(weight),
            _ptr(bias), *_stats_ptrs(stats), dx.data_ptr(), _ptr(dw), _ptr(db), act, norm)
    c = _native.module()
    if x.is_cuda:
        with _native.cuda_device(x):
            workspace, rows = None, 0
            if need_dw or need_db:
                rows = c.layer_norm_bwd_cuda_num_partials(m, n)
                workspace = x.new_empty((rows, 2 * n), dtype=torch.float32)
            c.layer_norm_bwd_cuda(*args, _ptr(workspace), rows, _native.cuda_stream(x))
    else:
        c.layer_norm_bwd_cpu(*args, _native.num_threads())
    return dx, dw, db


def _param_code(weight: Optional[Tensor], bias: Optional[Tensor], x_code: int) -> int:
    """The kernels' dtype code of the parameters (and their gradients): x's, or float32's (mixed
    precision); x's when there are none."""
    p = weight if weight is not None else bias
    return x_code if p is None else _native.DTYPE_CODES[p.dtype]


def _empty_bwd(dh, x, weight, bias, need_dw, need_db):
    n = x.shape[-1]
    dx = dh.clone(memory_format=torch.contiguous_format) if dh is not None else torch.empty_like(
        x, memory_format=torch.contiguous_format)
    # the sums over no rows, in the parameters' dtypes
    return (dx, x.new_zeros(n, dtype=weight.dtype) if need_dw else None,
            x.new_zeros(n, dtype=bias.dtype) if need_db else None)


def _triton_module():
    from ..triton import layer_norm as triton_layer_norm  # imports triton: only when chosen

    return triton_layer_norm


def _triton_fwd(x, residual, weight, bias, eps, act, norm, with_stats=True):
    n = x.shape[-1]
    if x.numel() == 0:
        return _empty_fwd(x, residual)
    shape = x.shape
    y, h, stats = _triton_module().layer_norm_fwd(
        _matrix(x, n), _matrix(residual, n), _contiguous(weight), _contiguous(bias), eps, act,
        rms=norm == NORM_RMS)
    return y.view(shape), (h.view(shape) if h is not None else None), stats


def _triton_bwd(dy, dh, x, weight, bias, stats, act, norm, need_dw, need_db):
    n = x.shape[-1]
    if x.numel() == 0:
        return _empty_bwd(dh, x, weight, bias, need_dw, need_db)
    stats = stats.contiguous()
    dx, dw, db = _triton_module().layer_norm_bwd(
        _matrix(dy, n), _matrix(dh, n), _matrix(x, n), _contiguous(weight), _contiguous(bias),
        stats[0], stats[1], act, need_dw, need_db, rms=norm == NORM_RMS)
    return dx.view(x.shape), dw, db


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or t.is_contiguous() else t.contiguous()


_FWD = {"native": _native_fwd, "triton": _triton_fwd}
_BWD = {"native": _native_bwd, "triton": _triton_bwd}


# ---- autograd, shared by the eager Functions, the functorch Function and the custom op ----------
#
# Saved: the normalized input (x, or h = x + residual: an output, so add_layer_norm never keeps
# x and residual alive), weight, bias and the row statistics; ``ctx.cfg`` = (eps, act, norm,
# backend), one attribute (each ctx attribute costs a model's forward time on every call).

def _save(ctx, normalized, weight, bias, stats, cfg) -> None:
    ctx.cfg = cfg
    ctx.save_for_backward(normalized, weight, bias, stats)


def _grads(ctx, dy, dh, need_w, need_b, bwd, differentiable: bool) -> tuple:
    """(dx, dweight, dbias) from the saved context; dx includes dh, the gradient of h = x + residual
    (None without a residual); ``bwd`` runs the kernel; dweight/dbias are None unless requested.

    differentiable: the caller asked for a backward graph (``create_graph=True``); it is then
    recomputed with the torch composition, so double backward is exact. (Inside torch.func
    transforms, which track higher orders themselves, the kernel always runs.)
    """
    normalized, weight, bias, stats = ctx.saved_tensors
    eps, act, norm, _ = ctx.cfg
    if dy is None:  # only h was used downstream: h = x + residual passes its gradient through
        return dh, None, None
    if differentiable:
        ref = lambda t, w, b: (_torch_norm(t, w, b, eps, act, norm),)  # noqa: E731
        dx, dw, db = differentiable_grads(ref, (normalized, weight, bias), (dy,))
        if dx is None:
            dx = torch.zeros_like(normalized)
        return (dx if dh is None else dx + dh), (dw if need_w else None), (db if need_b else None)
    return bwd(dy, dh, normalized, weight, bias, stats, act, norm, need_w, need_b)


def _residual_grads(ctx, dy, dh, bwd, differentiable: bool) -> tuple:
    """(dx, dresidual, dweight, dbias) of a Function whose first inputs are (x, residual, weight,
    bias); residual may be None (then dh is ignored)."""
    need_x, need_r, need_w, need_b = ctx.needs_input_grad[:4]
    has_residual = ctx.has_residual
    dx, dw, db = _grads(ctx, dy, dh if has_residual else None, need_w, need_b, bwd, differentiable)
    return (dx if need_x else None), (dx if need_r and has_residual else None), dw, db


class _EagerNorm(torch.autograd.Function):
    """The eager fast path with a gradient and no residual: kernels called directly, in a classic
    Function (its ``apply`` costs a fraction of a setup_context-style Function's) with one output
    and the call's constants in one tuple (apply's cost grows with every argument and output)."""

    @staticmethod
    def forward(ctx, x, weight, bias, cfg):
        eps, act, norm, backend = cfg
        y, _, stats = _FWD[backend](x, None, weight, bias, eps, act, norm)
        _save(ctx, x, weight, bias, stats, cfg)
        return y

    @staticmethod
    def backward(ctx, dy):
        _, need_w, need_b, _ = ctx.needs_input_grad
        return (*_grads(ctx, dy, None, need_w, need_b, _BWD[ctx.cfg[3]], torch.is_grad_enabled()), None)


class _EagerAddNorm(torch.autograd.Function):
    """The eager fast path with a gradient and a residual: outputs (y, h = x + residual)."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, cfg):
        eps, act, norm, backend = cfg
        y, h, stats = _FWD[backend](x, residual, weight, bias, eps, act, norm)
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not zeros
        ctx.has_residual = True
        _save(ctx, h, weight, bias, stats, cfg)
        return y, h

    @staticmethod
    def backward(ctx, dy, dh):
        return (*_residual_grads(ctx, dy, dh, _BWD[ctx.cfg[3]], torch.is_grad_enabled()), None)


_eager_norm_apply = eager_apply(_EagerNorm)
_eager_add_norm_apply = eager_apply(_EagerAddNorm)


class _FunctorchLayerNorm(torch.autograd.Function):
    """Inside torch.func transforms (grad, vjp, jacrev, vmap): the custom ops, whose vmap rules
    the generated vmap rule of this Function uses."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, residual, weight, bias, eps, act, norm, backend):
        return torch.ops.pydl.layer_norm_fwd(x, residual, weight, bias, eps, act, norm, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, dy, dh, _dstats):
        # No grad mode: the backward custom op is not differentiable, and under a grad
        # transform its autograd stub must not see grad-tracking inputs.
        with torch.no_grad():
            return (*_residual_grads(ctx, dy, dh, _bwd_op(ctx), False), None, None, None, None)


# ---- custom ops (the traced path) ----------------------------------------------------------------

@torch.library.custom_op("pydl::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                   bias: Optional[Tensor], eps: float, activation: int, norm: int,
                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(y, h, stats): y, h of x's shape (h is empty without residual); stats (2, M) mean, rstd."""
    y, h, stats = _kernel_table(_FWD, backend)(x, residual, _contiguous(weight), _contiguous(bias),
                                               eps, activation, norm)
    return y, (h if h is not None else x.new_empty(0)), stats


@layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps, activation, norm, backend):
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    h = torch.empty_like(y) if residual is not None else x.new_empty(0)
    return y, h, _empty_stats(x, m)


@torch.library.custom_op("pydl::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(dy: Tensor, dh: Optional[Tensor], x: Tensor, weight: Optional[Tensor],
                   bias: Optional[Tensor], stats: Tensor, activation: int, norm: int,
                   need_weight_grad: bool, need_bias_grad: bool,
                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias); dweight/dbias are empty when not requested. x is the normalized input."""
    dx, dw, db = _kernel_table(_BWD, backend)(dy, dh, x, _contiguous(weight), _contiguous(bias), stats,
                                              activation, norm, need_weight_grad, need_bias_grad)
    # Distinct empty tensors: custom op outputs must not alias each other.
    return dx, (dw if dw is not None else x.new_empty(0)), (db if db is not None else x.new_empty(0))


@layer_norm_bwd.register_fake
def _(dy, dh, x, weight, bias, stats, activation, norm, need_weight_grad, need_bias_grad, backend):
    n = x.shape[-1]
    dw = x.new_empty(n, dtype=weight.dtype) if need_weight_grad else x.new_empty(0)
    db = x.new_empty(n, dtype=bias.dtype) if need_bias_grad else x.new_empty(0)
    return torch.empty_like(x, memory_format=torch.contiguous_format), dw, db


def _kernel_table(table: dict, backend: str):
    fn = table.get(backend)
    if fn is None:
        raise ValueError(f"pydl::layer_norm: backend must be one of {', '.join(table)}, got {backend!r}")
    return fn


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, act, norm, backend = inputs
    _y, h, stats = output
    ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not zeros
    ctx.has_residual = residual is not None
    _save(ctx, h if ctx.has_residual else x, weight, bias, stats, (eps, act, norm, backend))


def _bwd_op(ctx):
    def bwd(dy, dh, x, weight, bias, stats, act, norm, need_w, need_b):
        dx, dw, db = torch.ops.pydl.layer_norm_bwd(dy, dh, x, weight, bias, stats, act, norm, need_w, need_b,
                                                   ctx.cfg[3])
        return dx, (dw if need_w else None), (db if need_b else None)
    return bwd


def _backward(ctx, dy, dh, _dstats):
    return (*_residual_grads(ctx, dy, dh, _bwd_op(ctx), torch.is_grad_enabled()), None, None, None, None)


layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.register_vmap("pydl::layer_norm_fwd")
def _(info, in_dims, x, residual, weight, bias, eps, activation, norm, backend):
    x_dim, r_dim, w_dim, b_dim = in_dims[:4]
    if w_dim is None and b_dim is None and x_dim is not None:
        # Row-wise op with shared parameters: the vmapped dim is one more leading dim.
        x = x.movedim(x_dim, 0)
        if residual is not None:
            residual = residual.movedim(r_dim, 0) if r_dim is not None else residual.expand_as(x)
        y, h, stats = layer_norm_fwd(x, residual, weight, bias, eps, activation, norm, backend)
        b = info.batch_size
        h = h if residual is not None else h.new_empty((b, 0))
        return (y, h, stats.view(2, b, -1)), (0, 0, 1)
    return vmap_by_loop(layer_norm_fwd, info, in_dims, x, residual, weight, bias, eps, activation,
                        norm, backend)


@torch.library.register_vmap("pydl::layer_norm_bwd")
def _(info, in_dims, *args):
    return vmap_by_loop(layer_norm_bwd, info, in_dims, *args)
