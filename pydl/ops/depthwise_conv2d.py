"""Depthwise 2-D convolution: ``depthwise_conv2d`` ≡ ``F.conv2d(..., groups=C)``.

    depthwise_conv2d(x, weight, bias, stride, padding, dilation)
        == F.conv2d(x, weight, bias, stride, padding, dilation, groups=x.shape[1])

x (N, C, H, W) (or unbatched (C, H, W)); weight (C*m, 1, KH, KW) with a channel multiplier m >= 1
(output channel o reads input channel o // m); bias (C*m,) or None; stride / dilation an int or a
pair; padding an int, a pair, "valid" or "same" (stride 1; even kernels padded like torch: the extra
row / column after). -> (N, C*m, Ho, Wo) in x's dtype and x's memory format.

Layouts: NCHW-contiguous and channels_last inputs are read in place; any other strides are copied
once (to channels_last when the channel stride is 1, else to NCHW). The output, and x's gradient,
come in the layout the kernel ran in.

Backends: ``native`` (csrc/cpu/depthwise_conv2d.cpp: float32, bfloat16, float64; csrc/cuda/
depthwise_conv2d_{fwd,bwd}.cu: float32, float16, bfloat16; kernels up to 31 x 31) and ``torch``
(F.conv2d itself: cuDNN / oneDNN, torch's autograd). Weight and bias gradients are reduced
deterministically on both native devices. Under autocast the op computes in the autocast dtype, as
F.conv2d does. Eager calls reach the kernels directly (a classic autograd.Function when a gradient is
needed); everything traced goes through the custom ops ``pydl::depthwise_conv2d_fwd`` / ``_bwd``.
Double backward recomputes through F.conv2d (exact).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _native, backends
from ._common import (EAGER, EAGER_GRAD, autocast_lower_precision, device_type, differentiable_grads, eager_apply,
                      eager_mode, in_functorch_transform, same_device, vmap_by_loop)
from ._conv_args import Padding, conv_geometry, conv_output_hw, symmetric_padding

MAX_KERNEL = 31  # csrc/include/pydl/depthwise_conv2d.h: kDepthwiseMaxKernel
NCHW, NHWC = 0, 1  # layout codes (pydl::Layout)
_FORMATS = (torch.contiguous_format, torch.channels_last)
_NATIVE_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
_NATIVE_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_OP = "depthwise_conv2d"


# ---- public API --------------------------------------------------------------------------------

def depthwise_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding: Padding = 0,
                     dilation=1, *, backend: Optional[str] = None) -> Tensor:
    """Depthwise convolution, as ``F.conv2d(x, weight, bias, stride, padding, dilation, groups=C)``.

    x (N, C, H, W) or (C, H, W); weight (C*m, 1, KH, KW); bias (C*m,) or None. Returns
    (N, C*m, Ho, Wo) in x's dtype and memory format. ``backend`` forces "native" or "torch".
    """
    if isinstance(x, Tensor):  # F.conv2d's autocast policy, before the dtype checks
        x, weight, bias = autocast_lower_precision(device_type(x), (x, weight, bias))
    g = _check_args(x, weight, bias, stride, padding, dilation)
    kh, kw = weight.shape[2], weight.shape[3]
    name = DISPATCH.choose((device_type(x), x.dtype, kh <= MAX_KERNEL and kw <= MAX_KERNEL), backend)
    if name == "torch":
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups=x.shape[-3])
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    mode = eager_mode((x, weight, bias))
    if mode == EAGER:
        y = _native_fwd(x, weight, bias, g)
    elif mode == EAGER_GRAD:
        y = _eager_depthwise_apply(x, weight, bias, g)
    elif in_functorch_transform():
        y = _FunctorchDepthwise.apply(x, weight, bias, list(g))
    else:
        y = torch.ops.pydl.depthwise_conv2d_fwd(x, weight, bias, list(g))
    return y.squeeze(0) if unbatched else y


def depthwise_conv2d_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding: Padding = 0,
                         dilation=1) -> Tensor:
    """The float64 reference: F.conv2d(..., groups=C) on float64 copies (torch's own composition)."""
    return F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), stride, padding, dilation,
                    groups=x.shape[-3])


def choose_backend(x: Tensor, weight: Tensor, backend: Optional[str] = None) -> str:
    """The backend that would run a ``depthwise_conv2d`` call on these tensors."""
    fits = weight.shape[2] <= MAX_KERNEL and weight.shape[3] <= MAX_KERNEL
    return DISPATCH.choose((device_type(x), x.dtype, fits), backend)


# ---- argument checks and backend choice ----------------------------------------------------------

def _check_args(x, weight, bias, stride, padding, dilation) -> tuple:
    """The geometry tuple (see _conv_args), after ValueError / TypeError naming the argument."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{_OP}: {name} must be a Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{_OP}: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if x.dim() not in (3, 4):
        raise ValueError(f"{_OP}: x must be (N, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
    C = x.shape[-3]
    if weight.dim() != 4 or weight.shape[1] != 1:
        raise ValueError(f"{_OP}: weight must have shape (C*m, 1, KH, KW), got {tuple(weight.shape)}")
    if C < 1 or weight.shape[0] < 1 or weight.shape[0] % C:
        raise ValueError(f"{_OP}: weight's output channels ({weight.shape[0]}) must be a positive multiple of x's "
                         f"channels ({C})")
    if weight.shape[2] < 1 or weight.shape[3] < 1:
        raise ValueError(f"{_OP}: weight's kernel must be at least 1 x 1, got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{_OP}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"{_OP}: x, weight and bias must have one dtype, got {x.dtype}, {weight.dtype}"
                        f"{'' if bias is None else ', ' + str(bias.dtype)}")
    if not same_device(weight, x) or (bias is not None and not same_device(bias, x)):
        raise ValueError(f"{_OP}: x, weight and bias must be on one device, got {x.device}, {weight.device}"
                         f"{'' if bias is None else ', ' + str(bias.device)}")
    g = conv_geometry(_OP, weight.shape[2:], stride, padding, dilation)
    conv_output_hw(_OP, x.shape[-2:], weight.shape[2:], g)
    return g


def _native_reasons(key: tuple) -> list:
    reasons = backends.native_reasons(key[0], key[1], _NATIVE_CPU_DTYPES, _NATIVE_CUDA_DTYPES)
    if not key[2]:
        reasons.append(f"the native kernels take kernels up to {MAX_KERNEL} x {MAX_KERNEL}")
    return reasons


# key: (device type, dtype, kernel <= 31 x 31). Native first (CPU measured: pydl.bench depthwise_conv2d;
# CUDA unmeasured on a GPU so far).
DISPATCH = backends.Dispatcher(_OP, {"native": _native_reasons, "torch": lambda key: []},
                               {"cpu": ("native", "torch"), "cuda": ("native", "torch")})


# ---- the native kernels --------------------------------------------------------------------------

def layout_of(x: Tensor) -> int:
    """The layout the kernels run x in: NHWC for channels_last tensors (not also NCHW-contiguous),
    NCHW for contiguous ones; other strides: NHWC when the channel stride is 1, else NCHW (copied)."""
    if x.is_contiguous():
        return NCHW
    if x.is_contiguous(memory_format=torch.channels_last) or x.stride(1) == 1:
        return NHWC
    return NCHW


def _dense(t: Tensor, layout: int) -> Tensor:
    fmt = _FORMATS[layout]
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


def _empty_image(x: Tensor, channels: int, H: int, W: int, layout: int) -> Tensor:
    return torch.empty((x.shape[0], channels, H, W), dtype=x.dtype, device=x.device, memory_format=_FORMATS[layout])


def _geometry_args(x, weight, g, Ho, Wo, layout) -> tuple:
    N, C, H, W = x.shape
    Cout, _, KH, KW = weight.shape
    sh, sw, pt, _, pl, _, dh, dw = g
    return (N, C, H, W, Cout, KH, KW, Ho, Wo, sh, sw, pt, pl, dh, dw, layout, _native.DTYPE_CODES[x.dtype])


def _native_fwd(x, weight, bias, g) -> Tensor:
    """y (N, C*m, Ho, Wo) in x's layout, from the native kernel."""
    layout = layout_of(x)
    x = _dense(x, layout)
    Ho, Wo = conv_output_hw(_OP, x.shape[2:], weight.shape[2:], g)
    y = _empty_image(x, weight.shape[0], Ho, Wo, layout)
    if y.numel() == 0:
        return y
    w = weight.contiguous()
    b = None if bias is None else bias.contiguous()
    args = _geometry_args(x, w, g, Ho, Wo, layout) + (x.data_ptr(), w.data_ptr(), 0 if b is None else b.data_ptr(),
                                                      y.data_ptr())
    c = _native.module()
    if x.is_cuda:
        with _native.cuda_device(x):
            c.depthwise_conv2d_fwd_cuda(*args, _native.cuda_stream(x))
    else:
        c.depthwise_conv2d_fwd_cpu(*args, _native.num_threads())
    return y


def _native_bwd(dy, x, weight, g, need) -> tuple:
    """(dx, dweight, dbias) for need = (dx?, dweight?, dbias?), None where not needed."""
    layout = layout_of(x)
    x = _dense(x, layout)
    dy = _dense(dy, layout)
    N, C, H, W = x.shape
    Cout = weight.shape[0]
    dx = torch.empty_like(x, memory_format=_FORMATS[layout]) if need[0] else None
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need[1] else None
    db = weight.new_empty((Cout,)) if need[2] else None
    if dy.numel() == 0:  # N == 0: nothing flows back
        return tuple(None if t is None else t.zero_() for t in (dx, dw, db))
    if not any(need):
        return dx, dw, db
    w = weight.contiguous()
    ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    args = _geometry_args(x, w, g, dy.shape[2], dy.shape[3], layout) + (
        dy.data_ptr(), x.data_ptr(), w.data_ptr(), ptr(dx), ptr(dw), ptr(db))
    c = _native.module()
    if x.is_cuda:
        with _native.cuda_device(x):
            n = c.depthwise_conv2d_bwd_cuda_workspace_floats(*args)
            workspace = x.new_empty(n, dtype=torch.float32) if n else None
            c.depthwise_conv2d_bwd_cuda(*args, ptr(workspace), _native.cuda_stream(x))
    else:
        c.depthwise_conv2d_bwd_cpu(*args, _native.num_threads())
    return dx, dw, db


def _composition(x, weight, bias, g) -> Tensor:
    """The op as torch ops on the geometry tuple (asymmetric padding: F.pad first)."""
    sh, sw, pt, pb, pl, pr, dh, dw = g
    pad = symmetric_padding(g)
    if pad is None:
        x, pad = F.pad(x, (pl, pr, pt, pb)), (0, 0)
    return F.conv2d(x, weight, bias, (sh, sw), pad, (dh, dw), groups=x.shape[1])


def _grads(ctx, dy, bwd, differentiable: bool) -> tuple:
    x, weight, bias = ctx.saved_tensors
    g = ctx.geometry
    if dy is None:
        return None, None, None, None
    need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
    if differentiable:
        dx, dw, db = differentiable_grads(lambda x_, w_, b_: (_composition(x_, w_, b_, g),), (x, weight, bias), (dy,))
    else:
        dx, dw, db = bwd(dy, x, weight, g, need)
    return dx, dw, db, None


def _save(ctx, inputs) -> None:
    x, weight, bias, g = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, bias)
    ctx.geometry = tuple(g)


class _EagerDepthwise(torch.autograd.Function):
    """The eager fast path with a gradient: kernels called directly (a classic Function)."""

    @staticmethod
    def forward(ctx, x, weight, bias, g):
        _save(ctx, (x, weight, bias, g))
        return _native_fwd(x, weight, bias, g)

    @staticmethod
    def backward(ctx, dy):
        return _grads(ctx, dy, _native_bwd, torch.is_grad_enabled())


_eager_depthwise_apply = eager_apply(_EagerDepthwise)


class _FunctorchDepthwise(torch.autograd.Function):
    """Inside torch.func transforms: the custom ops, whose vmap rules the generated rule uses."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, g):
        return torch.ops.pydl.depthwise_conv2d_fwd(x, weight, bias, g)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, inputs)

    @staticmethod
    def backward(ctx, dy):
        with torch.no_grad():
            return _grads(ctx, dy, _bwd_op, False)


def _bwd_op(dy, x, weight, g, need):
    dx, dw, db = torch.ops.pydl.depthwise_conv2d_bwd(dy, x, weight, list(g), list(need))
    return (dx if need[0] else None, dw if need[1] else None, db if need[2] else None)


@torch.library.custom_op("pydl::depthwise_conv2d_fwd", mutates_args=())
def depthwise_conv2d_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], g: list[int]) -> Tensor:
    """y of the native kernels; g = (sh, sw, pad_top, pad_bottom, pad_left, pad_right, dh, dw)."""
    return _native_fwd(x, weight, bias, tuple(g))


@depthwise_conv2d_fwd.register_fake
def _(x, weight, bias, g):
    Ho, Wo = conv_output_hw(_OP, x.shape[2:], weight.shape[2:], tuple(g))
    return _empty_image(x, weight.shape[0], Ho, Wo, layout_of(x))


@torch.library.custom_op("pydl::depthwise_conv2d_bwd", mutates_args=())
def depthwise_conv2d_bwd(dy: Tensor, x: Tensor, weight: Tensor, g: list[int],
                         need: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias); an output not in ``need`` comes back empty."""
    dx, dw, db = _native_bwd(dy, x, weight, tuple(g), tuple(need))
    return tuple(x.new_empty(0) if t is None else t for t in (dx, dw, db))  # distinct empties: no aliasing


@depthwise_conv2d_bwd.register_fake
def _(dy, x, weight, g, need):
    return (torch.empty_like(x, memory_format=_FORMATS[layout_of(x)]) if need[0] else x.new_empty(0),
            torch.empty_like(weight, memory_format=torch.contiguous_format) if need[1] else x.new_empty(0),
            weight.new_empty((weight.shape[0],)) if need[2] else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    _save(ctx, inputs)


def _backward(ctx, dy):
    return _grads(ctx, dy, _bwd_op, torch.is_grad_enabled())


depthwise_conv2d_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.register_vmap("pydl::depthwise_conv2d_fwd")
def _(info, in_dims, *args):
    return vmap_by_loop(depthwise_conv2d_fwd, info, in_dims, *args)


@torch.library.register_vmap("pydl::depthwise_conv2d_bwd")
def _(info, in_dims, *args):
    return vmap_by_loop(depthwise_conv2d_bwd, info, in_dims, *args)
