"""Shared conv2d test cases: one call's configuration, its inputs, and the check of pydl against the
float64 F.conv2d reference (outputs, every gradient, memory format)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from pydl.ops.conv2d import channels_last, conv2d, conv2d_ref
from tests.tolerances import assert_close_to_ref
from tests.utils.checks import grads


@dataclass(frozen=True)
class ConvCase:
    N: int = 2
    C: int = 4
    H: int = 7
    W: int = 7
    Cout: int = 8
    KH: int = 3
    KW: int = 3
    stride: object = 1
    padding: object = 1
    dilation: object = 1
    groups: int = 1
    bias: bool = True
    channels_last: bool = False

    def id(self) -> str:
        return (f"N{self.N}C{self.C}x{self.H}x{self.W}-o{self.Cout}k{self.KH}x{self.KW}-s{self.stride}"
                f"-p{self.padding}-d{self.dilation}-g{self.groups}{'-nb' if not self.bias else ''}"
                f"{'-cl' if self.channels_last else ''}").replace(" ", "")

    def args(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)


def make_inputs(c: ConvCase, dtype, device, requires_grad=True) -> tuple:
    """(x, weight, bias or None): randn drawn in float32 on the CPU, then converted."""
    x = torch.randn(c.N, c.C, c.H, c.W).to(dtype=dtype, device=device)
    if c.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(c.Cout, c.C // c.groups, c.KH, c.KW) / (c.C // c.groups * c.KH * c.KW) ** 0.5).to(dtype=dtype,
                                                                                                     device=device)
    b = torch.randn(c.Cout).to(dtype=dtype, device=device) if c.bias else None
    return tuple(t.requires_grad_(requires_grad) if t is not None else None for t in (x, w, b))


def check_case(c: ConvCase, dtype, device, backend: Optional[str], grad: bool = True) -> None:
    """pydl's output and gradients (dx, dweight, dbias) vs float64 F.conv2d; torch's own result
    in ``dtype`` as the low-precision yardstick; the output and dx in x's memory format."""
    x, w, b = make_inputs(c, dtype, device)
    out = conv2d(x, w, b, **c.args(), backend=backend)
    ref = conv2d_ref(x, w, b, **c.args())
    tout = F.conv2d(x, w, b, **c.args())
    fmt = torch.channels_last if channels_last(x) else torch.contiguous_format   # x's memory format
    assert tout.is_contiguous(memory_format=fmt), f"{c.id()}: torch's output strides {tout.stride()}"
    assert out.is_contiguous(memory_format=fmt), f"{c.id()}: output strides {out.stride()} (x: {x.stride()})"
    assert_close_to_ref(out, ref, tout, dtype=dtype, name=f"{c.id()} y")
    if not grad:
        return
    dy = torch.randn(out.shape).to(dtype=dtype, device=device)
    ins = [t for t in (x, w, b) if t is not None]
    got = grads([out], ins, [dy])
    want = grads([ref], ins, [dy.double()])
    theirs = grads([tout], ins, [dy])
    for name, g, r, t in zip(("dx", "dweight", "dbias"), got, want, theirs):
        scale = float(dy.abs().sum() / dy.shape[1]) ** 0.5 if name != "dx" else None
        assert_close_to_ref(g, r, t, dtype=dtype, name=f"{c.id()} {name}", scale=scale)
    assert got[0].is_contiguous(memory_format=fmt), f"{c.id()}: dx strides {got[0].stride()} (x: {x.stride()})"
