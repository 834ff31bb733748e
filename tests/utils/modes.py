"""Every torch mode, for every op: the shared checks that a pydl op behaves like its torch
counterpart in eager mode, under ``torch.compile`` (static, automatic-dynamic and
``dynamic=True`` shapes, ``fullgraph=True``), ``torch.export``, ``torch.func`` transforms
(grad, vmap, jacrev), activation checkpointing, double backward, no_grad/inference_mode.

An op is described by an :class:`OpUnderTest`: the pydl callable, the torch reference with the
same signature, and an input factory. Each ``check_*`` function compares pydl with the
reference in that mode (float64 inputs, so tolerances are tight) and raises AssertionError with
what differed. Tests of a new op only declare its OpUnderTest and parametrize over MODES.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.utils.checkpoint as checkpoint

ATOL, RTOL = 1e-9, 1e-7  # float64 inputs: pydl and torch agree to rounding


@dataclass
class OpUnderTest:
    """fn / ref: (*tensors) -> Tensor or tuple of Tensors, same signature.

    make_inputs(shape, requires_grad) -> tuple of tensors (float64, CPU unless said);
    shapes: two shapes that differ only where a dynamic dim may vary (first dims), used for the
    recompile checks; vmap_in_dims: in_dims for torch.func.vmap over a new leading batch dim
    (None entries: arguments shared across the batch, e.g. weights); jacrev_shape: the shape of the
    jacrev check (its cost grows with the output's size: one backward per output element), shapes[0]
    if None.
    """

    name: str
    fn: Callable
    ref: Callable
    make_inputs: Callable
    shapes: Sequence[tuple] = ((4, 7), (6, 7))
    vmap_in_dims: tuple = (0,)
    atol: float = ATOL
    rtol: float = RTOL
    extra: dict = field(default_factory=dict)
    jacrev_shape: Optional[tuple] = None


def as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def assert_same(got, want, what: str, atol: float = ATOL, rtol: float = RTOL) -> None:
    got, want = as_tuple(got), as_tuple(want)
    assert len(got) == len(want), f"{what}: {len(got)} outputs, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None, f"{what}[{i}]: expected None"
            continue
        assert g is not None, f"{what}[{i}]: got None"
        assert g.shape == w.shape, f"{what}[{i}]: shape {tuple(g.shape)} != {tuple(w.shape)}"
        assert g.dtype == w.dtype, f"{what}[{i}]: dtype {g.dtype} != {w.dtype}"
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m: f"{what}[{i}]: {m}")


def _loss(out) -> torch.Tensor:
    """A scalar that weights every output element differently (catches swapped gradients)."""
    total = 0
    for k, o in enumerate(as_tuple(out)):
        if o is not None and o.is_floating_point():
            w = torch.arange(o.numel(), dtype=o.dtype, device=o.device).reshape(o.shape)
            total = total + (o * torch.sin(w + k)).sum()
    return total


def _grads(fn, inputs, create_graph=False):
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return torch.autograd.grad(_loss(fn(*inputs)), leaves, create_graph=create_graph)


def _fresh(op: OpUnderTest, shape=None, requires_grad=True) -> tuple:
    return op.make_inputs(shape or op.shapes[0], requires_grad)


# ---- the modes -------------------------------------------------------------------------------

def check_eager(op: OpUnderTest) -> None:
    x = _fresh(op)
    assert_same(op.fn(*x), op.ref(*x), f"{op.name} eager forward", op.atol, op.rtol)
    assert_same(_grads(op.fn, x), _grads(op.ref, x), f"{op.name} eager grads", op.atol, op.rtol)


def check_no_grad(op: OpUnderTest) -> None:
    x = _fresh(op)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            got = op.fn(*x)
            want = op.ref(*x)
        assert_same(got, want, f"{op.name} under {ctx.__name__}", op.atol, op.rtol)
        assert all(not o.requires_grad for o in as_tuple(got) if o is not None)


def _compiled(op: OpUnderTest, dynamic):
    torch._dynamo.reset()
    return torch.compile(op.fn, fullgraph=True, dynamic=dynamic)


def check_compile(op: OpUnderTest, dynamic) -> None:
    """fullgraph compile (no graph break) agrees with eager, forward and backward, on two
    shapes. dynamic=False: static; None: automatic dynamic (recompiles once, dynamic); True."""
    fn = _compiled(op, dynamic)
    for shape in op.shapes:
        x = _fresh(op, shape)
        assert_same(fn(*x), op.ref(*x), f"{op.name} compile(dynamic={dynamic}) {shape}", op.atol, op.rtol)
        assert_same(_grads(fn, x), _grads(op.ref, x), f"{op.name} compile(dynamic={dynamic}) grads {shape}",
                    op.atol, op.rtol)


class _Wrap(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def check_export(op: OpUnderTest) -> None:
    """torch.export (non-strict and strict) round-trips, and the program computes the same."""
    x = _fresh(op, requires_grad=False)
    for strict in (False, True):
        ep = torch.export.export(_Wrap(op.fn), x, strict=strict)
        assert_same(ep.module()(*x), op.ref(*x), f"{op.name} export(strict={strict})", op.atol, op.rtol)


def check_func_grad(op: OpUnderTest) -> None:
    x = _fresh(op, requires_grad=False)
    argnums = tuple(range(len(x)))
    got = torch.func.grad(lambda *a: _loss(op.fn(*a)), argnums=argnums)(*x)
    want = torch.func.grad(lambda *a: _loss(op.ref(*a)), argnums=argnums)(*x)
    assert_same(got, want, f"{op.name} torch.func.grad", op.atol, op.rtol)


def check_func_vmap(op: OpUnderTest) -> None:
    """vmap over a new leading batch dim of the args with in_dim 0 (others shared)."""
    base = _fresh(op, requires_grad=False)
    batched = tuple(torch.stack([t, t * 0.5 + 0.25, -t]) if d == 0 else t
                    for t, d in zip(base, op.vmap_in_dims + (None,) * len(base)))
    in_dims = tuple(op.vmap_in_dims) + (None,) * (len(base) - len(op.vmap_in_dims))
    got = torch.func.vmap(op.fn, in_dims=in_dims)(*batched)
    want = torch.func.vmap(op.ref, in_dims=in_dims)(*batched)
    assert_same(got, want, f"{op.name} torch.func.vmap", op.atol, op.rtol)


def check_func_jacrev(op: OpUnderTest) -> None:
    x = _fresh(op, op.jacrev_shape or op.shapes[0], requires_grad=False)
    first = lambda f: (lambda *a: as_tuple(f(*a))[0])  # noqa: E731 - jacobian of the first output
    got = torch.func.jacrev(first(op.fn), argnums=0)(*x)
    want = torch.func.jacrev(first(op.ref), argnums=0)(*x)
    assert_same(got, want, f"{op.name} torch.func.jacrev", op.atol, op.rtol)


def check_checkpoint(op: OpUnderTest) -> None:
    """Activation checkpointing (reentrant and not) gives the plain gradients."""
    want = _grads(op.ref, _fresh(op))
    for reentrant in (False, True):
        x = _fresh(op)
        out = checkpoint.checkpoint(op.fn, *x, use_reentrant=reentrant)
        _loss(out).backward()  # reentrant checkpointing refuses autograd.grad
        got = tuple(t.grad for t in x if t.requires_grad)
        assert_same(got, want, f"{op.name} checkpoint(reentrant={reentrant})", op.atol, op.rtol)


def check_double_backward(op: OpUnderTest) -> None:
    """Second derivatives through the op equal torch's (create_graph=True)."""
    x = _fresh(op)
    leaves = [t for t in x if t.requires_grad]

    def second(fn):
        g = _grads(fn, x, create_graph=True)
        return torch.autograd.grad(sum((gi * gi).sum() for gi in g), leaves, allow_unused=True,
                                   materialize_grads=True)

    assert_same(second(op.fn), second(op.ref), f"{op.name} double backward", op.atol * 10, op.rtol * 10)


MODES: dict = {
    "eager": check_eager,
    "no_grad": check_no_grad,
    "compile_static": lambda op: check_compile(op, False),
    "compile_auto_dynamic": lambda op: check_compile(op, None),
    "compile_dynamic": lambda op: check_compile(op, True),
    "export": check_export,
    "func_grad": check_func_grad,
    "func_vmap": check_func_vmap,
    "func_jacrev": check_func_jacrev,
    "checkpoint": check_checkpoint,
    "double_backward": check_double_backward,
}


@contextlib.contextmanager
def no_recompile_limit():
    """Compile tests compile the same function for several ops: lift dynamo's cache limits."""
    cfg = torch._dynamo.config
    names = [n for n in ("cache_size_limit", "recompile_limit") if hasattr(cfg, n)]
    with cfg.patch(**{n: max(getattr(cfg, n), 64) for n in names}):
        yield
