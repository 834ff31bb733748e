"""LayerNorm and RMSNorm families: layer_norm, layer_norm_gelu, add_layer_norm, rms_norm,
add_rms_norm (one set of kernels serves both families).

Providers: pydl-native, pydl-triton (CUDA only), torch-eager (F.layer_norm [+ F.gelu] or
F.rms_norm, with ``x + residual`` first for the add variants), torch-compile (that eager function under
``torch.compile(dynamic=False)``, compiled once per shape).
Modes: fwd (inputs without grad), bwd (``torch.autograd.grad`` on a graph built once,
``retain_graph=True``), fwd+bwd (forward and backward each rep).
Inputs: x (M, N) ~ randn, residual (M, N) ~ randn, weight = 1 + 0.1·randn(N),
bias = 0.1·randn(N); upstream grads ~ randn. add_layer_norm's backward gets gradients for both
outputs (dy and dh), as in a transformer's residual stream.

Bytes that must move (e = element size of the dtype, s = 4-byte float32 row statistics):
  fwd   layer_norm, layer_norm_gelu : read x, write y                  = 2·M·N·e + 2·N·e (w, b)
        add_layer_norm              : read x, r, write y, h            = 4·M·N·e + 2·N·e
  bwd   layer_norm                  : read x, dy, write dx             = 3·M·N·e + 2·M·s (mean, rstd)
                                      + N·e (read w) + 2·N·e (write dw, db)
        layer_norm_gelu             : as layer_norm + N·e (read b, to recompute the gelu input)
        add_layer_norm              : read h, dy, dh, write dx         = 4·M·N·e + 2·M·s + 3·N·e
  fwd+bwd                           : fwd + bwd + 2·M·s (the forward writes mean and rstd)
  rms_norm / add_rms_norm: as layer_norm / add_layer_norm without the bias (one N·e less each
  way), and the statistics still count as the forward's (mean, rstd) rows.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..core import COMPILE, EAGER, PYDL, REFERENCE, Provider, Suite, compile_provider

NAME = "layer_norm"
OPS = ("layer_norm", "layer_norm_gelu", "add_layer_norm", "rms_norm", "add_rms_norm")
N_ALL = (384, 768, 1024, 2048, 4096, 8192, 16384)
EPS = 1e-5
_STATS_BYTES = 4  # mean / rstd are float32 (for 16- and 32-bit inputs)


def default_shapes(device: torch.device, quick: bool) -> list:
    """[(M, N), ...] for this device; --quick keeps a representative subset."""
    if device.type == "cuda":
        m, ns = 16384, ((768, 1024, 4096, 16384) if quick else N_ALL)
    else:
        m, ns = 8192, ((768, 1024) if quick else N_ALL)
    return [(m, n) for n in ns]


def bytes_moved(op: str, mode: str, m: int, n: int, elem: int) -> int:
    """The minimal traffic of one call; see the module docstring for the formulas."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}")
    add, rms = op.startswith("add_"), "rms" in op
    big = 4 if add else 2  # (M, N) tensors read + written in the forward
    fwd = big * m * n * elem + (1 if rms else 2) * n * elem
    bwd_big = 4 if add else 3
    bwd_vec = 4 if op == "layer_norm_gelu" else (2 if rms else 3)
    bwd = bwd_big * m * n * elem + 2 * m * _STATS_BYTES + bwd_vec * n * elem
    if mode == "fwd":
        return fwd
    if mode == "bwd":
        return bwd
    if mode == "fwd+bwd":
        return fwd + bwd + 2 * m * _STATS_BYTES
    raise ValueError(f"unknown mode {mode!r}")


def eager_fn(op: str) -> Callable:
    """The torch composition; returns a tuple of outputs (y,) or (y, h)."""
    if op == "layer_norm":
        def f(x, w, b):
            return (F.layer_norm(x, (x.shape[-1],), w, b, EPS),)
    elif op == "layer_norm_gelu":
        def f(x, w, b):
            return (F.gelu(F.layer_norm(x, (x.shape[-1],), w, b, EPS)),)
    elif op == "add_layer_norm":
        def f(x, r, w, b):
            h = x + r
            return (F.layer_norm(h, (h.shape[-1],), w, b, EPS), h)
    elif op == "rms_norm":
        def f(x, w):
            return (F.rms_norm(x, (x.shape[-1],), w, EPS),)
    elif op == "add_rms_norm":
        def f(x, r, w):
            h = x + r
            return (F.rms_norm(h, (h.shape[-1],), w, EPS), h)
    else:
        raise ValueError(f"unknown op {op!r}")
    f.__name__ = f"eager_{op}"
    return f


def pydl_fn(op: str, backend: str) -> Callable:
    import pydl.ops as ops  # imported lazily: the harness runs (torch providers) without pydl

    if op == "layer_norm":
        def f(x, w, b):
            return (ops.layer_norm(x, w, b, EPS, backend=backend),)
    elif op == "layer_norm_gelu":
        def f(x, w, b):
            return (ops.layer_norm_gelu(x, w, b, EPS, approximate="none", backend=backend),)
    elif op == "add_layer_norm":
        def f(x, r, w, b):
            y, h = ops.add_layer_norm(x, r, w, b, EPS, activation=None, backend=backend)
            return (y, h)
    elif op == "rms_norm":
        def f(x, w):
            return (ops.rms_norm(x, w, EPS, backend=backend),)
    elif op == "add_rms_norm":
        def f(x, r, w):
            return tuple(ops.add_rms_norm(x, r, w, EPS, backend=backend))
    else:
        raise ValueError(f"unknown op {op!r}")
    return f


def make_inputs(op: str, shape: tuple, dtype: torch.dtype, device: torch.device, seed: int):
    """(inputs, grads): inputs (x, [r,] w[, b]) (no bias for the RMS ops); grads (dy,) or
    (dy, dh). Random, never zeros."""
    m, n = shape
    g = torch.Generator(device=device)
    g.manual_seed(seed)

    def rnd(*size, scale=1.0, shift=0.0):
        t = torch.randn(*size, generator=g, device=device, dtype=torch.float32)
        if scale != 1.0 or shift != 0.0:
            t.mul_(scale).add_(shift)
        return t.to(dtype)

    x = rnd(m, n)
    w = rnd(n, scale=0.1, shift=1.0)
    b = rnd(n, scale=0.1)
    params = (w,) if "rms" in op else (w, b)
    if op.startswith("add_"):
        return (x, rnd(m, n), *params), (rnd(m, n), rnd(m, n))
    return (x, *params), (rnd(m, n),)


def grad_names(op: str) -> tuple:
    names = ("dx", "dr", "dw", "db") if op.startswith("add_") else ("dx", "dw", "db")
    return names[:-1] if "rms" in op else names


SUITE = Suite(
    name=NAME,
    ops=OPS,
    providers=(
        Provider("pydl-native", lambda op: pydl_fn(op, "native"), PYDL),
        Provider("pydl-triton", lambda op: pydl_fn(op, "triton"), PYDL, devices=("cuda",)),
        Provider(EAGER, lambda op: eager_fn(op), REFERENCE),
        compile_provider(lambda op: eager_fn(op), COMPILE),
    ),
    make_inputs=lambda *a: make_inputs(*a),
    shapes=lambda device, quick: default_shapes(device, quick),
    smoke_shapes=[(64, 97), (64, 128)],
    probe_shape=(4, 64),
    work=lambda op, mode, shape, dtype: bytes_moved(op, mode, *shape, torch.empty((), dtype=dtype).element_size()),
    out_names=("y", "h"),
    grad_names=grad_names,
    reduction_grads=("dw", "db"),
    seed=lambda shape: shape[0] * 7919 + shape[1],
)
