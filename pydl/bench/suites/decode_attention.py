"""Decode attention: ``pydl.ops.decode_attention`` (one query token against a KV cache) against SDPA
over the whole cache with a key-padding mask, and the naive composition.

Op ``decode_attention`` (fwd only: an inference op). Shapes {B, H, Hkv, L, E}: q (B, H, 1, E), caches
(B, Hkv, L, E) allocated at Lmax = L, every row's length L (the whole cache valid: the bandwidth
case). GQA 1 (H == Hkv) and 8. On CUDA L 1k..32k, B 1..64, H 32, E 128; --quick four of them.
On CPU L 512..4096, B 1 and 8, (H, Hkv, E) (12, 12, 64) and (32, 4, 128); --quick the issue's CPU
target shape B=8 H=12 L=2048 E=64 and one GQA-8 shape. ``--shapes`` takes "B=..,H=..,Hkv=..,L=..,E=..".
Dtypes: bfloat16 on CUDA, float32 on CPU (``--dtype`` for the others).

Providers:
  pydl          pydl.ops.decode_attention with no ``backend=`` (what users get)
  pydl-native   backend="native"
  torch-eager   F.scaled_dot_product_attention over the whole cache with a (B, 1, 1, L) bool
                key-padding mask from the lengths, enable_gqa (the reference provider)
  naive         softmax(q kᵀ·scale, masked) v in torch ops, K/V heads repeated for GQA
Work: the bytes one call must move: the valid prefix of K and V read once, q read, out written
(B·Hkv·len·(E + Ev) + B·H·E + B·H·Ev elements). Reported as GB/s and % of the copy bandwidth
measured in the same run.

Targets (``report``): CPU B=8 H=12 L=2048 E=64 float32: pydl >= 1.5x torch-eager (SDPA).
GPU (H100/H200): pydl >= 80% of the copy bandwidth for L >= 4k, and >= 1.5x SDPA, on every cell.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..core import EAGER, PYDL, REFERENCE, Provider, Suite, shape_str
from ..report import cells_by, pct_of_ceiling, target_row

NAME = "decode_attention"
OP = "decode_attention"
CPU_TARGET = {"B": 8, "H": 12, "Hkv": 12, "L": 2048, "E": 64}


def shape(b: int, h: int, hkv: int, l: int, e: int) -> dict:  # noqa: E741
    return {"B": b, "H": h, "Hkv": hkv, "L": l, "E": e}


def dims(s) -> tuple:
    """(B, H, Hkv, L, E) of a shape dict, tuple or its "B=..,H=..,Hkv=..,L=..,E=.." string."""
    if isinstance(s, str):
        s = dict(p.split("=") for p in s.split(",")) if "=" in s else tuple(s.split("x"))
    if isinstance(s, dict):
        s = tuple(s[k] for k in ("B", "H", "Hkv", "L", "E"))
    if len(s) != 5:
        raise ValueError(f"decode_attention shapes are B=..,H=..,Hkv=..,L=..,E=.., got {s!r}")
    return tuple(int(x) for x in s)


def default_shapes(device: torch.device, quick: bool) -> list:
    if device.type == "cuda":
        if quick:
            return [shape(1, 32, 4, 4096, 128), shape(1, 32, 4, 32768, 128), shape(16, 32, 32, 16384, 128),
                    shape(64, 32, 4, 4096, 128)]
        return [shape(b, 32, hkv, l, 128) for hkv in (32, 4) for b in (1, 16, 64)
                for l in (1024, 4096, 16384, 32768) if b * hkv * l <= 64 * 32 * 4096]  # <= 4.3 GB bf16 cache
    if quick:
        return [dict(CPU_TARGET), shape(1, 32, 4, 1024, 128)]
    return [shape(b, h, hkv, l, e) for (h, hkv, e) in ((12, 12, 64), (32, 4, 128)) for b in (1, 8)
            for l in (512, 1024, 2048, 4096)]


def bytes_moved(b: int, h: int, hkv: int, length: int, e: int, ev: int, elem: int) -> int:
    """The valid prefix of K and V once, q read, out written."""
    return (b * hkv * length * (e + ev) + b * h * e + b * h * ev) * elem


def work(op: str, mode: str, s, dtype) -> int:
    b, h, hkv, length, e = dims(s)
    return bytes_moved(b, h, hkv, length, e, e, torch.empty((), dtype=dtype).element_size())


def make_inputs(op: str, s, dtype: torch.dtype, device: torch.device, seed: int):
    """(q, k_cache, v_cache, cache_seqlens), (): every row's length L."""
    b, h, hkv, length, e = dims(s)
    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *size: torch.randn(*size, generator=g, device=device, dtype=torch.float32).to(dtype)  # noqa: E731
    q, k, v = rnd(b, h, 1, e), rnd(b, hkv, length, e), rnd(b, hkv, length, e)
    return (q, k, v, torch.full((b,), length, dtype=torch.int32, device=device)), ()


def _padding_mask(k: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1, L) bool: position j of row b is valid."""
    return (torch.arange(k.shape[2], device=k.device) < lens[:, None])[:, None, None, :]


def sdpa_fn(op: str) -> Callable:
    def f(q, k, v, lens):
        return (F.scaled_dot_product_attention(q, k, v, attn_mask=_padding_mask(k, lens),
                                               enable_gqa=k.shape[1] != q.shape[1]),)
    return f


def naive_fn(op: str) -> Callable:
    def f(q, k, v, lens):
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        s = s.masked_fill(~_padding_mask(k, lens), float("-inf"))
        return (torch.softmax(s, dim=-1) @ v,)
    return f


def pydl_fn(op: str, backend: Optional[str] = None) -> Callable:
    from pydl.ops.decode_attention import decode_attention  # lazily: the harness runs without pydl

    kw = {} if backend is None else {"backend": backend}

    def f(q, k, v, lens):
        return (decode_attention(q, k, v, lens, **kw),)
    return f


# --------------------------------------------------------------------------------- targets

def report(rows: list) -> list:
    """Markdown: the CPU target cell, then the GPU targets on every CUDA cell."""
    by = cells_by(rows, NAME, ("device", "shape", "dtype"), mode="fwd")
    lines = ["## Decode attention targets", "",
             "| target | cell | pydl | SDPA (torch-eager) | speed-up | pydl % of copy | verdict |",
             "|---|---|---|---|---|---|---|"]
    target_cell = ("cpu", shape_str(CPU_TARGET), "float32")
    per = by.get(target_cell, {})
    lines.append(target_row(["CPU ≥ 1.5× SDPA", "B=8 H=12 L=2048 E=64 float32"], per.get("pydl"), per.get(EAGER),
                            lambda sp, p: sp >= 1.5, "us", "" if per else " (no such cell in this run)"))
    cuda = [(key, per) for key, per in by.items() if key[0] == "cuda"]
    for (_, shp, dtype), per in cuda:
        b, h, hkv, length, e = dims(shp)
        long = length >= 4096  # the bandwidth target applies from 4k positions on
        lines.append(target_row([f"GPU ≥ 1.5× SDPA{', ≥ 80% copy' if long else ''}",
                                 f"B={b} H={h} Hkv={hkv} L={length} E={e} {dtype}"], per.get("pydl"), per.get(EAGER),
                                lambda sp, p: sp >= 1.5 and (not long or (pct_of_ceiling(p) or 0) >= 80), "us"))
    if not cuda:
        lines.append("| GPU ≥ 80% of copy (L ≥ 4k) and ≥ 1.5× SDPA | every CUDA cell | — | — | — | — | "
                     "not measured (no CUDA cells in this run) |")
    return lines + [""]


SUITE = Suite(
    name=NAME,
    ops=(OP,),
    providers=(
        Provider("pydl", lambda op: pydl_fn(op), PYDL),
        Provider("pydl-native", lambda op: pydl_fn(op, "native"), PYDL),
        Provider(EAGER, lambda op: sdpa_fn(op), REFERENCE),
        Provider("naive", lambda op: naive_fn(op)),
    ),
    make_inputs=lambda *a: make_inputs(*a),
    shapes=lambda device, quick: default_shapes(device, quick),
    smoke_shapes=[shape(2, 4, 2, 97, 64), shape(1, 8, 1, 300, 32)],
    probe_shape=shape(1, 2, 1, 16, 64),
    work=lambda *a: work(*a),
    modes=("fwd",),
    out_names=("o",),
    diff_inputs=(),
    plot_x=lambda s: dims(s)[3],
    x_label="L (cache length)",
    plot_series=lambda s: "B={} GQA={} E={}".format(*(lambda d: (d[0], d[1] // d[2], d[4]))(dims(s))),
    report=lambda rows: report(rows),
)
