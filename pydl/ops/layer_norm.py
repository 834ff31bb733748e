"""Fused LayerNorm family: ``layer_norm``, ``layer_norm_gelu`` and ``add_layer_norm``.

All three normalize over the last dim of ``x`` (size N, 1..65536 on the native/Triton kernels,
any size on the torch backend), with PyTorch's semantics:

    layer_norm(x, w, b, eps)              == F.layer_norm(x, (N,), w, b, eps)
    layer_norm_gelu(x, w, b, eps, approx) == F.gelu(F.layer_norm(x, (N,), w, b, eps), approximate=approx)
    add_layer_norm(x, r, w, b, eps, act)  == (act(F.layer_norm(x + r, (N,), w, b, eps)), x + r)

They share two custom ops, ``pydl::layer_norm_fwd`` and ``pydl::layer_norm_bwd`` (registered with
fake implementations and autograd, so they work under torch.compile(fullgraph=True)), and three
backends: ``native`` (csrc/cpu, csrc/cuda), ``triton`` (pydl/triton/layer_norm.py) and ``torch``
(the composition below). Every backend sees 2-D ``(M, N)`` row views with unit last stride.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _native, backends

# Activation codes shared with the kernels (csrc/include/pydl/layer_norm.h, pydl/triton).
ACT_NONE, ACT_GELU, ACT_GELU_TANH = 0, 1, 2
_ACTIVATION_CODES = {None: ACT_NONE, "gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH}
_APPROXIMATE_CODES = {"none": ACT_GELU, "tanh": ACT_GELU_TANH}
MAX_KERNEL_N = 65536

_NATIVE_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
_NATIVE_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Unmeasured on a GPU so far: native first because its backward reduction was designed for
# small N; revisit with benchmarks/results (docs/architecture.md, "Backend priorities").
_PRIORITY = {"cpu": ("native", "torch"), "cuda": ("native", "triton", "torch")}


# ---- public API ------------------------------------------------------------------------------

def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, *, backend: Optional[str] = None) -> Tensor:
    """LayerNorm over the last dim.

    x: (..., N) floating tensor; weight, bias: (N,) of x's dtype and device, or None.
    Returns y: x's shape and dtype. ``backend`` forces "native", "triton" or "torch".
    """
    y, _ = _apply("layer_norm", x, None, weight, bias, eps, ACT_NONE, backend)
    return y


def layer_norm_gelu(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                    eps: float = 1e-5, approximate: str = "none", *,
                    backend: Optional[str] = None) -> Tensor:
    """GELU(LayerNorm(x)) in one pass; ``approximate`` is "none" (erf) or "tanh", as in F.gelu.

    x: (..., N); weight, bias: (N,) or None. Returns y of x's shape and dtype.
    """
    if approximate not in _APPROXIMATE_CODES:
        raise ValueError(f"layer_norm_gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    y, _ = _apply("layer_norm_gelu", x, None, weight, bias, eps, _APPROXIMATE_CODES[approximate], backend)
    return y


def add_layer_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, eps: float = 1e-5, activation: Optional[str] = None,
                   *, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """The pre-LN residual stream step: h = x + residual; y = activation(LayerNorm(h)).

    x, residual: (..., N) of one dtype and device; weight, bias: (N,) or None;
    activation: None, "gelu" or "gelu_tanh". Returns (y, h), both of x's shape and dtype
    (h is rounded to x's dtype before it is normalized, exactly like the unfused torch code).
    """
    if activation not in _ACTIVATION_CODES:
        raise ValueError(f"add_layer_norm: activation must be None, 'gelu' or 'gelu_tanh', got {activation!r}")
    if not isinstance(residual, Tensor):
        raise TypeError(f"add_layer_norm: residual must be a Tensor, got {type(residual).__name__}")
    return _apply("add_layer_norm", x, residual, weight, bias, eps, _ACTIVATION_CODES[activation], backend)


def layer_norm_ref(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   eps: float = 1e-5, activation: Optional[str] = None) -> Tensor:
    """float64 reference of layer_norm / layer_norm_gelu (activation None, "gelu", "gelu_tanh")."""
    n = x.shape[-1]
    up = lambda t: None if t is None else t.double()  # noqa: E731
    y = F.layer_norm(x.double(), (n,), up(weight), up(bias), eps)
    if activation is not None:
        y = F.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")
    return y


def add_layer_norm_ref(x: Tensor, residual: Tensor, weight: Optional[Tensor] = None,
                       bias: Optional[Tensor] = None, eps: float = 1e-5,
                       activation: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """float64 reference of add_layer_norm: (y, h) with h = x + residual."""
    h = x.double() + residual.double()
    return layer_norm_ref(h, weight, bias, eps, activation), h


# ---- argument checks and backend choice --------------------------------------------------------

def _check_args(op: str, x, residual, weight, bias, eps) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have a non-empty last dim to normalize, got shape {tuple(x.shape)}")
    n = x.shape[-1]
    others = (("residual", residual, tuple(x.shape)), ("weight", weight, (n,)), ("bias", bias, (n,)))
    for name, t, shape in others:
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {shape}, got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} dtype {t.dtype} must match x dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{op}: eps must be a float, got {type(eps).__name__}")
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps}")


def _native_reasons(x: Tensor) -> list:
    reasons = backends.native_reasons([x], _NATIVE_CPU_DTYPES, _NATIVE_CUDA_DTYPES)
    if x.shape[-1] > MAX_KERNEL_N:
        reasons.append(f"normalized size {x.shape[-1]} > {MAX_KERNEL_N}")
    return reasons


def _triton_reasons(x: Tensor) -> list:
    reasons = backends.triton_reasons([x], _TRITON_DTYPES)
    if x.shape[-1] > MAX_KERNEL_N:
        reasons.append(f"normalized size {x.shape[-1]} > {MAX_KERNEL_N}")
    return reasons


_CANDIDATES = {"native": _native_reasons, "triton": _triton_reasons, "torch": lambda x: []}


def choose_backend(x: Tensor, backend: Optional[str] = None, op: str = "layer_norm") -> str:
    """The backend that would run a LayerNorm-family call on ``x``."""
    priority = _PRIORITY.get(x.device.type, ("torch",))
    return backends.choose(op, _CANDIDATES, priority, backend, x)


def _apply(op, x, residual, weight, bias, eps, act, backend):
    _check_args(op, x, residual, weight, bias, eps)
    name = choose_backend(x, backend, op)
    y, h, _, _ = torch.ops.pydl.layer_norm_fwd(x, residual, weight, bias, float(eps), act, name)
    return y, (h if residual is not None else None)


def _rows(t: Optional[Tensor]) -> Optional[Tensor]:
    """(…, N) -> (M, N) with unit last stride; a view whenever torch can make one."""
    if t is None:
        return None
    if t.numel() == 0:  # .contiguous() keeps an empty tensor's odd strides
        return t.new_empty((0, t.shape[-1]))
    if t.stride(-1) != 1 and t.shape[-1] != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


def _vector(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- backends: each takes (M, N) row views ------------------------------------------------------

def _native_fwd(x, residual, weight, bias, eps, act):
    c = _native.module()
    m, n = x.shape
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    h = torch.empty_like(y) if residual is not None else None
    mean = torch.empty(m, dtype=_stats_dtype(x.dtype), device=x.device)
    rstd = torch.empty_like(mean)
    v, ov = _native.view, _native.opt_view
    views = (v(x), ov(residual), ov(weight), ov(bias), v(y), ov(h), v(mean), v(rstd), eps, act)
    if x.is_cuda:
        with torch.cuda.device(x.device):
            c.layer_norm_fwd_cuda(*views, _native.cuda_stream(x.device))
    else:
        c.layer_norm_fwd_cpu(*views, _native.num_threads())
    return y, h, mean, rstd


def _native_bwd(dy, dh, x, weight, bias, mean, rstd, act, need_dw, need_db):
    c = _native.module()
    m, n = x.shape
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    dw = torch.empty(n, dtype=x.dtype, device=x.device) if need_dw else None
    db = torch.empty(n, dtype=x.dtype, device=x.device) if need_db else None
    v, ov = _native.view, _native.opt_view
    views = (v(dy), ov(dh), v(x), ov(weight), ov(bias), v(mean), v(rstd), v(dx), ov(dw), ov(db))
    if x.is_cuda:
        with torch.cuda.device(x.device):
            workspace = None
            if need_dw or need_db:
                rows = c.layer_norm_bwd_cuda_num_partials(m, n)
                workspace = torch.empty((rows, 2 * n), dtype=torch.float32, device=x.device)
            c.layer_norm_bwd_cuda(*views, ov(workspace), act, _native.cuda_stream(x.device))
    else:
        c.layer_norm_bwd_cpu(*views, act, _native.num_threads())
    return dx, dw, db


def _activation(z: Tensor, act: int) -> Tensor:
    if act == ACT_NONE:
        return z
    return F.gelu(z, approximate="tanh" if act == ACT_GELU_TANH else "none")


_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
_GELU_TANH_COEF = 0.044715


def _activation_grad(z: Tensor, act: int) -> Tensor:
    """d act(z) / dz, exact for both GELU forms (as torch's gelu backward)."""
    if act == ACT_GELU:
        return 0.5 * (1 + torch.erf(z * _SQRT_HALF)) + z * _INV_SQRT_2PI * torch.exp(-0.5 * z * z)
    t = torch.tanh(_SQRT_2_OVER_PI * (z + _GELU_TANH_COEF * z ** 3))
    du = _SQRT_2_OVER_PI * (1 + 3 * _GELU_TANH_COEF * z * z)
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * du


def _torch_fwd(x, residual, weight, bias, eps, act):
    h = x + residual if residual is not None else None
    src = (h if h is not None else x).to(_stats_dtype(x.dtype))
    mean = src.mean(-1)
    centered = src - mean[:, None]
    rstd = torch.rsqrt(centered.square().mean(-1) + eps)
    z = centered * rstd[:, None]
    if weight is not None:
        z = z * weight
    if bias is not None:
        z = z + bias
    return _activation(z, act).to(x.dtype), h, mean, rstd


def _torch_bwd(dy, dh, x, weight, bias, mean, rstd, act, need_dw, need_db):
    acc = _stats_dtype(x.dtype)
    xhat = (x.to(acc) - mean[:, None]) * rstd[:, None]
    g = dy.to(acc)
    if act != ACT_NONE:
        z = xhat * (weight if weight is not None else 1) + (bias if bias is not None else 0)
        g = g * _activation_grad(z, act)
    dxhat = g * weight if weight is not None else g
    c1 = dxhat.mean(-1, keepdim=True)
    c2 = (dxhat * xhat).mean(-1, keepdim=True)
    dx = rstd[:, None] * (dxhat - c1 - xhat * c2)
    if dh is not None:
        dx = dx + dh
    dw = (g * xhat).sum(0).to(x.dtype) if need_dw else None
    db = g.sum(0).to(x.dtype) if need_db else None
    return dx.to(x.dtype), dw, db


def _triton_impl():
    from ..triton import layer_norm as triton_layer_norm  # imports triton: only when chosen

    return triton_layer_norm


_FWD = {"native": _native_fwd, "torch": _torch_fwd, "triton": lambda *a: _triton_impl().layer_norm_fwd(*a)}
_BWD = {"native": _native_bwd, "torch": _torch_bwd, "triton": lambda *a: _triton_impl().layer_norm_bwd(*a)}


# ---- custom ops ------------------------------------------------------------------------------

@torch.library.custom_op("pydl::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                   bias: Optional[Tensor], eps: float, activation: int,
                   backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, h, mean, rstd): y, h of x's shape (h is empty without residual); mean, rstd (M,)."""
    y, h, mean, rstd = _FWD[backend](_rows(x), _rows(residual), _vector(weight), _vector(bias), eps,
                                     activation)
    h = h.view(x.shape) if h is not None else x.new_empty(0)
    return y.view(x.shape), h, mean, rstd


@layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps, activation, backend):
    m = x.numel() // x.shape[-1]
    stats = x.new_empty(m, dtype=_stats_dtype(x.dtype))
    h = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else x.new_empty(0)
    return torch.empty_like(x, memory_format=torch.contiguous_format), h, stats, torch.empty_like(stats)


@torch.library.custom_op("pydl::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(dy: Tensor, dh: Optional[Tensor], x: Tensor, weight: Optional[Tensor],
                   bias: Optional[Tensor], mean: Tensor, rstd: Tensor, activation: int,
                   need_weight_grad: bool, need_bias_grad: bool,
                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias); dweight/dbias are empty when not requested. x is the normalized input."""
    dx, dw, db = _BWD[backend](_rows(dy), _rows(dh), _rows(x), _vector(weight), _vector(bias), mean,
                               rstd, activation, need_weight_grad, need_bias_grad)
    # Distinct empty tensors: custom op outputs must not alias each other.
    return dx.view(x.shape), (dw if dw is not None else x.new_empty(0)), (db if db is not None else x.new_empty(0))


@layer_norm_bwd.register_fake
def _(dy, dh, x, weight, bias, mean, rstd, activation, need_weight_grad, need_bias_grad, backend):
    n = x.shape[-1]
    dw = x.new_empty(n) if need_weight_grad else x.new_empty(0)
    db = x.new_empty(n) if need_bias_grad else x.new_empty(0)
    return torch.empty_like(x, memory_format=torch.contiguous_format), dw, db


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, _eps, activation, backend = inputs
    _y, h, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.activation = activation
    ctx.backend = backend
    ctx.save_for_backward(h if ctx.has_residual else x, weight, bias, mean, rstd)


def _backward(ctx, dy, dh, _dmean, _drstd):
    normalized, weight, bias, mean, rstd = ctx.saved_tensors
    need_x, need_res, need_w, need_b = ctx.needs_input_grad[:4]
    if dy is None:  # only h was used downstream
        dy = torch.zeros_like(normalized)
    if not ctx.has_residual:
        dh = None
    dx, dw, db = torch.ops.pydl.layer_norm_bwd(
        dy, dh, normalized, weight, bias, mean, rstd, ctx.activation,
        bool(need_w and weight is not None), bool(need_b and bias is not None), ctx.backend)
    return (dx if need_x else None, dx if (need_res and ctx.has_residual) else None,
            dw if need_w and weight is not None else None, db if need_b and bias is not None else None,
            None, None, None)


layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)
