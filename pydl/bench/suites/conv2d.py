"""Dense 2-D convolution: ``pydl.ops.conv2d`` (the Triton implicit-GEMM kernels) against cuDNN in both
layouts and torch.compile.

Ops (one per GEMM of a convolution; inputs x (B, C, H, W) channels_last, weight (K, C, R, R); no bias):
  conv2d.fwd     y = conv(x, w)                     timed in mode fwd
  conv2d.dgrad   dx (data gradient)                 timed in mode bwd, only x differentiated
  conv2d.wgrad   dW (weight gradient)               timed in mode bwd, only w differentiated
Shapes {B, C, H, W, K, R, S, P} (stride S, padding P): on CUDA the ResNet-50 convolutions of every
stage (the 3×3 C→C, the 1×1 C→4C expansion and 4C→C reduction at 56, 28, 14, 7 px; the strided
3×3 and 1×1 downsample of stages 2-4), batch 32 and 64, and ConvNeXt-T's stem (4×4 s4, 3→96 at
224 px) and downsample convs (2×2 s2, 96→192, 192→384, 384→768); --quick: batch 32, one 3×3 and one
1×1 per stage 1 and 3, the stem and one downsample. On CPU a few small layers (B=2; --quick: three).
``--shapes`` takes "B=..,C=..,H=..,W=..,K=..,R=..,S=..,P=..".
Dtypes: bfloat16 on CUDA, float32 on CPU.

Providers:
  pydl-triton   pydl.ops.conv2d(..., backend="triton") on the channels_last inputs (CUDA only)
  pydl          pydl.ops.conv2d with no ``backend=`` (what users get; on CUDA cuDNN until the Triton
                kernels are measured ahead — pydl/ops/conv2d.py) (CUDA only)
  torch-eager   F.conv2d on the channels_last inputs: cuDNN's NHWC kernels (the reference provider)
  torch-nchw    F.conv2d on an NCHW copy of x (made once per input, outside the timed region): cuDNN NCHW
  torch-compile torch.compile(F.conv2d) on the channels_last inputs
On CPU pydl's conv2d *is* torch's F.conv2d (there is no pydl-native CPU convolution kernel), so the
CPU run times the torch providers only; no pydl row is reported there.

Work: 2·B·Ho·Wo·K·C·R·R FLOPs per GEMM (fwd, data gradient and weight gradient alike), reported as
TFLOP/s and % of the bf16 matmul rate measured in the same run.

Targets (``report``; the issue's, H100/H200, bf16, channels_last, the ResNet-50 3×3 and 1×1 layers):
pydl-triton vs torch-eager (cuDNN NHWC): fwd ≥ 0.9×, data and weight gradients ≥ 0.8×; 1×1 layers
≥ 1.0× in every mode. Speed-up = cuDNN's median time / pydl's. Each check: met, MISSED or not measured.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..core import COMPILE, COMPILED, EAGER, OK, PYDL, REFERENCE, SKIPPED, THROUGHPUT, Provider, Suite, compile_fn
from ..report import CEILING_OP, flag_note, measured

NAME = "conv2d"
FWD, DGRAD, WGRAD = "conv2d.fwd", "conv2d.dgrad", "conv2d.wgrad"
OPS = (FWD, DGRAD, WGRAD)
MODE_NAMES = {FWD: "fwd", DGRAD: "bwd-data", WGRAD: "bwd-weight"}
KEYS = ("B", "C", "H", "W", "K", "R", "S", "P")
RESNET_STAGES = ((56, 64), (28, 128), (14, 256), (7, 512))  # (resolution, bottleneck width)


def shape(b: int, c: int, h: int, w: int, k: int, r: int, s: int = 1, p: int = 0) -> dict:
    return dict(zip(KEYS, (b, c, h, w, k, r, s, p)))


def dims(s) -> tuple:
    """(B, C, H, W, K, R, S, P) of a shape dict, tuple or its "B=..,C=..,..." string."""
    if isinstance(s, str):
        s = dict(p.split("=") for p in s.split(",")) if "=" in s else tuple(s.split("x"))
    if isinstance(s, dict):
        s = tuple(s[k] for k in KEYS)
    if len(s) != 8:
        raise ValueError(f"conv2d shapes are B=..,C=..,H=..,W=..,K=..,R=..,S=..,P=.., got {s!r}")
    return tuple(int(x) for x in s)


def resnet50_layers(b: int) -> list:
    """Every distinct ResNet-50 (v1.5) convolution after the stem, at batch b."""
    out = []
    for i, (res, width) in enumerate(RESNET_STAGES):
        out += [shape(b, width, res, res, width, 3, 1, 1),            # 3×3
                shape(b, width, res, res, 4 * width, 1),              # 1×1 expansion
                shape(b, 4 * width, res, res, width, 1)]              # 1×1 reduction
        if i:  # the first block of stages 2-4: strided 3×3 and the 1×1 s2 downsample
            prev = 2 * res
            out += [shape(b, width, prev, prev, width, 3, 2, 1), shape(b, 2 * width, prev, prev, 4 * width, 1, 2)]
    return out


def convnext_layers(b: int) -> list:
    """ConvNeXt-T's stem (4×4 s4) and downsample convs (2×2 s2)."""
    return [shape(b, 3, 224, 224, 96, 4, 4)] + [shape(b, c, r, r, 2 * c, 2, 2) for c, r in ((96, 56), (192, 28),
                                                                                             (384, 14))]


def default_shapes(device: torch.device, quick: bool) -> list:
    if device.type == "cuda":
        if quick:
            return [shape(32, 64, 56, 56, 64, 3, 1, 1), shape(32, 256, 56, 56, 64, 1),
                    shape(32, 256, 14, 14, 256, 3, 1, 1), shape(32, 256, 14, 14, 1024, 1)] + \
                [convnext_layers(32)[0], convnext_layers(32)[2]]
        return resnet50_layers(32) + resnet50_layers(64) + convnext_layers(32) + convnext_layers(64)
    if quick:
        return [shape(2, 64, 14, 14, 64, 3, 1, 1), shape(2, 256, 14, 14, 64, 1), shape(2, 3, 64, 64, 96, 4, 4)]
    return [shape(2, 64, 28, 28, 64, 3, 1, 1), shape(2, 64, 28, 28, 256, 1), shape(2, 128, 14, 14, 128, 3, 1, 1),
            shape(2, 512, 14, 14, 128, 1), shape(2, 3, 112, 112, 96, 4, 4), shape(2, 96, 28, 28, 192, 2, 2)]


def out_hw(s) -> tuple:
    b, c, h, w, k, r, st, p = dims(s)
    return (h + 2 * p - r) // st + 1, (w + 2 * p - r) // st + 1


def flops(s) -> int:
    """2·B·Ho·Wo·K·C·R·R: one GEMM of the convolution (forward, data or weight gradient)."""
    b, c, h, w, k, r, _, _ = dims(s)
    ho, wo = out_hw(s)
    return 2 * b * ho * wo * k * c * r * r


def work(op: str, mode: str, s, dtype) -> int:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}")
    return flops(s)


def make_inputs(op: str, s, dtype: torch.dtype, device: torch.device, seed: int):
    """(x channels_last, weight), (dy,): randn, weight scaled by 1/sqrt(C·R·R)."""
    b, c, h, w, k, r, _, _ = dims(s)
    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *size: torch.randn(*size, generator=g, device=device, dtype=torch.float32)  # noqa: E731
    x = rnd(b, c, h, w).to(dtype).contiguous(memory_format=torch.channels_last)
    wt = (rnd(k, c, r, r) * (c * r * r) ** -0.5).to(dtype)
    ho, wo = out_hw(s)
    dy = rnd(b, k, ho, wo).to(dtype).contiguous(memory_format=torch.channels_last)
    return (x, wt), (dy,)


def _geometry(s) -> tuple:
    _, _, _, _, _, _, st, p = dims(s)
    return st, p


# ------------------------------------------------------------------------------- providers

def _conv(fn: Callable) -> Callable:
    """fn(x, w, stride, padding) -> a provider function of (x, w). The stride and padding of a cell
    cannot be read off x and w, so ``make_inputs`` records them per (x shape, w shape)."""
    def f(x, w):
        st, p = _GEOMETRY[(tuple(x.shape), tuple(w.shape))]
        return (fn(x, w, st, p),)
    return f


_GEOMETRY: dict = {}  # (x shape, weight shape) -> (stride, padding), filled by _make_inputs


def _make_inputs(op, s, dtype, device, seed):
    (x, w), grads = make_inputs(op, s, dtype, device, seed)
    key, geom = (tuple(x.shape), tuple(w.shape)), _geometry(s)
    if _GEOMETRY.setdefault(key, geom) != geom:
        raise ValueError(f"conv2d suite: two shapes with x {key[0]}, weight {key[1]} and different strides")
    return (x, w), grads


def torch_fn(op: str) -> Callable:
    return _conv(lambda x, w, st, p: F.conv2d(x, w, None, st, p))


def nchw_fn(op: str) -> Callable:
    """cuDNN on NCHW: x copied to NCHW once per input tensor (outside the timed region)."""
    state = {}

    def run(x, w, st, p):
        if state.get("src") is not x:
            state.update(src=x, nchw=x.contiguous())
        return F.conv2d(state["nchw"], w, None, st, p)
    return _conv(run)


def compiled_fn(op: str) -> Callable:
    fn = compile_fn(lambda x, w, st, p: F.conv2d(x, w, None, st, p))
    return _conv(fn)


def pydl_fn(op: str, backend: Optional[str] = None) -> Callable:
    from pydl.ops.conv2d import conv2d  # lazily: the harness runs (torch providers) without pydl

    kw = {} if backend is None else {"backend": backend}
    return _conv(lambda x, w, st, p: conv2d(x, w, None, st, p, **kw))


# --------------------------------------------------------------------------------- targets


def _tflops(r, ceiling=None) -> str:
    if not measured(r):
        return "—"
    v = float(r["value"])
    return f"{v:.3g}" + (f" ({100 * v / ceiling[0]:.0f}% of {ceiling[1]} matmul)" if ceiling else "")


def target(op: str, s) -> Optional[float]:
    """The speed-up over cuDNN (NHWC) pydl-triton must reach on a cell, or None (no target: the
    ConvNeXt convs)."""
    _, c, _, _, _, r, _, _ = dims(s)
    if c == 3 or r == 2:
        return None
    if r == 1:
        return 1.0
    return 0.9 if op == FWD else 0.8


def report(rows: list) -> list:
    """Markdown: every CUDA cell, pydl-triton against cuDNN NHWC (and NCHW for reference)."""
    by, ceil = {}, None
    for r in rows:
        if r.get("op") == CEILING_OP and r.get("mode") == "matmul" and r.get("device") == "cuda":
            ceil = (float(r["value"]), r["dtype"])
        elif r.get("suite") == NAME and r.get("device") == "cuda":
            by.setdefault((r["op"], r["shape"], r["dtype"]), {})[r["provider"]] = r
    lines = ["## conv2d targets (H100/H200): pydl-triton vs cuDNN", ""]
    counts = {"met": 0, "MISSED": 0, "not measured": 0}
    cells = []
    for (op, shp, dtype), per in by.items():
        goal = target(op, shp)
        p, base, nchw = per.get("pydl-triton"), per.get(EAGER), per.get("torch-nchw")
        speed = float(base["p50_ms"]) / float(p["p50_ms"]) if measured(p) and measured(base) else None
        if goal is None:
            verdict = "no target"
        elif p is not None and p.get("status") not in (OK, SKIPPED, None):
            verdict = "MISSED"
        elif speed is None:
            verdict = "not measured"
        else:
            verdict = "met" if speed >= goal else "MISSED"
        if verdict in counts:
            counts[verdict] += 1
        b, c, h, w, k, rr, st, pad = dims(shp)
        shown = {"met": "met", "MISSED": "**MISSED**"}.get(verdict, verdict)
        cells.append(f"| {MODE_NAMES.get(op, op)} | B={b} {c}→{k} {rr}×{rr} s{st} @{h} | {dtype} | {_tflops(p, ceil)} | "
                     f"{_tflops(base)} | {_tflops(nchw)} | {f'{speed:.2f}×' if speed else '—'} | "
                     f"{f'≥ {goal}×' if goal else '—'} | {shown}{flag_note([r for r in (p, base) if r])} |")
    if cells:
        lines += ["| mode | layer | dtype | pydl-triton TFLOP/s | cuDNN NHWC | cuDNN NCHW | speed-up | target | |",
                  "|---|---|---|---|---|---|---|---|---|", *cells, ""]
    else:
        lines += ["No CUDA cells in this run, so no target is measured "
                  "(`python -m pydl.bench conv2d --device cuda`).", ""]
    return lines + [f"conv2d targets: {counts['met']} met, {counts['MISSED']} missed, "
                    f"{counts['not measured']} not measured.", ""]


SUITE = Suite(
    name=NAME,
    ops=OPS,
    providers=(
        Provider("pydl-triton", lambda op: pydl_fn(op, "triton"), PYDL, devices=("cuda",)),
        Provider("pydl", lambda op: pydl_fn(op), PYDL, devices=("cuda",)),
        Provider(EAGER, lambda op: torch_fn(op), REFERENCE),
        Provider("torch-nchw", lambda op: nchw_fn(op)),
        Provider(COMPILE, lambda op: compiled_fn(op), COMPILED),
    ),
    make_inputs=lambda *a: _make_inputs(*a),
    shapes=lambda device, quick: default_shapes(device, quick),
    smoke_shapes=[shape(2, 16, 8, 8, 16, 3, 1, 1), shape(2, 16, 8, 8, 32, 1, 2)],
    probe_shape=shape(1, 16, 6, 6, 16, 3, 1, 1),
    work=lambda *a: work(*a),
    metric=THROUGHPUT,
    modes={FWD: ("fwd",), DGRAD: ("bwd",), WGRAD: ("bwd",)},
    out_names=("y",),
    grad_names={FWD: (), DGRAD: ("dx",), WGRAD: ("dweight",)},
    reduction_grads=("dweight",),
    diff_inputs={FWD: (), DGRAD: (0,), WGRAD: (1,)},
    plot_x=lambda s: dims(s)[1] * dims(s)[5] ** 2,
    x_label="C·R² (GEMM K)",
    plot_series=lambda s: f"B={dims(s)[0]}",
    report=lambda rows: report(rows),
)
