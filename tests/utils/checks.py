"""Checks for any op: outputs and gradients against a float64 reference, untouched inputs,
error messages, custom-op recording + opcheck, gradcheck over named inputs.

Op-agnostic: an op's tests run pydl, the float64 reference and torch's own computation in
the input dtype (the low-precision yardstick of tests/tolerances.py), then hand the results
to these helpers. Typical use, for outputs ``names`` of a call on the :class:`TensorCase`
``case`` (see tests/utils/inputs.py)::

    before = snapshot(case.named())
    outs = pydl_fn(*case.tensors())
    assert_outputs_like(names, outs, shape=case.x.shape, dtype=dtype, device=case.x.device)
    assert_unchanged(case.named(), before)
    assert_outputs_close(names, outs, refs, touts, dtype=dtype, label="my_op")
    got = grads(outs, case.tensors(), gouts)
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from tests.tolerances import assert_close_to_ref


# ---- gradients ------------------------------------------------------------------------------------

def grads(outs, inputs, gouts) -> list[torch.Tensor]:
    """d(sum_i <outs_i, gouts_i>)/d inputs; outputs whose gout is None do not feed the loss;
    unused inputs get zeros (not None)."""
    pairs = [(o, g) for o, g in zip(outs, gouts) if g is not None]
    res = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)
    return [torch.zeros_like(t) if r is None else r for r, t in zip(res, inputs)]


def gradcheck_named(fn: Callable, named, *, eps=1e-6, atol=1e-7, rtol=1e-5) -> bool:
    """torch.autograd.gradcheck of ``fn(**{name: tensor})`` over every tensor of ``named``
    ([(name, tensor)], float64), each as a fresh leaf."""
    leaves = [t.detach().clone().requires_grad_() for _, t in named]
    keys = [n for n, _ in named]

    def call(*args):
        return fn(**dict(zip(keys, args)))

    return torch.autograd.gradcheck(call, leaves, eps=eps, atol=atol, rtol=rtol)


# ---- outputs and inputs ---------------------------------------------------------------------------

def snapshot(named) -> list[torch.Tensor]:
    """Detached copies of the tensors of ``named`` ([(name, tensor)]), for :func:`assert_unchanged`."""
    return [t.detach().clone() for _, t in named]


def assert_unchanged(named, before) -> None:
    """The op did not write to any of its inputs (compared bitwise with :func:`snapshot`)."""
    for (n, t), b in zip(named, before):
        assert torch.equal(t.detach(), b), f"the op modified its input {n}"


def assert_outputs_like(names: Sequence[str], outs, *, shape, dtype, device) -> None:
    """There is one Tensor output per name, each of ``shape``, ``dtype`` and on ``device``."""
    assert len(outs) == len(names)
    for name, o in zip(names, outs):
        assert isinstance(o, torch.Tensor), f"{name} is {type(o).__name__}"
        assert tuple(o.shape) == tuple(shape), f"{name}: shape {tuple(o.shape)} != x's {tuple(shape)}"
        assert o.dtype == dtype and o.device == device, f"{name}: {o.dtype} on {o.device}"


def assert_outputs_close(names, outs, refs, touts, *, dtype, label, stress=False) -> None:
    """Each output is close to its float64 reference (tests/tolerances.py); ``touts``: torch's
    own outputs in ``dtype`` (the low-precision yardstick), or Nones in float64."""
    for r in refs:
        assert r.dtype == torch.float64, f"reference returned {r.dtype}"
    for name, o, r, t in zip(names, outs, refs, touts):
        assert_close_to_ref(o, r, t, dtype=dtype, name=f"{label} {name}", stress=stress)


def assert_grads_close(named, got, want, torch_grads, *, label, scales=None, stress=False) -> None:
    """Every gradient d<name> of ``named`` ([(name, input)]) has the input's shape and dtype and is
    close to the float64 reference gradient by the tolerance of that dtype (so float32 parameters
    of a bfloat16 op, mixed precision, are judged as float32); ``torch_grads``: torch's own (or
    Nones); ``scales``: an optional {name: natural size} hint for gradients that may cancel to ~0
    (see tolerances)."""
    scales = scales or {}
    for (n, t), g, w, tg in zip(named, got, want, torch_grads):
        assert tuple(g.shape) == tuple(t.shape), f"d{n}: shape {tuple(g.shape)} != {tuple(t.shape)}"
        assert_close_to_ref(g, w, tg, dtype=t.dtype, name=f"{label} d{n}", scale=scales.get(n), stress=stress)


# ---- errors ---------------------------------------------------------------------------------------

def assert_error_mentions(excinfo, *words) -> None:
    """The exception of ``pytest.raises(...) as excinfo`` has a message, and it contains at
    least one of ``words`` (the reason: a dtype name, a size, an argument name)."""
    msg = str(excinfo.value)
    assert msg.strip(), f"{type(excinfo.value).__name__} without a message"
    assert any(w in msg for w in words), f"message does not give the reason ({words}): {msg!r}"


# ---- custom ops: recording and opcheck ------------------------------------------------------------

class RecordOps(TorchDispatchMode):
    """Records every operator call of ``namespace`` (``torch.ops.<namespace>.*``) made under it,
    as (func, args, kwargs) with the tensor arguments cloned at call time."""

    def __init__(self, namespace: str = "pydl"):
        super().__init__()
        self.namespace = namespace
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "namespace", None) == self.namespace:
            cl = lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t  # noqa: E731
            self.calls.append((func, tree_map(cl, args), tree_map(cl, kwargs)))
        return func(*args, **kwargs)


def record_calls(fn: Callable, namespace: str = "pydl") -> list:
    """Run ``fn()`` (e.g. a forward + backward) and return the ``namespace`` op calls it made."""
    rec = RecordOps(namespace)
    with rec:
        fn()
    return rec.calls


def is_backward_op(func) -> bool:
    """Whether a recorded op is a backward kernel by its schema name (``*bwd*`` / ``*backward*``)."""
    name = func._schema.name
    return "bwd" in name or "backward" in name


def with_requires_grad(func, args, kwargs):
    """Set requires_grad on the floating-point tensor inputs the schema does not write to."""
    schema = func._schema
    args = list(args)
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            info = schema.arguments[i].alias_info if i < len(schema.arguments) else None
            if info is None or not info.is_write:
                args[i] = a.detach().clone().requires_grad_()
    return tuple(args), kwargs


def opcheck_calls(calls, *, test_utils: Optional[tuple] = None, forward_with_grad: bool = False) -> None:
    """torch.library.opcheck every recorded (func, args, kwargs); ``test_utils``: opcheck's
    (default: all of its tests); ``forward_with_grad``: also opcheck each forward (non-backward)
    op once more with its floating-point inputs requiring grad (the autograd registration)."""
    kw = {} if test_utils is None else {"test_utils": test_utils}
    for func, args, kwargs in calls:
        torch.library.opcheck(func, args, kwargs, **kw)
        if forward_with_grad and not is_backward_op(func):
            a2, k2 = with_requires_grad(func, args, kwargs)
            torch.library.opcheck(func, a2, k2, **kw)
