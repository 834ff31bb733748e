"""Beam search: the fused step ``pydl.ops.beam_search_step`` against the same step in torch ops.

Op ``beam_search_step``. A shape is {B, K, V}: logits (B*K, V), beam scores (B, K), 2K candidates per
batch item (Hugging Face's count with one EOS id). CUDA: B in {1, 8, 32} x K in {4, 8} x V in {32000,
50257, 128256} (--quick: four of them); CPU: the issue's target cell B=8 K=4 V=50257 plus B=1 and
B=32 (--quick: the target and B=1). float32 logits (what Hugging Face's step reads; ``--dtype
bfloat16`` reads bf16 logits directly). ``--shapes`` takes "B=..,K=..,V=..".

Providers:
  pydl          pydl.ops.beam_search_step with no ``backend=`` (what users get)
  pydl-native   backend="native"
  torch-eager   log_softmax(logits.float()) + beam_scores, view (B, K*V), topk, % and // (the step as
                Hugging Face writes it: the baseline)
  torch-compile the same under torch.compile
The gate compares with pydl's torch backend (the same composition with ties ordered by flat index,
which every pydl backend follows; plain topk orders ties arbitrarily).
Work: the logits read once (B*K*V elements). GB/s and % of the copy bandwidth of the same run.

Targets (``report``): CPU B=8 K=4 V=50257 float32: pydl >= 2x torch-eager. GPU (H100/H200): >= 5x
torch-eager and within 1.3x of reading the logits once at the measured copy bandwidth (>= 77% of it).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..core import COMPILE, EAGER, PYDL, REFERENCE, Provider, Suite, compile_provider, shape_dims, shape_str
from ..report import cells_by, pct_of_ceiling, target_row

NAME = "beam_search"
OP = "beam_search_step"
CPU_TARGET = {"B": 8, "K": 4, "V": 50257}


def shape(b: int, k: int, v: int) -> dict:
    return {"B": b, "K": k, "V": v}


def dims(s) -> tuple:
    """(B, K, V) of a shape dict, tuple or "B=..,K=..,V=.." string."""
    return shape_dims(s, ("B", "K", "V"), NAME)


def default_shapes(device: torch.device, quick: bool) -> list:
    if device.type == "cuda":
        if quick:
            return [shape(8, 4, 50257), shape(1, 4, 32000), shape(32, 8, 128256), shape(8, 8, 128256)]
        return [shape(b, k, v) for b in (1, 8, 32) for k in (4, 8) for v in (32000, 50257, 128256)]
    if quick:
        return [dict(CPU_TARGET), shape(1, 4, 50257)]
    return [dict(CPU_TARGET), shape(1, 4, 50257), shape(32, 4, 50257), shape(8, 8, 32000)]


def work(op: str, mode: str, s, dtype) -> int:
    b, k, v = dims(s)
    return b * k * v * torch.empty((), dtype=dtype).element_size()


def make_inputs(op: str, s, dtype: torch.dtype, device: torch.device, seed: int):
    """(logits, beam_scores), (): logits like an LM's (spread ~3), decreasing beam scores."""
    b, k, v = dims(s)
    g = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(b * k, v, generator=g, device=device) * 3).to(dtype)
    scores = -torch.rand(b, k, generator=g, device=device).cumsum(1) * 4
    return (logits, scores), ()


def torch_fn(op: str) -> Callable:
    def f(logits, beam_scores):
        B, K = beam_scores.shape
        V = logits.shape[1]
        s = torch.log_softmax(logits.float(), dim=-1).view(B, K, V) + beam_scores[..., None]
        scores, flat = torch.topk(s.view(B, K * V), 2 * K, dim=1)
        return scores, flat % V, flat // V
    return f


def pydl_fn(op: str, backend: Optional[str] = None) -> Callable:
    from pydl.ops.beam_search_step import beam_search_step  # lazily: the harness runs without pydl

    kw = {} if backend is None else {"backend": backend}

    def f(logits, beam_scores):
        return beam_search_step(logits, beam_scores, 2 * beam_scores.shape[1], **kw)
    return f


# --------------------------------------------------------------------------------- targets

def report(rows: list) -> list:
    """Markdown: the CPU target cell, then the GPU targets on every CUDA cell."""
    by = cells_by(rows, NAME, ("device", "shape", "dtype"), mode="fwd")
    lines = ["## Beam search step targets", "",
             "| target | cell | pydl | torch ops | speed-up | pydl % of copy | verdict |",
             "|---|---|---|---|---|---|---|"]

    def row(target, key, ok_fn):
        per = by.get(key, {})
        lines.append(target_row([target, f"{key[1]} {key[2]}"], per.get("pydl"), per.get(EAGER), ok_fn, "us"))

    row("CPU ≥ 2× torch ops", ("cpu", shape_str(CPU_TARGET), "float32"),
        lambda sp, p: sp >= 2)
    cuda = sorted(k for k in by if k[0] == "cuda")
    for key in cuda:
        row("GPU ≥ 5× torch ops, ≥ 77% copy", key,
            lambda sp, p: sp >= 5 and (pct_of_ceiling(p) or 0) >= 77)
    if not cuda:
        lines.append("| GPU ≥ 5×, ≥ 77% of copy | every CUDA cell | — | — | — | — | not measured (no CUDA cells) |")
    return lines + [""]


def _reference(op: str) -> Callable:
    return pydl_fn(op, "torch")


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
    smoke_shapes=[shape(2, 4, 1000), shape(1, 3, 97)],
    probe_shape=shape(1, 2, 64),
    work=lambda *a: work(*a),
    modes=("fwd",),
    out_names=("scores", "tokens", "beams"),
    diff_inputs=(),
    reference=lambda op: _reference(op),
    dtypes=lambda device: [torch.float32],
    plot_x=lambda s: dims(s)[2],
    x_label="V (vocabulary)",
    plot_series=lambda s: "B={} K={}".format(*dims(s)[:2]),
    report=lambda rows: report(rows),
)
