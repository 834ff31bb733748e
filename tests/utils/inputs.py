"""Test inputs for any op: random tensors in every memory layout, parameters, upstream grads.

Op-agnostic: everything takes a shape, a dtype and a device, and the "rows" of a tensor are
its last dimension (the normalized / reduced / innermost dim of the op under test). A new
op's tests build their inputs from these and describe one call's tensors as a
:class:`TensorCase` dataclass::

    @dataclass
    class Case(TensorCase):
        x: torch.Tensor
        weight: Optional[torch.Tensor]

    case = Case(make_input((4, 33), FP32, "cpu", "sliced"), make_param(33, FP32, "cpu"))

All randomness comes from torch's global generator (seeded per test by tests/conftest.py).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

FP32, BF16, FP16, FP64 = torch.float32, torch.bfloat16, torch.float16, torch.float64

# Layouts of make_input: "contiguous" first, then the non-contiguous ones (LAYOUTS[1:]).
LAYOUTS = ["contiguous", "transposed", "sliced", "row_strided", "expanded", "lastdim_strided"]
# Layouts of make_param (1-D tensors) and of make_grad (upstream gradients).
PARAM_LAYOUTS = ["contiguous", "sliced", "lastdim_strided"]
GRAD_LAYOUTS = ["contiguous", "ones", "expanded", "transposed"]


def randn(shape, dtype, device, scale=1.0, offset=0.0) -> torch.Tensor:
    """``randn(shape) * scale + offset`` in ``dtype`` on ``device``.

    Drawn in float32 (float64 for float64) on the CPU and then converted, so the same seed
    gives the same values on every device and the low-precision dtypes get rounded float32
    draws.
    """
    gen_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    t = torch.randn(shape, dtype=gen_dtype)
    if scale != 1.0:
        t = t * scale
    if offset != 0.0:
        t = t + offset
    return t.to(dtype=dtype, device=device)


def make_input(shape, dtype, device, layout="contiguous", *, scale=1.0, offset=0.0,
               requires_grad=True) -> torch.Tensor:
    """A random tensor of logical ``shape`` stored as ``layout`` (one of LAYOUTS).

    The returned tensor is a view of a leaf (when requires_grad) so gradients can be taken w.r.t.
    the view itself: transposed (last-dim stride != 1), sliced (``big[..., 1:N+1]``: misaligned
    start and row stride N+3), row_strided (every other row), expanded (stride-0 leading dim),
    lastdim_strided (``big[..., ::2]``). A 1-D shape has no rows to permute, skip or broadcast:
    transposed / row_strided / expanded fall back to sliced there.
    """
    shape = tuple(shape)
    lead, n = shape[:-1], shape[-1]
    if layout in ("transposed", "row_strided", "expanded") and not lead:
        layout = "sliced"  # a 1-D x has no rows to permute / skip / broadcast
    if layout == "contiguous":
        base = randn(shape, dtype, device, scale, offset)
        view = lambda b: b  # noqa: E731
    elif layout == "transposed":
        base = randn(lead[:-1] + (n, lead[-1]), dtype, device, scale, offset)
        view = lambda b: b.transpose(-1, -2)  # noqa: E731
    elif layout == "sliced":
        base = randn(lead + (n + 3,), dtype, device, scale, offset)
        view = lambda b: b[..., 1:n + 1]  # noqa: E731
    elif layout == "row_strided":
        base = randn(lead[:-1] + (2 * lead[-1], n), dtype, device, scale, offset)
        view = lambda b: b[..., ::2, :]  # noqa: E731
    elif layout == "expanded":
        base = randn(lead[:-1] + (1, n), dtype, device, scale, offset)
        view = lambda b: b.expand(shape)  # noqa: E731
    elif layout == "lastdim_strided":
        base = randn(lead + (2 * n,), dtype, device, scale, offset)
        view = lambda b: b[..., ::2]  # noqa: E731
    else:
        raise ValueError(layout)
    if requires_grad:
        base.requires_grad_(True)
    t = view(base)
    assert tuple(t.shape) == shape
    return t


def make_param(n, dtype, device, layout="contiguous", *, requires_grad=True, offset=0.0) -> torch.Tensor:
    """A random 1-D parameter of shape (n,) (weight, bias, ...), ``randn + offset``, stored as
    ``layout``: contiguous, sliced (misaligned ``big[1:n+1]``) or lastdim_strided (``big[::2]``);
    any other layout name gives a contiguous tensor. A view of a leaf when requires_grad."""
    if layout == "sliced":
        base = randn((n + 2,), dtype, device, offset=offset)
        view = lambda b: b[1:n + 1]  # noqa: E731
    elif layout == "lastdim_strided":
        base = randn((2 * n,), dtype, device, offset=offset)
        view = lambda b: b[::2]  # noqa: E731
    else:
        base = randn((n,), dtype, device, offset=offset)
        view = lambda b: b  # noqa: E731
    if requires_grad:
        base.requires_grad_(True)
    return view(base)


def param_layout(layout: str) -> str:
    """The make_param layout that goes with a make_input ``layout`` (sliced and lastdim_strided
    carry over to 1-D parameters, the others give contiguous parameters)."""
    return layout if layout in ("sliced", "lastdim_strided") else "contiguous"


def make_grad(shape, dtype, device, layout="contiguous") -> torch.Tensor:
    """An upstream gradient of ``shape`` (one of GRAD_LAYOUTS): contiguous random, "ones"
    (all-ones with stride 0 everywhere: what ``y.sum().backward()`` sends), "expanded" (one
    random row broadcast over the leading dims), "transposed" (last-dim stride != 1; random
    contiguous for a 1-D shape); any other name gives a contiguous random gradient."""
    shape = tuple(shape)
    if layout == "contiguous":
        return randn(shape, dtype, device)
    if layout == "ones":  # what y.sum().backward() sends: stride 0 everywhere
        return torch.ones((), dtype=dtype, device=device).expand(shape)
    if layout == "expanded":
        return randn(shape[-1:], dtype, device).expand(shape)
    if layout == "transposed" and len(shape) >= 2:
        return randn(shape[:-2] + (shape[-1], shape[-2]), dtype, device).transpose(-1, -2)
    return randn(shape, dtype, device)


class TensorCase:
    """Base class for a dataclass holding one call's tensor arguments (fields: Tensor or None).

    The field names are the argument names, used in messages ("the op modified its input x",
    "dweight: ..."); absent optional arguments are None and are skipped by :meth:`named`.
    """

    def named(self) -> list[tuple[str, torch.Tensor]]:
        """[(name, tensor)] of the fields that are not None, in field order."""
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None]

    def tensors(self) -> list[torch.Tensor]:
        """The tensors of :meth:`named`, in the same order (e.g. the inputs to differentiate)."""
        return [t for _, t in self.named()]

    def copy(self, dtype: Optional[torch.dtype] = None, requires_grad: bool = True):
        """The same case with fresh leaf copies (detached, converted to ``dtype`` if given, else in
        each tensor's own dtype)."""
        def cp(t):
            if t is None:
                return None
            return t.detach().to(dtype or t.dtype).clone().requires_grad_(requires_grad)
        return type(self)(**{f.name: cp(getattr(self, f.name)) for f in dataclasses.fields(self)})


def shape_id(shape) -> str:
    """A pytest id for a shape: (2, 0, 7) -> "2x0x7", () -> "scalar"."""
    return "x".join(str(s) for s in shape) if shape else "scalar"


_DTYPE_IDS = {FP32: "fp32", BF16: "bf16", FP16: "fp16", FP64: "fp64"}


def dtype_id(dtype: torch.dtype) -> str:
    """A pytest id for a dtype: torch.float32 -> "fp32" (bf16, fp16, fp64; else str(dtype))."""
    return _DTYPE_IDS.get(dtype, str(dtype).replace("torch.", ""))
