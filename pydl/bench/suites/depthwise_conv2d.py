"""Depthwise convolution: ``pydl.ops.depthwise_conv2d`` against ``F.conv2d(groups=C)`` (cuDNN / oneDNN)
and torch.compile, in the shape's memory layout.

Op ``depthwise_conv2d``. A shape is {N, C, H, k, s, cl}: x (N, C, H, H), weight (C, 1, k, k), bias,
stride s, "same"-style padding k // 2, channels_last when cl = 1 (x, and so y and dx, in that layout
for every provider), NCHW when cl = 0. ``--shapes`` takes "N=..,C=..,H=..,k=..,s=..,cl=..".
CUDA: the ConvNeXt-T stages at batch 64 (96x56², 192x28², 384x14², 768x7², k=7), RepLKNet-like k=13 and
k=31, MobileNet 3x3 stride 2, batch 1 and 4; both layouts; bfloat16. CPU: the issue's target cell
(N=8, C=96, 56², k=7) in both layouts, a k=31 and a stride-2 cell; float32.

Providers:
  pydl          pydl.ops.depthwise_conv2d with no ``backend=`` (what users get)
  pydl-native   backend="native"
  torch-eager   F.conv2d(x, w, b, stride, k // 2, groups=C) (the reference provider)
  torch-compile the same under torch.compile
Work: the bytes one call must move: fwd x read + y written; bwd dy read, x read (for dweight), dx
written; weights and bias once per pass. GB/s and % of the copy bandwidth measured in the same run.

Targets (``report``): CPU N=8 C=96 56² k=7 float32: fwd+bwd >= 1.0x torch-eager in both layouts.
GPU (H100/H200, bf16, channels_last): k=7 ConvNeXt-T stages fwd+bwd >= 3x torch and >= 80% of the
copy bandwidth; k=31 >= 10x; never slower than torch (batch 1-4, NCHW).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..core import COMPILE, EAGER, PYDL, REFERENCE, Provider, Suite, compile_provider, shape_dims, shape_str
from ..report import cells_by, pct_of_ceiling, target_row

NAME = OP = "depthwise_conv2d"
KEYS = ("N", "C", "H", "k", "s", "cl")
CPU_TARGET = {"N": 8, "C": 96, "H": 56, "k": 7, "s": 1}


def shape(n: int, c: int, h: int, k: int, s: int = 1, cl: int = 1) -> dict:
    return {"N": n, "C": c, "H": h, "k": k, "s": s, "cl": cl}


def dims(sh) -> tuple:
    """(N, C, H, k, s, cl) of a shape dict, tuple or "N=..,C=..,H=..,k=..,s=..,cl=.." string."""
    return shape_dims(sh, KEYS, NAME, {"s": 1, "cl": 1})


def default_shapes(device: torch.device, quick: bool) -> list:
    both = lambda n, c, h, k, s=1: [shape(n, c, h, k, s, cl) for cl in (1, 0)]  # noqa: E731
    if device.type == "cuda":
        convnext = [(96, 56), (192, 28), (384, 14), (768, 7)]
        if quick:
            return (both(64, 96, 56, 7) + [shape(64, 384, 14, 7), shape(64, 128, 56, 31), shape(4, 96, 56, 7),
                                          shape(64, 144, 56, 3, 2)])
        out = [shape(64, c, h, 7, 1, cl) for c, h in convnext for cl in (1, 0)]
        out += [shape(n, 96, 56, 7, 1, cl) for n in (1, 4) for cl in (1, 0)]
        out += [shape(64, 128, 56, k, 1, cl) for k in (13, 31) for cl in (1, 0)]
        out += [shape(n, 144, 56, 3, 2, cl) for n in (1, 64) for cl in (1, 0)]
        return out
    target = both(8, 96, 56, 7)
    if quick:
        return target
    return target + both(1, 96, 56, 7) + both(2, 64, 28, 31) + both(8, 144, 56, 3, 2)


def _out(h: int, k: int, s: int) -> int:
    return (h + 2 * (k // 2) - k) // s + 1


def bytes_moved(mode: str, n: int, c: int, h: int, k: int, s: int, elem: int) -> int:
    x, y, params = n * c * h * h, n * c * _out(h, k, s) ** 2, c * (k * k + 1)
    fwd = x + y + params
    bwd = y + x + x + 2 * params  # dy, x (dweight), dx; weight read, dweight + dbias written
    return elem * {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def work(op: str, mode: str, sh, dtype) -> int:
    n, c, h, k, s, _ = dims(sh)
    return bytes_moved(mode, n, c, h, k, s, torch.empty((), dtype=dtype).element_size())


def make_inputs(op: str, sh, dtype: torch.dtype, device: torch.device, seed: int):
    """(x, weight, bias, stride), (dy,): x in the shape's layout, weight scaled like a trained filter;
    the stride as a CPU int64 scalar tensor (read with int(): no device sync)."""
    n, c, h, k, s, cl = dims(sh)
    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *size, scale=1.0: (torch.randn(*size, generator=g, device=device) * scale).to(dtype)  # noqa: E731
    fmt = torch.channels_last if cl else torch.contiguous_format
    x = rnd(n, c, h, h).contiguous(memory_format=fmt)
    dy = rnd(n, c, _out(h, k, s), _out(h, k, s)).contiguous(memory_format=fmt)
    return (x, rnd(c, 1, k, k, scale=1.0 / k), rnd(c, scale=0.1), torch.tensor(s)), (dy,)


def torch_fn(op: str) -> Callable:
    def f(x, w, b, stride):
        return (F.conv2d(x, w, b, int(stride), w.shape[-1] // 2, groups=x.shape[1]),)
    return f


def pydl_fn(op: str, backend: Optional[str] = None) -> Callable:
    from pydl.ops.depthwise_conv2d import depthwise_conv2d  # lazily: the harness runs without pydl

    kw = {} if backend is None else {"backend": backend}

    def f(x, w, b, stride):
        return (depthwise_conv2d(x, w, b, int(stride), w.shape[-1] // 2, **kw),)
    return f


# --------------------------------------------------------------------------------- targets


def report(rows: list) -> list:
    """Markdown: the CPU target cells (both layouts), then the GPU targets on every CUDA cell."""
    by = cells_by(rows, NAME, ("device", "shape", "dtype", "mode"))
    lines = ["## Depthwise conv2d targets", "",
             "| target | cell | mode | pydl | torch-eager | speed-up | pydl % of copy | verdict |",
             "|---|---|---|---|---|---|---|---|"]

    def row(target, key, ok_fn):
        per = by.get(key, {})
        lines.append(target_row([target, f"{key[1]} {key[2]}", key[3]], per.get("pydl"), per.get(EAGER), ok_fn))

    for cl in (0, 1):
        cell = shape_str(dict(CPU_TARGET, cl=cl))
        row(f"CPU ≥ 1.0× ({'channels_last' if cl else 'NCHW'})", ("cpu", cell, "float32", "fwd+bwd"),
            lambda sp, p: sp >= 1.0)
    for key in sorted(k for k in by if k[0] == "cuda" and k[3] == "fwd+bwd"):
        n, c, h, k, s, cl = dims(key[1])
        if k == 7 and cl and n == 64 and s == 1:
            row("GPU ≥ 3× torch, ≥ 80% copy", key, lambda sp, p: sp >= 3 and (pct_of_ceiling(p) or 0) >= 80)
        elif k == 31 and cl:
            row("GPU ≥ 10× torch", key, lambda sp, p: sp >= 10)
        else:
            row("GPU never slower than torch", key, lambda sp, p: sp >= 1.0)
    if not any(k[0] == "cuda" for k in by):
        lines.append("| GPU (3× / 10× / ≥ 1×) | every CUDA cell | — | — | — | — | — | "
                     "not measured (no CUDA cells in this run) |")
    return lines + [""]


SUITE = Suite(
    name=NAME,
    ops=(OP,),
    providers=(
        Provider("pydl", lambda op: pydl_fn(op), PYDL),
        Provider("pydl-native", lambda op: pydl_fn(op, "native"), PYDL),
        Provider(EAGER, lambda op: torch_fn(op), REFERENCE),
        compile_provider(lambda op: torch_fn(op), COMPILE),
    ),
    make_inputs=lambda *a: make_inputs(*a),
    shapes=lambda device, quick: default_shapes(device, quick),
    smoke_shapes=[shape(2, 8, 12, 7, 1, 1), shape(1, 5, 9, 3, 2, 0)],
    probe_shape=shape(1, 2, 8, 3, 1, 1),
    work=lambda *a: work(*a),
    out_names=("y",),
    diff_inputs=(0, 1, 2),
    grad_names=("dx", "dw", "db"),
    reduction_grads=("dw", "db"),
    plot_x=lambda sh: dims(sh)[2],
    x_label="H = W (input size)",
    plot_series=lambda sh: "k={} s={} {}".format(dims(sh)[3], dims(sh)[4], "NHWC" if dims(sh)[5] else "NCHW"),
    report=lambda rows: report(rows),
)
