"""End-to-end beam search: ``pydl.generation.beam_search`` on pydl's GPT against Hugging Face
``generate(num_beams=K, do_sample=False)`` on the same weights.

Op ``beam_generate``. A shape is {B, K, P, T, L, D}: B prompts of P tokens, K beams, T new tokens,
a GPT-2-architecture model with L layers of width D (D // 64 heads, GPT-2's vocabulary of 50257,
random weights — the Hugging Face model is built and converted with ``pydl.models.from_transformers``,
so both providers hold identical weights). No EOS (every beam runs T steps: the same work for both).
CUDA: GPT-2-small (L=12, D=768) at B 1 and 8, K 4, P 32, T 64; CPU: GPT-2-small at B=1, K=4, P=16,
T=16 and a 4-layer D=256 model (--quick: the small one only). float32 weights. The gate compares the
sequences (exactly) and their scores.

Providers:
  pydl          pydl.generation.beam_search (pydl's GPT: fused residual LayerNorms, the pre-allocated
                KV cache read by decode_attention, the fused beam_search_step)
  torch-eager   transformers' generate on GPT2LMHeadModel (SDPA attention, its DynamicCache) — the
                reference provider
Metric: latency per call (one whole generation); the report gives tokens/s (B·T / time).

Targets (``report``): GPU (H100/H200): pydl >= 2x Hugging Face generate for the same model and weights.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..core import EAGER, LATENCY, PYDL, REFERENCE, Provider, Suite, shape_dims
from ..report import cell_time, cells_by, flag_note, measured, speedup, verdict

NAME = "generate"
OP = "beam_generate"
KEYS = ("B", "K", "P", "T", "L", "D")
VOCAB = 50257
_MODELS: dict = {}  # (L, D, device) -> (hf model, pydl model), built once per process


def shape(b: int, k: int, p: int, t: int, layers: int = 12, d: int = 768) -> dict:
    return {"B": b, "K": k, "P": p, "T": t, "L": layers, "D": d}


def dims(s) -> tuple:
    """(B, K, P, T, L, D) of a shape dict, tuple or "B=..,K=..,P=..,T=..,L=..,D=.." string."""
    return shape_dims(s, KEYS, NAME)


def default_shapes(device: torch.device, quick: bool) -> list:
    if device.type == "cuda":
        return [shape(1, 4, 32, 64), shape(8, 4, 32, 64)] if quick else \
            [shape(b, k, 32, 64) for b in (1, 8) for k in (4, 8)]
    small = shape(1, 4, 16, 16, 4, 256)
    return [small] if quick else [small, shape(1, 4, 16, 16)]


def make_inputs(op: str, s, dtype: torch.dtype, device: torch.device, seed: int):
    """(input_ids (B, P) int64, config (4,) CPU int64 = (K, T, L, D)), (): the config tensor tells the
    providers which model and how many beams / tokens (read on the host: no device sync)."""
    b, k, p, t, layers, d = dims(s)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, p), generator=g).to(device)
    return (ids, torch.tensor([k, t, layers, d])), ()


def _models(layers: int, d: int, device: torch.device) -> tuple:
    key = (layers, d, str(device))
    if key not in _MODELS:
        from pydl.models import from_transformers
        from pydl.models._timm import import_transformers

        tf = import_transformers()
        tf.logging.set_verbosity_error()
        torch.manual_seed(0)
        cfg = tf.GPT2Config(n_layer=layers, n_embd=d, n_head=max(1, d // 64), vocab_size=VOCAB, n_positions=1024)
        hf = tf.GPT2LMHeadModel(cfg).eval()
        pd = from_transformers(hf).eval()
        _MODELS[key] = (hf.to(device), pd.to(device))
    return _MODELS[key]


def _run(which: int) -> Callable:
    def f(ids, config):
        k, t, layers, d = config.tolist()
        model = _models(layers, d, ids.device)[which]
        mask = torch.ones_like(ids)
        with torch.no_grad():
            if which == 0:
                out = model.generate(ids, attention_mask=mask, num_beams=k, do_sample=False, max_new_tokens=t,
                                     min_new_tokens=t, eos_token_id=None, pad_token_id=0, early_stopping=False,
                                     return_dict_in_generate=True, output_scores=True)
            else:
                from pydl.generation import beam_search

                out = beam_search(model, ids, mask, num_beams=k, max_new_tokens=t, min_new_tokens=t,
                                  eos_token_id=None, pad_token_id=0, early_stopping=False)
        return out.sequences, out.sequences_scores
    return f


def hf_fn(op: str) -> Callable:
    return _run(0)


def pydl_fn(op: str, backend: Optional[str] = None) -> Callable:
    return _run(1)


# --------------------------------------------------------------------------------- targets

def tokens_per_s(r, s) -> str:
    if not measured(r):
        return "—"
    b, _, _, t, _, _ = dims(s)
    return f"{b * t / (float(r['p50_ms']) * 1e-3):.1f}"


def report(rows: list) -> list:
    """Markdown: tokens/s per cell, pydl vs Hugging Face, and the GPU target on every CUDA cell."""
    by = cells_by(rows, NAME, ("device", "shape", "dtype"))
    lines = ["## End-to-end beam search (pydl vs Hugging Face generate)", "",
             "| cell | pydl | HF generate | pydl tokens/s | HF tokens/s | speed-up | target | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for (device, shp, dtype), per in sorted(by.items()):
        p, base = per.get("pydl"), per.get(EAGER)
        speed = speedup(p, base)
        target = "GPU ≥ 2× HF" if device == "cuda" else "— (CPU: reported)"
        ok = None if speed is None or device != "cuda" else speed >= 2
        lines.append(f"| {shp} {dtype} {device} | {cell_time(p)} | {cell_time(base)} | {tokens_per_s(p, shp)} | "
                     f"{tokens_per_s(base, shp)} | {f'{speed:.2f}×' if speed else '—'} | {target} | "
                     f"{verdict(ok) if device == 'cuda' else 'n/a'}{flag_note([r for r in (p, base) if r])} |")
    if not any(k[0] == "cuda" for k in by):
        lines.append("| every CUDA cell | — | — | — | — | — | GPU ≥ 2× HF | not measured (no CUDA cells) |")
    return lines + [""]


SUITE = Suite(
    name=NAME,
    ops=(OP,),
    providers=(
        Provider("pydl", lambda op: pydl_fn(op), PYDL),
        Provider(EAGER, lambda op: hf_fn(op), REFERENCE),
    ),
    make_inputs=lambda *a: make_inputs(*a),
    shapes=lambda device, quick: default_shapes(device, quick),
    smoke_shapes=[shape(2, 3, 5, 4, 2, 64)],
    probe_shape=shape(1, 2, 3, 2, 1, 64),
    metric=LATENCY,
    modes=("fwd",),
    out_names=("sequences", "sequences_scores"),
    diff_inputs=(),
    dtypes=lambda device: [torch.float32],
    plot_x=lambda s: dims(s)[0],
    x_label="B (prompts)",
    plot_series=lambda s: "K={} T={} L={} D={}".format(*(lambda d: (d[1], d[3], d[4], d[5]))(dims(s))),
    report=lambda rows: report(rows),
)
