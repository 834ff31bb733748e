"""Softmax attention: ``pydl.ops.attention`` against SDPA's backends, FlexAttention and the naive
composition.

Ops (one per kind of masking; inputs q, k, v (B, H, N, D) [, mask]):
  attention             no mask
  attention.causal      is_causal=True
  attention.bool_mask   a bool key-padding mask (B, 1, 1, N): batch b keeps its first
                        N - (b + 1)·N // (2B + 2) keys (more than N/2, fewer than N)
  attention.float_mask  an additive float mask (N, N) in q's dtype, 0.5·randn (finite, so no row
                        is fully masked)
Shapes {B, H, N, D}: on CUDA N 512..16384 and D 64, 128 with B·N = 16384 tokens and H·D = 2048
(FlashAttention's benchmark setting), --quick N=2048 D=64 and N=8192 D=128; on CPU N 128..1024
with B·N = 2048 and H·D = 256, --quick N=256 D=64. ``--shapes BxHxNxD`` overrides.
Inputs: q, k, v ~ randn as (B, H, N, D) views of (B, N, H, D) tensors (what a projection, view and
transpose give, and what the op must read without copying); upstream gradient ~ randn.
Dtypes: bfloat16 on CUDA, float32 on CPU (``--dtype float32`` on CUDA for the fp32 target).

Providers:
  pydl             pydl.ops.attention.attention with no ``backend=`` (the dispatch users get:
                   Triton on CUDA, SDPA on CPU)
  pydl-triton      backend="triton" (CUDA only)
  sdpa-flash, sdpa-efficient, sdpa-cudnn, sdpa-math
                   F.scaled_dot_product_attention under ``sdpa_kernel([SDPBackend.X])``; a
                   backend that refuses a cell is skipped with SDPA's reasons (efficient and
                   cudnn: CUDA only)
  torch-eager      softmax(q kᵀ·scale + mask) v in torch ops (the reference provider)
  torch-compile    that composition under torch.compile
  flex             torch.nn.attention.flex_attention under torch.compile: a block mask for the
                   causal and bool-mask ops, a score_mod adding the float mask (CUDA only:
                   FlexAttention has no CPU backward, and a CPU forward compiles ~12 s a graph)
  The providers that materialize the B·H·Nq·Nk scores (torch-eager, torch-compile, sdpa-math)
  skip cells with more than 2^31 of them (on CUDA: N >= 8192 with D=64, N=16384 with D=128), so
  that the bwd cell, which holds every provider's graph at once, fits on an 80 GB card.
The gate's reference is the composition in float32, in chunks of query rows (recomputed for the
backward), so that it fits in memory at N=16384.

Work (FlashAttention's convention): fwd 4·B·H·Nq·Nk·D FLOPs (the two matmuls), halved for
causal; bwd 2.5× that; fwd+bwd 3.5×. Masks do not change the count. Reported as TFLOP/s and as
% of the matmul rate measured in the same run (bf16 on CUDA).

Targets (``report``; the issue's, for H100/H200, bf16 unless said), pydl's row against:
  plain and causal, D 64/128, N >= 2048: fwd >= 1.0x sdpa-flash and >= 0.8x the fastest SDPA
  backend; bwd >= 0.8x the fastest SDPA backend. Bool / float mask: >= 2x the fastest SDPA
  backend and >= 1.0x flex (every mode). fp32: >= 2x the fastest SDPA backend (every op, mode).
  Speed-up = the baseline's median time / pydl's. Each check: met, MISSED or not measured.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..core import (COMPILE, COMPILED, EAGER, MODES, OK, PYDL, REFERENCE, SKIPPED, THROUGHPUT, Provider,
                    Suite, Unsupported, compile_fn)
from ..gate import short
from ..report import CEILING_OP, flag_note, measured

NAME = "attention"
PLAIN, CAUSAL, BOOL_MASK, FLOAT_MASK = "attention", "attention.causal", "attention.bool_mask", "attention.float_mask"
OPS = (PLAIN, CAUSAL, BOOL_MASK, FLOAT_MASK)
N_CUDA = (512, 1024, 2048, 4096, 8192, 16384)
SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                 "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-math": "MATH"}
MAX_SCORES = 2 ** 31        # above this, the materializing providers are skipped
REF_CHUNK_SCORES = 2 ** 28  # the reference's scores per chunk of query rows
_WORK = {"fwd": (1, 1), "bwd": (5, 2), "fwd+bwd": (7, 2)}   # × the forward's FLOPs, as a fraction


# ---------------------------------------------------------------------------------- shapes

def shape(b: int, h: int, n: int, d: int) -> dict:
    return {"B": b, "H": h, "N": n, "D": d}


def dims(s) -> tuple:
    """(B, H, N, D) of a shape: a {B, H, N, D} dict, a (B, H, N, D) tuple or its string."""
    if isinstance(s, str):
        s = dict(p.split("=") for p in s.split(",")) if "=" in s else tuple(s.split("x"))
    if isinstance(s, dict):
        s = tuple(s[k] for k in "BHND")
    if len(s) != 4:
        raise ValueError(f"attention shapes are BxHxNxD, got {s!r}")
    return tuple(int(x) for x in s)


def default_shapes(device: torch.device, quick: bool) -> list:
    """B·N tokens and H·D model width fixed per device, so the work grows with N alone."""
    if device.type == "cuda":
        tokens, width = 16384, 2048
        nd = [(2048, 64), (8192, 128)] if quick else [(n, d) for d in (64, 128) for n in N_CUDA]
    else:
        tokens, width = 2048, 256
        nd = [(256, 64)] if quick else [(128, 64), (512, 64), (1024, 64), (512, 128)]
    return [shape(max(1, tokens // n), width // d, n, d) for n, d in nd]


def flops(op: str, mode: str, b: int, h: int, nq: int, nk: int, d: int) -> int:
    """FlashAttention's count: fwd 4·B·H·Nq·Nk·D, halved for causal; bwd 2.5×, fwd+bwd 3.5×."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}")
    if mode not in _WORK:
        raise ValueError(f"unknown mode {mode!r}")
    num, den = _WORK[mode]
    return 4 * b * h * nq * nk * d * num // (den * (2 if op == CAUSAL else 1))


def make_inputs(op: str, s, dtype: torch.dtype, device: torch.device, seed: int):
    """(q, k, v[, mask]), (do,): see the module docstring."""
    b, h, n, d = dims(s)
    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *size: torch.randn(*size, generator=g, device=device, dtype=torch.float32).to(dtype)
    q, k, v = (rnd(b, n, h, d).transpose(1, 2) for _ in range(3))
    grads = (rnd(b, h, n, d),)
    if op == BOOL_MASK:
        keep = n - (torch.arange(b, device=device) + 1) * n // (2 * b + 2)
        return (q, k, v, (torch.arange(n, device=device) < keep[:, None])[:, None, None, :]), grads
    if op == FLOAT_MASK:
        return (q, k, v, rnd(n, n) * 0.5), grads
    return (q, k, v), grads


# ------------------------------------------------------------------------------- providers

def naive(q, k, v, mask=None, causal: bool = False, row0: int = 0):
    """softmax(q kᵀ·scale + mask) v in torch ops; ``row0``: q's first row (causal chunks)."""
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if causal:
        rows = torch.arange(row0, row0 + s.shape[-2], device=s.device)[:, None]
        s = s.masked_fill(rows < torch.arange(s.shape[-1], device=s.device), float("-inf"))
    elif mask is not None and mask.dtype == torch.bool:
        s = s.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        s = s + mask
    return torch.softmax(s, dim=-1) @ v


def _check_scores(q, k, who: str) -> None:
    n = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
    if n > MAX_SCORES:
        raise Unsupported(f"{who} materializes B·H·Nq·Nk = {n:.3g} scores (> {MAX_SCORES:.3g}): not run")


def eager_fn(op: str) -> Callable:
    causal = op == CAUSAL

    def f(q, k, v, mask=None):
        _check_scores(q, k, EAGER)
        return (naive(q, k, v, mask, causal),)
    return f


def compiled_fn(op: str) -> Callable:
    """torch.compile of the composition (the score-count check stays outside the graph)."""
    causal, fn = op == CAUSAL, compile_fn(naive)

    def f(q, k, v, mask=None):
        _check_scores(q, k, COMPILE)
        return (fn(q, k, v, mask, causal),)
    return f


def reference_fn(op: str) -> Callable:
    """The composition in chunks of query rows, each recomputed for the backward (bounded memory)."""
    causal = op == CAUSAL

    def f(q, k, v, mask=None):
        b, h, nq, _ = q.shape
        rows = max(1, REF_CHUNK_SCORES // (b * h * k.shape[2]))
        if rows >= nq:
            return (naive(q, k, v, mask, causal),)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        outs = []
        for r0 in range(0, nq, rows):
            m = mask if mask is None or mask.dim() < 2 or mask.shape[-2] == 1 else mask[..., r0:r0 + rows, :]
            args = (q[:, :, r0:r0 + rows], k, v, m, causal, r0)
            outs.append(checkpoint(naive, *args, use_reentrant=False) if grad else naive(*args))
        return (torch.cat(outs, dim=2),)
    return f


def pydl_fn(op: str, backend: Optional[str] = None) -> Callable:
    from pydl.ops.attention import attention  # lazily: the harness runs (torch providers) without pydl

    kw, causal = ({} if backend is None else {"backend": backend}), op == CAUSAL

    def f(q, k, v, mask=None):
        return (attention(q, k, v, mask, is_causal=causal, **kw),)
    return f


def _refused(exc: RuntimeError) -> bool:
    return any(s in str(exc) for s in ("No available kernel", "No viable backend"))


def sdpa_fn(op: str, provider: str) -> Callable:
    """SDPA with one backend; its refusal is ``Unsupported``, with the reasons SDPA warns."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend, causal = getattr(SDPBackend, SDPA_BACKENDS[provider]), op == CAUSAL

    def call(q, k, v, mask):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)

    def f(q, k, v, mask=None):
        if provider == "sdpa-math":
            _check_scores(q, k, provider)
        try:
            return (call(q, k, v, mask),)
        except RuntimeError as exc:
            if not _refused(exc):
                raise
            with warnings.catch_warnings(record=True) as caught:  # again, to hear the reasons
                warnings.simplefilter("always")
                try:
                    call(q, k, v, mask)
                except RuntimeError:
                    pass
            said = (" ".join(str(w.message).split("(Triggered")[0].split()) for w in caught)
            why = "; ".join(m for m in said if not m.endswith("because:") and "runtime disabled" not in m)
            raise Unsupported(f"{provider} refuses this cell: {why or short(exc)}"[:300]) from None
    return f


def _lookup(mask):
    """(b, h, q_idx, kv_idx) -> the mask's entry (broadcast dims indexed at 0), for flex."""
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    one = [n == 1 for n in m.shape]
    return lambda b, h, qi, kv: m[0 if one[0] else b, 0 if one[1] else h, 0 if one[2] else qi,
                                  0 if one[3] else kv]


def flex_fn(op: str) -> Callable:
    """Compiled flex_attention; the block mask / score_mod is made once per inputs (not timed).

    No dynamo reset here (unlike ``compile_fn``): flex comes after torch-compile in the provider
    order, so a reset would only throw torch-compile's fresh graphs away.
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    fn, state = torch.compile(flex_attention, dynamic=False), {}

    def kwargs(q, k, mask) -> dict:
        key = (tuple(q.shape), tuple(k.shape), q.device)
        if state.get("key") != key or state.get("mask") is not mask:
            nq, nk = q.shape[2], k.shape[2]
            if op == CAUSAL:
                kw = {"block_mask": create_block_mask(lambda b, h, qi, kv: qi >= kv, None, None, nq, nk,
                                                      device=q.device)}
            elif op == BOOL_MASK:
                kw = {"block_mask": create_block_mask(_lookup(mask), q.shape[0], None, nq, nk, device=q.device)}
            elif op == FLOAT_MASK:
                at = _lookup(mask)
                kw = {"score_mod": lambda score, b, h, qi, kv: score + at(b, h, qi, kv)}
            else:
                kw = {}
            state.update(key=key, mask=mask, kw=kw)
        return state["kw"]

    def f(q, k, v, mask=None):
        try:
            return (fn(q, k, v, **kwargs(q, k, mask)),)
        except NotImplementedError as exc:  # e.g. no backward on this device
            raise Unsupported(f"flex: {short(exc)}") from None
    return f


# --------------------------------------------------------------------------------- targets

FASTEST = "fastest SDPA backend"
BF16, FP32 = ("bfloat16",), ("float32",)


@dataclass(frozen=True)
class Target:
    label: str
    baseline: str      # a provider, or FASTEST (the fastest SDPA backend that took the cell)
    speedup: float     # at least this: baseline time / pydl time
    ops: tuple
    modes: tuple
    dtypes: tuple
    min_n: int = 0
    head_dims: tuple = ()

    def applies(self, op, mode, n, d, dtype) -> bool:
        return (op in self.ops and mode in self.modes and dtype in self.dtypes and n >= self.min_n
                and (not self.head_dims or d in self.head_dims))


TARGETS = (
    Target("fwd ≥ 1.0× sdpa-flash (plain, causal; D 64/128, N ≥ 2k)", "sdpa-flash", 1.0,
           (PLAIN, CAUSAL), ("fwd",), BF16, 2048, (64, 128)),
    Target("fwd ≥ 0.8× fastest SDPA (plain, causal; D 64/128, N ≥ 2k)", FASTEST, 0.8,
           (PLAIN, CAUSAL), ("fwd",), BF16, 2048, (64, 128)),
    Target("bwd ≥ 0.8× fastest SDPA (plain, causal; D 64/128, N ≥ 2k)", FASTEST, 0.8,
           (PLAIN, CAUSAL), ("bwd",), BF16, 2048, (64, 128)),
    Target("masked ≥ 2× fastest SDPA (bool, float mask)", FASTEST, 2.0, (BOOL_MASK, FLOAT_MASK), MODES, BF16),
    Target("masked ≥ 1.0× flex (bool, float mask)", "flex", 1.0, (BOOL_MASK, FLOAT_MASK), MODES, BF16),
    Target("fp32 ≥ 2× fastest SDPA (every op)", FASTEST, 2.0, OPS, MODES, FP32),
)


def _tflops(r, ceiling=None) -> str:
    if not measured(r):
        return ""
    v = float(r["value"])
    return f"{v:.3g}" + (f" ({100 * v / ceiling[0]:.0f}% of {ceiling[1]} matmul)" if ceiling else "")


def check(t: Target, per: dict) -> tuple:
    """(verdict, why, pydl row, baseline name, baseline row) of one target on one cell's rows
    ({provider: row}); verdict "met", "MISSED" or "not measured"."""
    p = per.get("pydl") or per.get("pydl-triton")
    if t.baseline == FASTEST:
        sdpa = [(n, r) for n, r in per.items() if n in SDPA_BACKENDS and measured(r)]
        name, base = min(sdpa, key=lambda nr: float(nr[1]["p50_ms"])) if sdpa else (FASTEST, None)
    else:
        name, base = t.baseline, per.get(t.baseline)
    if p is not None and p.get("status") not in (OK, SKIPPED):
        return "MISSED", f"pydl {p['status']}", p, name, base
    for who, r in (("pydl", p), (name, base)):
        if not measured(r):
            return "not measured", (f"{who}: " + (f"{r.get('status')} {r.get('note') or ''}".strip()
                                                  if r is not None else "no row"))[:160], p, name, base
    met = float(base["p50_ms"]) / float(p["p50_ms"]) >= t.speedup
    return ("met" if met else "MISSED"), "", p, name, base


def report(rows: list) -> list:
    """Markdown: each target on each CUDA cell it applies to, then a count per target."""
    by, ceil = {}, None
    for r in rows:
        if r.get("op") == CEILING_OP and r.get("mode") == "matmul" and r.get("device") == "cuda":
            ceil = (float(r["value"]), r["dtype"])
        elif r.get("suite") == NAME and r.get("device") == "cuda":
            by.setdefault((r["op"], r["mode"], r["shape"], r["dtype"]), {})[r["provider"]] = r
    cells, counts = [], {t.label: {"met": 0, "MISSED": 0, "not measured": 0} for t in TARGETS}
    for (op, mode, shp, dtype), per in by.items():
        _, _, n, d = dims(shp)
        for t in (t for t in TARGETS if t.applies(op, mode, n, d, dtype)):
            verdict, why, p, name, base = check(t, per)
            counts[t.label][verdict] += 1
            speed = f"{float(base['p50_ms']) / float(p['p50_ms']):.2f}×" if measured(p) and measured(base) else ""
            shown = {"met": "met", "MISSED": "**MISSED**"}.get(verdict, verdict)
            cells.append(f"| {t.label.split(' (')[0]} | {op} {mode} N={n} D={d} | {dtype} | {_tflops(p, ceil)} | "
                         f"{name} | {_tflops(base)} | {speed} | {shown}{f' ({why})' if why else ''}"
                         f"{flag_note([r for r in (p, base) if r is not None])} |")
    lines = ["## Attention targets (H100/H200): pydl vs SDPA and FlexAttention", ""]
    if cells:
        lines += ["| target | cell | dtype | pydl TFLOP/s | baseline | baseline TFLOP/s | speed-up | |",
                  "|---|---|---|---|---|---|---|---|", *cells, ""]
    else:
        lines += ["No CUDA cells in this run, so no target is measured "
                  "(`python -m pydl.bench attention --device cuda --dtype bfloat16 float32`).", ""]
    lines += ["| target | met | MISSED | not measured |", "|---|---|---|---|"]
    for t in TARGETS:
        c = counts[t.label]
        lines.append(f"| {t.label} | {c['met']} | {c['MISSED']} | "
                     f"{c['not measured'] if sum(c.values()) else 'no cells in this run'} |")
    met, missed, untried = (sum(c[k] for c in counts.values()) for k in ("met", "MISSED", "not measured"))
    return lines + ["", f"Attention targets: {untried} check(s) not measured; {met} of {met + missed} "
                        "measured checks met.", ""]


def work(op: str, mode: str, s, dtype) -> int:
    b, h, n, d = dims(s)
    return flops(op, mode, b, h, n, n, d)


SUITE = Suite(
    name=NAME,
    ops=OPS,
    providers=(
        Provider("pydl", lambda op: pydl_fn(op), PYDL),
        Provider("pydl-triton", lambda op: pydl_fn(op, "triton"), PYDL, devices=("cuda",)),
        *(Provider(name, lambda op, name=name: sdpa_fn(op, name),
                   devices=("cuda",) if name in ("sdpa-efficient", "sdpa-cudnn") else ("cpu", "cuda"))
          for name in SDPA_BACKENDS),
        Provider(EAGER, lambda op: eager_fn(op), REFERENCE),
        Provider(COMPILE, lambda op: compiled_fn(op), COMPILED),
        Provider("flex", lambda op: flex_fn(op), COMPILED, devices=("cuda",)),
    ),
    make_inputs=lambda *a: make_inputs(*a),
    shapes=lambda device, quick: default_shapes(device, quick),
    smoke_shapes=[shape(2, 2, 80, 64)],
    probe_shape=shape(1, 2, 32, 64),
    work=lambda *a: work(*a),
    metric=THROUGHPUT,
    out_names=("o",),
    grad_names=("dq", "dk", "dv"),
    diff_inputs=(0, 1, 2),
    reference=lambda op: reference_fn(op),
    plot_x=lambda s: dims(s)[2],
    x_label="N (sequence length)",
    plot_series=lambda s: f"D={dims(s)[3]}",
    report=lambda rows: report(rows),
)
