"""Per-call cost: what a pydl call costs next to the torch call it replaces (DESIGN §3).

Cells (µs per call, median; the ratio pydl / torch is the number that matters):
  ops.layer_norm       fwd      8x64, 1x64   pydl.ops.layer_norm       vs F.layer_norm
  ops.layer_norm_gelu  fwd      8x64         pydl.ops.layer_norm_gelu  vs F.gelu(F.layer_norm)
  ops.add_layer_norm   fwd      8x64         pydl.ops.add_layer_norm   vs x + r, then F.layer_norm
  nn.LayerNorm         fwd+bwd  8x64; 512x768 (BERT-base), 1576x192 (ViT-tiny); on CUDA also
                                8192x768 (16 sequences of 512): pydl.nn.LayerNorm(N) vs
                                torch.nn.LayerNorm(N), forward then autograd.grad of x, weight, bias
Providers: ``pydl`` (the default backend choice: no ``backend=`` argument, so the dispatch path
users get is timed), ``pydl-native`` (forced; functional ops only) and ``torch-eager``.
Targets: pydl <= 2x torch's time for the tiny cells (8x64, 1x64), pydl <= 1x (at least as fast)
for the real sizes. Timing: wall clock on both devices (CUDA synced only at sample ends), no L2
flush, each sample a loop of calls lasting >= 2 ms.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..core import EAGER, LATENCY, PYDL, REFERENCE, ModuleCall, Provider, Suite
from ..report import flag_note, fmt_us

NAME = "overhead"
OPS = ("ops.layer_norm", "ops.layer_norm_gelu", "ops.add_layer_norm", "nn.LayerNorm")
EPS = 1e-5
TINY = {(8, 64), (1, 64)}
TARGETS = {"tiny": 2.0, "real": 1.0}   # max pydl time / torch time


def shapes(device: torch.device, quick: bool) -> dict:
    real = [(512, 768), (1576, 192)] + ([(16 * 512, 768)] if device.type == "cuda" else [])
    return {"ops.layer_norm": [(8, 64), (1, 64)], "ops.layer_norm_gelu": [(8, 64)],
            "ops.add_layer_norm": [(8, 64)], "nn.LayerNorm": [(8, 64)] + real}


def make_inputs(op, shape, dtype, device, seed):
    """(x, [r,] w, b), grads: random (w = 1 + 0.1·randn, b = 0.1·randn), never zeros."""
    m, n = shape
    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, device=device).to(dtype)
    x, w, b = rnd(m, n), 1 + 0.1 * rnd(n), 0.1 * rnd(n)
    if op == "ops.add_layer_norm":
        return (x, rnd(m, n), w, b), (rnd(m, n), rnd(m, n))
    return (x, w, b), (rnd(m, n),)


def _module(cls) -> Callable:
    return ModuleCall(lambda x, w, b: cls(x.shape[-1], eps=EPS, device=x.device, dtype=x.dtype))


def torch_fn(op: str) -> Callable:
    if op == "ops.layer_norm":
        return lambda x, w, b: (F.layer_norm(x, (x.shape[-1],), w, b, EPS),)
    if op == "ops.layer_norm_gelu":
        return lambda x, w, b: (F.gelu(F.layer_norm(x, (x.shape[-1],), w, b, EPS)),)
    if op == "ops.add_layer_norm":
        def add(x, r, w, b):
            h = x + r
            return (F.layer_norm(h, (h.shape[-1],), w, b, EPS), h)
        return add
    return _module(torch.nn.LayerNorm)


def pydl_fn(op: str, backend=None) -> Callable:
    import pydl  # lazily: the harness runs (torch providers) without pydl

    kw = {} if backend is None else {"backend": backend}   # no backend=: the users' dispatch path
    if op == "ops.layer_norm":
        return lambda x, w, b: (pydl.ops.layer_norm(x, w, b, EPS, **kw),)
    if op == "ops.layer_norm_gelu":
        return lambda x, w, b: (pydl.ops.layer_norm_gelu(x, w, b, EPS, approximate="none", **kw),)
    if op == "ops.add_layer_norm":
        return lambda x, r, w, b: pydl.ops.add_layer_norm(x, r, w, b, EPS, **kw)
    if backend is not None:
        raise ValueError("pydl.nn.LayerNorm has no backend argument: see the pydl row")
    return _module(pydl.nn.LayerNorm)


def target(op: str, shape: str):
    """(kind, max pydl/torch time ratio) of a cell."""
    kind = "tiny" if tuple(int(d) for d in shape.split("x")) in TINY else "real"
    return kind, TARGETS[kind]


def report(rows: list) -> list:
    """Markdown: µs per call, pydl / torch, and whether each cell meets its target."""
    by = {}
    for r in rows:
        if r.get("suite") == NAME and r.get("p50_ms") not in ("", None):
            by.setdefault((r["op"], r["mode"], r["shape"], r["dtype"], r["device"]), {})[r["provider"]] = r
    lines = ["## Call overhead: pydl vs torch", "",
             "| cell | dtype | pydl µs | torch µs | pydl / torch | target | |", "|---|---|---|---|---|---|---|"]
    met = total = 0
    for (op, mode, shape, dtype, dev), per in by.items():
        p, t = per.get("pydl"), per.get(EAGER)
        if p is None or t is None:
            continue
        pu, tu = float(p["p50_ms"]) * 1e3, float(t["p50_ms"]) * 1e3
        kind, limit = target(op, shape)
        ok = pu / tu <= limit
        met, total = met + ok, total + 1
        lines.append(f"| {op} {mode} {shape} | {dtype} | {fmt_us(pu)} | {fmt_us(tu)} | {pu / tu:.3g} | "
                     f"≤ {limit:g} ({kind}) | {'met' if ok else '**MISSED**'}"
                     f"{flag_note((p, t))} |")
    if total == 0:
        return []
    return lines + ["", f"{met} of {total} overhead targets met.", ""]


SUITE = Suite(
    name=NAME,
    ops=OPS,
    providers=(
        Provider("pydl", lambda op: pydl_fn(op), PYDL),
        Provider("pydl-native", lambda op: pydl_fn(op, "native"), PYDL),
        Provider(EAGER, lambda op: torch_fn(op), REFERENCE),
    ),
    make_inputs=lambda *a: make_inputs(*a),
    shapes=lambda device, quick: shapes(device, quick),
    smoke_shapes={op: [(8, 64)] for op in OPS},
    probe_shape=(4, 64),
    metric=LATENCY,
    modes=lambda op: ("fwd+bwd",) if op == "nn.LayerNorm" else ("fwd",),
    out_names=lambda op: ("y", "h") if op == "ops.add_layer_norm" else ("y",),
    grad_names=("dx", "dw", "db"),
    reduction_grads=("dw", "db"),
    dtypes=lambda device: [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else []),
    timing=dict(clock="wall", flush_l2=False, min_sample_s=2e-3, max_calls_per_sample=2000),
    report=lambda rows: report(rows),
)
