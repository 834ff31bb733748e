"""What every pydl op shares between its public function and its kernels.

Two paths per op (docs/architecture.md, "The dispatch path"):

* **eager fast path** — plain tensors, no tracing, no transform, no dispatch mode
  (:func:`eager_mode`): the op calls its kernel directly, wrapped in a classic
  ``torch.autograd.Function`` when a gradient is needed. This is what a model's forward pays
  per call, so it is a handful of attribute reads and one native call.
* **traced path** — everything else (``torch.compile``, ``torch.export``, ``torch.func``,
  fake tensors, tensor subclasses, dispatch modes): the op goes through its
  ``torch.library.custom_op`` (fake impl, vmap rule, autograd), which every torch mode
  understands. Under Dynamo :func:`eager_mode` is constant TRACED, so the fast path is not
  even traced.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

_is_compiling = torch.compiler.is_compiling
_dispatch_stack_len = torch._C._len_torch_dispatch_stack
_functorch_stack = torch._C._functorch.peek_interpreter_stack
_torch_function_mode_on = torch._C._is_torch_function_mode_enabled
_has_torch_function = torch.overrides.has_torch_function
_grad_enabled = torch.is_grad_enabled


TRACED, EAGER, EAGER_GRAD = 0, 1, 2  # the values of eager_mode()


def eager_mode(tensors: tuple) -> int:
    """How a call over ``tensors`` (a tuple; None entries allowed) may run.

    EAGER / EAGER_GRAD: plain tensors in plain eager mode — the kernel may be called directly
    (EAGER_GRAD: autograd must record it). TRACED: under Dynamo/export tracing, inside
    torch.func transforms, under any TorchDispatchMode (FakeTensorMode, FunctionalTensorMode,
    proxy tracing, ...) or TorchFunctionMode, or with tensor subclasses that override
    ``__torch_function__`` — the call must go through the op's custom op.
    """
    if _is_compiling():
        return TRACED
    if (_dispatch_stack_len() or _functorch_stack() is not None or _torch_function_mode_on()
            or _has_torch_function(tensors)):
        return TRACED
    if _grad_enabled():
        for t in tensors:
            if t is not None and t.requires_grad:
                return EAGER_GRAD
    return EAGER


def eager_apply(function: type) -> Callable:
    """``function.apply`` for the eager fast path: the C++ apply of a classic (forward(ctx, ...))
    ``torch.autograd.Function``, without torch's Python wrapper around it, which binds default
    arguments for setup_context-style Functions, routes calls under torch.func transforms and
    unwraps dead functorch wrappers — ~3–4 µs a call that :func:`eager_mode` has already made
    unnecessary (it sends every call under a transform, and every tensor subclass, to the traced
    path). Falls back to ``function.apply`` where torch has no such base class."""
    base_apply = getattr(getattr(torch._C, "_FunctionBase", None), "__dict__", {}).get("apply")
    if base_apply is None or getattr(function, "setup_context", None) is not torch.autograd.Function.setup_context:
        return function.apply
    return base_apply.__get__(None, function)


def check_qkv(op: str, named: Sequence[tuple], ndim: int, rank_rule: str) -> None:
    """The shared first checks of the attention ops over ``named`` = ((name, tensor), ...), q first:
    each a floating-point Tensor of rank ``ndim`` (else "<op>: <name> must <rank_rule>"), one dtype."""
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.dim() != ndim:
            raise ValueError(f"{op}: {name} must {rank_rule}, got shape {tuple(t.shape)}")
    dtype = named[0][1].dtype
    if any(t.dtype != dtype for _, t in named):
        names = [n for n, _ in named]
        raise TypeError(f"{op}: {', '.join(names[:-1])} and {names[-1]} must have one dtype, got "
                        f"{', '.join(str(t.dtype) for _, t in named)}")


def device_type(t: Tensor) -> str:
    """t's device type as a dispatch key reads it, without building a torch.device."""
    return "cpu" if t.is_cpu else "cuda" if t.is_cuda else t.device.type


def same_device(t: Tensor, like: Tensor) -> bool:
    """t and like on one device, without building torch.device objects (~1 us each)."""
    if t.is_cpu or like.is_cpu:
        return t.is_cpu and like.is_cpu
    return t.device == like.device


def in_functorch_transform() -> bool:
    """Inside torch.func transforms (grad, vmap, jacrev, ...) outside Dynamo: such calls go through
    an op's setup_context-style Function, whose generated vmap rule uses the custom ops' rules."""
    return not _is_compiling() and _functorch_stack() is not None


def cuda_autocast_fp32(device_type: str, tensors: tuple) -> tuple:
    """torch's CUDA autocast "fp32" policy (layer_norm, rms_norm, ...): inside an enabled CUDA
    autocast region, floating tensors other than float64 are cast to float32. Elsewhere — CPU
    autocast included, which leaves these ops alone — ``tensors`` is returned unchanged."""
    if device_type != "cuda" or not torch.is_autocast_enabled("cuda"):
        return tensors
    return tuple(t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t
                 for t in tensors)


def autocast_lower_precision(device_type: str, tensors: tuple) -> tuple:
    """torch's autocast "lower precision" policy (conv2d, linear, ...): inside an enabled autocast
    region of ``device_type`` (CPU or CUDA), floating tensors other than float64 are cast to the
    autocast dtype. Elsewhere (no autocast, other device types such as meta) unchanged."""
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return tensors
    dt = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dt) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def differentiable_grads(reference: Callable[..., Sequence[Tensor]], inputs: Sequence[Optional[Tensor]],
                         grad_outputs: Sequence[Optional[Tensor]]) -> tuple:
    """Gradients of ``reference(*inputs)`` w.r.t. ``inputs``, as a graph (``create_graph``).

    The backward of a pydl op runs its kernels, which autograd cannot differentiate. When a
    caller asks for a differentiable backward (double backward: ``create_graph=True``), the op
    recomputes its forward with its torch composition and differentiates that instead, so
    higher-order gradients are exact. Returns one entry per input (None where it has no grad).
    """
    with torch.enable_grad():
        outs = reference(*inputs)  # the saved inputs themselves: the result stays on their graph
        pairs = [(o, g) for o, g in zip(outs, grad_outputs) if g is not None and o.requires_grad]
        wrt = [t for t in inputs if t is not None and t.requires_grad]
        if not pairs or not wrt:
            return tuple(None for _ in inputs)
        got = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                       create_graph=True, allow_unused=True))
    return tuple(next(got) if t is not None and t.requires_grad else None for t in inputs)


def vmap_by_loop(op: Callable, info, in_dims: Sequence[Optional[int]], *args) -> tuple:
    """A ``torch.library.register_vmap`` rule that runs ``op`` once per batch entry and stacks
    the outputs along dim 0 — for the calls a fused rule does not cover (e.g. batched weights)."""
    outs = []
    for i in range(info.batch_size):
        outs.append(op(*[a.select(d, i) if isinstance(a, Tensor) and d is not None else a
                         for a, d in zip(args, in_dims)]))
    if isinstance(outs[0], Tensor):
        return torch.stack(outs), 0
    stacked = tuple(torch.stack(parts) for parts in zip(*outs))
    return stacked, (0,) * len(stacked)
