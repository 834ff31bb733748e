"""The correctness gate: every provider's outputs (and gradients) against a reference.

In float32 the reference is the suite's reference function (torch eager by default) in float32.
In bfloat16 / float16 it is that function on the same (rounded) inputs upcast to float32, and
each tensor's tolerance also admits twice torch eager's own error in that dtype (DESIGN §7):
torch's low-precision CPU weight/bias-gradient reductions are measurably less accurate than a
float32-accumulating kernel, so "equal to torch in bf16" would flag correct kernels.
Integer outputs (indices, tokens) must be equal.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def default_tolerances(dtype: torch.dtype) -> tuple:
    """(relative-norm floor, elementwise atol, elementwise rtol) of the gate."""
    if dtype in (torch.float32, torch.float64):
        return 1e-4, 1e-3, 1e-3
    return 1e-2, 1 / 16, 1 / 16


def short(exc: BaseException, limit: int = 200) -> str:
    msg = " ".join(f"{type(exc).__name__}: {exc}".split())
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _errors(out: torch.Tensor, ref: torch.Tensor) -> tuple:
    """(‖out − ref‖ / ‖ref‖, max |out − ref|), in float32."""
    d = (out.detach().float() - ref.detach().float()).abs_()
    return float(d.norm() / ref.detach().float().norm().clamp_min(1e-30)), float(d.max())


def compare(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
            own: Optional[tuple] = None, reduction: bool = False,
            tolerances: Callable = default_tolerances) -> Optional[str]:
    """None when ``out`` (expected in ``dtype``) matches ``ref`` loosely; else a short reason.

    own: (rel, max abs) error of torch eager in ``dtype`` against the same ``ref``; twice it is
        always admitted. None: torch eager is the reference itself.
    reduction: ``ref`` is a sum over rows (dweight, dbias): its rounding error scales with the
        partial sums, so the elementwise atol is scaled by max|ref|.
    """
    if out is None:
        return f"{name}: missing"
    if not isinstance(out, torch.Tensor):
        return f"{name}: {type(out).__name__}, not a Tensor"
    if out.shape != ref.shape:
        return f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if out.dtype != dtype:
        return f"{name}: dtype {out.dtype} != {dtype}"
    if not (dtype.is_floating_point or dtype.is_complex):
        nbad = int((out != ref.to(out.device)).sum())
        return f"{name}: {nbad} elements differ" if nbad else None
    rel_floor, atol, rtol = tolerances(dtype)
    own_rel, own_max = own if own is not None else (0.0, 0.0)
    rel_tol = max(rel_floor, 2 * own_rel)
    o, r = out.detach().float(), ref.detach().float()
    if not bool(torch.isfinite(o).all()):
        return f"{name}: non-finite values"
    diff = (o - r).abs_()
    rel = float(diff.norm() / r.norm().clamp_min(1e-30))
    if reduction:
        atol = atol * max(1.0, float(r.abs().max()))
    bad = diff > (atol + 2 * own_max) + rtol * r.abs()
    nbad = int(bad.sum())
    if rel > rel_tol or nbad:
        return (f"{name}: rel={rel:.2e} (tol {rel_tol:.1e}); {nbad} elements off; "
                f"max|diff|={float(diff.max()):.3g}")
    return None


def diff_indices(inputs: Sequence, chosen: Optional[Sequence[int]] = None) -> tuple:
    """Indices of the inputs a backward differentiates: ``chosen``, or every floating tensor."""
    if chosen is not None:
        return tuple(chosen)
    return tuple(i for i, t in enumerate(inputs)
                 if isinstance(t, torch.Tensor) and t.is_floating_point())


def make_leaves(inputs: Sequence, idx: Sequence[int]) -> tuple:
    """(args with inputs[idx] replaced by fresh leaves that require grad, those leaves)."""
    args = list(inputs)
    for i in idx:
        args[i] = args[i].detach().requires_grad_(True)
    return tuple(args), tuple(args[i] for i in idx)


def run_grads(fn: Callable, inputs, grads, idx) -> tuple:
    args, leaves = make_leaves(inputs, idx)
    return torch.autograd.grad(as_tuple(fn(*args)), leaves, grads)


def _upcast(ts) -> tuple:
    return tuple(t.float() if isinstance(t, torch.Tensor) and t.dtype in LOW_PRECISION else t
                 for t in ts)


class Reference:
    """What the gate compares with, for one op / shape / dtype of a suite (see the module doc).

    fn: the reference callable (the suite's torch eager function); out_names / grad_names name
    its outputs / the gradients of the inputs at ``diff`` (gradient names in ``reduction`` are
    row sums: atol scaled by max|ref|).
    """

    def __init__(self, fn: Callable, inputs, grads, dtype: torch.dtype, want_grad: bool, *,
                 out_names: Sequence[str], grad_names: Sequence[str] = (),
                 reduction: Sequence[str] = (), diff: Optional[Sequence[int]] = None,
                 tolerances: Callable = default_tolerances):
        self.dtype, self.tolerances = dtype, tolerances
        self.out_names, self.grad_names, self.reduction = tuple(out_names), tuple(grad_names), set(reduction)
        self.diff = diff_indices(inputs, diff)
        low = dtype in LOW_PRECISION
        hi_in, hi_grads = (_upcast(inputs), _upcast(grads or ())) if low else (inputs, grads)
        self.out, self.grads = self._results(fn, hi_in, hi_grads, want_grad)
        self.own = {}
        # The dtype each tensor must come back in: what torch eager returns in this dtype.
        self.expect = {nm: t.dtype for nm, t in self._named(self.out, self.grads)}
        if low:  # torch eager's own error in this dtype, per tensor
            out, got = self._results(fn, inputs, grads, want_grad)
            for (nm, a), (_, b) in zip(self._named(out, got), self._named(self.out, self.grads)):
                self.expect[nm] = a.dtype
                if a.is_floating_point():
                    self.own[nm] = _errors(a, b)

    def _named(self, out, grads) -> list:
        return list(zip(self.out_names, out)) + list(zip(self.grad_names, grads or ()))

    def _results(self, fn, inputs, grads, want_grad):
        out = tuple(t.detach() for t in as_tuple(fn(*inputs)))
        if not want_grad:
            return out, None
        return out, run_grads(fn, inputs, grads, self.diff)

    def _cmp(self, nm, o, r, reduction=False):
        return compare(nm, o, r, self.expect.get(nm, self.dtype), self.own.get(nm), reduction,
                       self.tolerances)

    def check_out(self, outs) -> list:
        outs = as_tuple(outs)
        reasons = [self._cmp(nm, o, r) for nm, o, r in zip(self.out_names, outs, self.out)]
        if len(outs) != len(self.out):
            reasons.append(f"{len(outs)} outputs, expected {len(self.out)}")
        return [r for r in reasons if r]

    def check_grads(self, got) -> list:
        reasons = [self._cmp(nm, o, r, reduction=nm in self.reduction)
                   for nm, o, r in zip(self.grad_names, got, self.grads)]
        return [r for r in reasons if r]
