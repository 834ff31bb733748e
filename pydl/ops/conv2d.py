"""Dense 2-D convolution: ``conv2d`` ≡ ``F.conv2d``.

    conv2d(x, weight, bias, stride, padding, dilation, groups) == F.conv2d(x, weight, bias, stride, padding, dilation, groups)

x (N, C, H, W) or unbatched (C, H, W), weight (Cout, C / groups, KH, KW), bias (Cout,) or None;
stride / dilation an int or a pair; padding an int, a pair, "valid" or "same" (stride 1; even
kernels pad one more after than before, as torch). The output is in x's memory format
(channels_last in, channels_last out), as F.conv2d gives it.

Depthwise calls (groups == C > 1, weight (C·m, 1, KH, KW)) are routed to
``pydl.ops.depthwise_conv2d``, the op made for them (a GEMM with K = KH·KW is the wrong shape).

Backends: ``triton`` (pydl/triton/conv2d.py: implicit-GEMM forward, data gradient gathered over
the valid taps of each stride phase, deterministic split-K weight gradient, a plain GEMM for
1×1 stride-1 convolutions; NCHW inputs are converted to channels_last once, since the kernels
read channels contiguously) on CUDA, or on CPU under the Triton interpreter when forced;
``torch`` (F.conv2d: cuDNN on CUDA, oneDNN/native on CPU) everywhere else — float64, CPU (no
native CPU kernel: it would have to beat oneDNN), more than 2^31 output positions.
On CUDA torch (cuDNN) comes first until the harness (``python -m pydl.bench conv2d``) shows the
Triton kernels ahead on a GPU: published Triton convolutions trail cuDNN, and the priorities
are set from measurements (DESIGN §3). ``backend="triton"`` selects the kernels.

float32 on the triton backend runs IEEE fp32 dots unless ``torch.backends.cudnn.allow_tf32``
is set (torch's default: True) — the flag F.conv2d itself obeys, so both backends round alike.
The gradients of the triton backend: dx and dW by the kernels (dW bitwise reproducible),
dbias = dy summed by torch; double backward differentiates the torch composition.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends
from ._common import (EAGER, EAGER_GRAD, autocast_lower_precision, device_type, differentiable_grads, eager_apply,
                      eager_mode, in_functorch_transform, same_device, vmap_by_loop)
from ._conv_args import conv_geometry, conv_output_hw

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_POSITIONS = 2 ** 31 - 1


# ---- public API ------------------------------------------------------------------------------

def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0, dilation=1,
           groups: int = 1, *, backend: Optional[str] = None) -> Tensor:
    """2-D convolution, as ``F.conv2d`` (same arguments, output in x's memory format).

    ``backend`` forces "triton" or "torch" (a depthwise call goes to ``depthwise_conv2d`` with it).
    """
    if isinstance(x, Tensor):
        x, weight, bias = autocast_lower_precision(device_type(x), (x, weight, bias))
    geometry = _check_args(x, weight, bias, stride, padding, dilation, groups)
    if _is_depthwise(x, weight, groups):
        routed = _depthwise(backend)
        if routed is not None:
            return routed(x, weight, bias, stride, padding, dilation, backend=backend)
    name = DISPATCH.choose(_key(x, weight, geometry), backend)
    if name == "torch":
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if x.dim() == 3:
        return run(x.unsqueeze(0), weight, bias, geometry, groups).squeeze(0)
    return run(x, weight, bias, geometry, groups)


def conv2d_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0, dilation=1,
               groups: int = 1) -> Tensor:
    """The float64 reference: F.conv2d on float64 copies of the inputs. Returns float64."""
    return F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), stride, padding,
                    dilation, groups)


def choose_backend(x: Tensor, weight: Tensor, stride=1, padding=0, dilation=1, groups: int = 1,
                   backend: Optional[str] = None) -> str:
    """The backend that would run a non-depthwise ``conv2d`` call on these tensors."""
    geometry = _check_args(x, weight, None, stride, padding, dilation, groups)
    return DISPATCH.choose(_key(x, weight, geometry), backend)


# ---- argument checks and backend choice --------------------------------------------------------

def _check_args(x, weight, bias, stride, padding, dilation, groups) -> tuple:
    """F.conv2d's argument rules as ValueError / TypeError naming the argument; the geometry tuple."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"conv2d: {name} must be a Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"conv2d: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if x.dim() not in (3, 4):
        raise ValueError(f"conv2d: x must be (N, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"conv2d: weight must be (C_out, C_in / groups, KH, KW), got shape {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"conv2d: x and weight must have one dtype, got {x.dtype} and {weight.dtype}")
    if not same_device(weight, x):
        raise ValueError(f"conv2d: x is on {x.device} but weight is on {weight.device}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"conv2d: groups must be a positive int, got {groups!r}")
    cout, cin_g = weight.shape[0], weight.shape[1]
    c = x.shape[-3]
    if cout % groups:
        raise ValueError(f"conv2d: weight's C_out ({cout}) must be divisible by groups ({groups})")
    if c != cin_g * groups:
        raise ValueError(f"conv2d: x has {c} channels but weight (shape {tuple(weight.shape)}) with groups={groups} "
                         f"expects {cin_g * groups} (weight.shape[1] * groups)")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"conv2d: bias must be a Tensor or None, got {type(bias).__name__}")
        if bias.dtype != x.dtype:
            raise TypeError(f"conv2d: bias must have x's dtype ({x.dtype}), got {bias.dtype}")
        if bias.shape != (cout,):
            raise ValueError(f"conv2d: bias must have shape ({cout},) (weight's C_out), got {tuple(bias.shape)}")
        if not same_device(bias, x):
            raise ValueError(f"conv2d: x is on {x.device} but bias is on {bias.device}")
    kernel_hw = tuple(weight.shape[2:])
    geometry = conv_geometry("conv2d", kernel_hw, stride, padding, dilation)
    conv_output_hw("conv2d", tuple(x.shape[-2:]), kernel_hw, geometry)
    return geometry


def _is_depthwise(x, weight, groups) -> bool:
    return groups > 1 and groups == x.shape[-3] and weight.shape[1] == 1


_DEPTHWISE = None  # the pydl.ops.depthwise_conv2d module, once imported


def _depthwise(backend: Optional[str]):
    """pydl.ops.depthwise_conv2d when it exists and implements ``backend`` (else None: the dense
    path runs the call — its kernels compute it correctly, just not at depthwise speed)."""
    global _DEPTHWISE
    mod = _DEPTHWISE
    if mod is None:
        try:  # the module itself (pydl.ops.depthwise_conv2d, the attribute, is the function)
            mod = _DEPTHWISE = importlib.import_module("pydl.ops.depthwise_conv2d")
        except ImportError:
            return None
    forced = backend if backend is not None else backends.env_backend()
    dispatch = getattr(mod, "DISPATCH", None)
    if forced is not None and dispatch is not None and forced not in dispatch.candidates:
        return None
    return mod.depthwise_conv2d


def _key(x, weight, geometry) -> tuple:
    """(device type, dtype, why the kernels cannot take this call's shape or None)."""
    n = x.shape[0] if x.dim() == 4 else 1
    ho, wo = conv_output_hw("conv2d", tuple(x.shape[-2:]), tuple(weight.shape[2:]), geometry)
    issue = None
    if max(n * ho * wo, n * x.shape[-2] * x.shape[-1]) > MAX_POSITIONS:
        issue = "more than 2^31 - 1 positions (N·H·W)"
    return device_type(x), x.dtype, issue


def _triton_reasons(key: tuple) -> list:
    reasons = backends.triton_reasons(key[0], key[1], _TRITON_DTYPES)
    return reasons + ([key[2]] if key[2] else [])


DISPATCH = backends.Dispatcher("conv2d", {"triton": _triton_reasons, "torch": lambda key: []},
                               {"cpu": ("torch",), "cuda": ("torch", "triton")})


# ---- running the kernels: eager fast path, functorch, custom ops --------------------------------

def channels_last(x: Tensor) -> bool:
    """Whether x's memory format is channels_last (as torch suggests it: a tensor contiguous in
    both formats counts as contiguous)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def run(x, weight, bias, geometry, groups) -> Tensor:
    """y of the triton backend for checked 4-D arguments."""
    tf32 = bool(x.dtype == torch.float32 and x.is_cuda and torch.backends.cudnn.allow_tf32)
    args = (x, weight, bias, list(geometry), int(groups), tf32)
    mode = eager_mode((x, weight, bias))
    if mode == EAGER:
        return _triton_fwd(*args)
    if mode == EAGER_GRAD:
        return _eager_conv2d_apply(*args)
    if in_functorch_transform():
        return _FunctorchConv2d.apply(*args)
    return torch.ops.pydl.conv2d_fwd(*args)


def _kernels():
    from ..triton import conv2d as kernels  # imports triton: only when the backend runs

    return kernels


def _triton_fwd(x, weight, bias, geometry, groups, tf32):
    k = _kernels()
    return k.conv2d_fwd(k.problem(x.shape, weight.shape, geometry, groups, tf32), x, weight, bias, channels_last(x))


def _triton_dx(dy, x, weight, geometry, groups, tf32):
    k = _kernels()
    return k.conv2d_dx(k.problem(x.shape, weight.shape, geometry, groups, tf32), dy, weight, channels_last(x))


def _triton_dw(dy, x, weight, geometry, groups, tf32):
    k = _kernels()
    return k.conv2d_dw(k.problem(x.shape, weight.shape, geometry, groups, tf32), dy, x, weight)


def composition(x, weight, bias, geometry, groups) -> Tensor:
    """The kernels' function in torch ops (double backward): F.conv2d on x padded explicitly."""
    sh, sw, pt, pb, pl, pr, dh, dw = geometry
    if pt == pb and pl == pr:
        return F.conv2d(x, weight, bias, (sh, sw), (pt, pl), (dh, dw), groups)
    return F.conv2d(F.pad(x, (pl, pr, pt, pb)), weight, bias, (sh, sw), 0, (dh, dw), groups)


def _save(ctx, inputs, output) -> None:
    x, weight, bias, geometry, groups, tf32 = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, bias)
    ctx.meta = (tuple(geometry), groups, tf32)


def _grads(ctx, dy, dx_fn, dw_fn, differentiable: bool) -> tuple:
    """(dx, dweight, dbias) + Nones for the non-tensor inputs."""
    x, weight, bias = ctx.saved_tensors
    geometry, groups, tf32 = ctx.meta
    none = (None, None, None)
    if dy is None:
        return (None, None, None) + none
    if differentiable:
        fn = lambda x_, w_, b_: (composition(x_, w_, b_, geometry, groups),)  # noqa: E731
        return tuple(differentiable_grads(fn, (x, weight, bias), (dy,))) + none
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx = dx_fn(dy, x, weight, list(geometry), groups, tf32) if need_x else None
    dw = dw_fn(dy, x, weight, list(geometry), groups, tf32) if need_w else None
    db = dy.sum((0, 2, 3), dtype=torch.float32).to(bias.dtype) if need_b and bias is not None else None
    return (dx, dw, db) + none


class _EagerConv2d(torch.autograd.Function):
    """The eager fast path with a gradient: kernels called directly (a classic Function)."""

    @staticmethod
    def forward(ctx, *args):
        y = _triton_fwd(*args)
        _save(ctx, args, y)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _grads(ctx, dy, _triton_dx, _triton_dw, torch.is_grad_enabled())


_eager_conv2d_apply = eager_apply(_EagerConv2d)


class _FunctorchConv2d(torch.autograd.Function):
    """Inside torch.func transforms: the custom ops, whose vmap rules the generated rule uses."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        return torch.ops.pydl.conv2d_fwd(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, inputs, output)

    @staticmethod
    def backward(ctx, dy):
        with torch.no_grad():
            return _grads(ctx, dy, torch.ops.pydl.conv2d_bwd_data, torch.ops.pydl.conv2d_bwd_weight, False)


def _out_shape(x: Tensor, weight: Tensor, geometry) -> tuple:
    sh, sw, pt, pb, pl, pr, dh, dw = geometry
    kh, kw = weight.shape[2], weight.shape[3]
    return (x.shape[0], weight.shape[0], (x.shape[2] + pt + pb - dh * (kh - 1) - 1) // sh + 1,
            (x.shape[3] + pl + pr - dw * (kw - 1) - 1) // sw + 1)


def _empty(shape, like: Tensor, cl: bool) -> Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device,
                       memory_format=torch.channels_last if cl else torch.contiguous_format)


@torch.library.custom_op("pydl::conv2d_fwd", mutates_args=())
def conv2d_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], geometry: list[int], groups: int,
               tf32: bool) -> Tensor:
    """y of the triton kernels; geometry (sh, sw, pad_top, pad_bottom, pad_left, pad_right, dh, dw)."""
    return _triton_fwd(x, weight, bias, geometry, groups, tf32)


@conv2d_fwd.register_fake
def _(x, weight, bias, geometry, groups, tf32):
    return _empty(_out_shape(x, weight, geometry), x, channels_last(x))


@torch.library.custom_op("pydl::conv2d_bwd_data", mutates_args=())
def conv2d_bwd_data(dy: Tensor, x: Tensor, weight: Tensor, geometry: list[int], groups: int, tf32: bool) -> Tensor:
    """dx (x's shape and memory format; x itself is only read for them)."""
    return _triton_dx(dy, x, weight, geometry, groups, tf32)


@conv2d_bwd_data.register_fake
def _(dy, x, weight, geometry, groups, tf32):
    return _empty(tuple(x.shape), dy, channels_last(x))


@torch.library.custom_op("pydl::conv2d_bwd_weight", mutates_args=())
def conv2d_bwd_weight(dy: Tensor, x: Tensor, weight: Tensor, geometry: list[int], groups: int, tf32: bool) -> Tensor:
    """dweight (weight's shape, dtype and strides; weight itself is only read for them)."""
    return _triton_dw(dy, x, weight, geometry, groups, tf32)


@conv2d_bwd_weight.register_fake
def _(dy, x, weight, geometry, groups, tf32):
    return torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    _save(ctx, inputs, output)


def _backward(ctx, dy):
    return _grads(ctx, dy, torch.ops.pydl.conv2d_bwd_data, torch.ops.pydl.conv2d_bwd_weight, torch.is_grad_enabled())


conv2d_fwd.register_autograd(_backward, setup_context=_setup_context)


def _tensor_dims(args, in_dims) -> tuple:
    """in_dims with None for the non-tensor arguments (the geometry list gets a list of Nones)."""
    return tuple(d if isinstance(a, Tensor) else None for a, d in zip(args, in_dims))


@torch.library.register_vmap("pydl::conv2d_fwd")
def _(info, in_dims, *args):
    return vmap_by_loop(conv2d_fwd, info, _tensor_dims(args, in_dims), *args)


@torch.library.register_vmap("pydl::conv2d_bwd_data")
def _(info, in_dims, *args):
    return vmap_by_loop(conv2d_bwd_data, info, _tensor_dims(args, in_dims), *args)


@torch.library.register_vmap("pydl::conv2d_bwd_weight")
def _(info, in_dims, *args):
    return vmap_by_loop(conv2d_bwd_weight, info, _tensor_dims(args, in_dims), *args)
