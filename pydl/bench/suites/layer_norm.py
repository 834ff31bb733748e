"""LayerNorm family: layer_norm, layer_norm_gelu, add_layer_norm.

Providers: pydl-native, pydl-triton (CUDA only), torch-eager (F.layer_norm [+ F.gelu], with
``x + residual`` first for add), torch-compile (that eager function under
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
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..timing import time_fn
from . import COMPILE, EAGER, ERROR, MISMATCH, OK, SKIPPED, TIME_LIMIT_NOTE, Record, SuiteConfig

NAME = "layer_norm"
OPS = ("layer_norm", "layer_norm_gelu", "add_layer_norm")
PROVIDERS = ("pydl-native", "pydl-triton", EAGER, COMPILE)
MODES = ("fwd", "bwd", "fwd+bwd")
N_ALL = (384, 768, 1024, 2048, 4096, 8192, 16384)
EPS = 1e-5
_STATS_BYTES = 4  # mean / rstd are float32 (for 16- and 32-bit inputs)


# ----------------------------------------------------------------------------------- shapes

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
    big = 4 if op == "add_layer_norm" else 2  # (M, N) tensors read + written in the forward
    fwd = big * m * n * elem + 2 * n * elem
    bwd_big = 4 if op == "add_layer_norm" else 3
    bwd_vec = 4 if op == "layer_norm_gelu" else 3
    bwd = bwd_big * m * n * elem + 2 * m * _STATS_BYTES + bwd_vec * n * elem
    if mode == "fwd":
        return fwd
    if mode == "bwd":
        return bwd
    if mode == "fwd+bwd":
        return fwd + bwd + 2 * m * _STATS_BYTES
    raise ValueError(f"unknown mode {mode!r}")


# ------------------------------------------------------------------------------- providers

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
    else:
        raise ValueError(f"unknown op {op!r}")
    return f


def compile_fn(op: str) -> Callable:
    """A fresh shape-specialized compile of the eager function (dynamo state reset first)."""
    torch._dynamo.reset()
    return torch.compile(eager_fn(op), dynamic=False)


def _short(exc: BaseException, limit: int = 200) -> str:
    msg = " ".join(f"{type(exc).__name__}: {exc}".split())
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


class _Availability:
    """Whether a pydl provider can run op/dtype/device at all, probed once on tiny inputs."""

    def __init__(self):
        self._cache: dict = {}

    def reason(self, provider: str, op: str, dtype: torch.dtype, device: torch.device) -> Optional[str]:
        key = (provider, op, dtype, device.type)
        if key not in self._cache:
            self._cache[key] = self._probe(provider, op, dtype, device)
        return self._cache[key]

    @staticmethod
    def _probe(provider, op, dtype, device) -> Optional[str]:
        if provider == "pydl-triton" and device.type != "cuda":
            return "pydl-triton is benchmarked on cuda only"
        backend = provider.split("-", 1)[1]
        try:
            f = pydl_fn(op, backend)
        except Exception as exc:  # pydl.ops missing or broken
            return f"import pydl.ops failed: {_short(exc)}"
        try:
            inputs, _ = make_inputs(op, 4, 64, dtype, device, seed=1)
            f(*inputs)
        except Exception as exc:
            return f"probe failed: {_short(exc)}"
        return None


# ---------------------------------------------------------------------------------- inputs

def make_inputs(op: str, m: int, n: int, dtype: torch.dtype, device: torch.device, seed: int):
    """(inputs, grads): inputs (x, [r,] w, b); grads (dy,) or (dy, dh). Random, never zeros."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        t = torch.randn(*shape, generator=g, device=device, dtype=torch.float32)
        if scale != 1.0 or shift != 0.0:
            t.mul_(scale).add_(shift)
        return t.to(dtype)

    x = rnd(m, n)
    w = rnd(n, scale=0.1, shift=1.0)
    b = rnd(n, scale=0.1)
    if op == "add_layer_norm":
        inputs = (x, rnd(m, n), w, b)
        grads = (rnd(m, n), rnd(m, n))
    else:
        inputs = (x, w, b)
        grads = (rnd(m, n),)
    return inputs, grads


def _leaves(inputs):
    return tuple(t.detach().requires_grad_(True) for t in inputs)


# ----------------------------------------------------------------------------- correctness
#
# The gate compares every provider with torch eager. In float32 the reference is torch eager in
# float32. In bfloat16 / float16 it is torch eager on the same (rounded) inputs upcast to float32,
# and each tensor's tolerance also admits twice torch eager's own error in that dtype
# (DESIGN §7): torch's low-precision CPU weight/bias-gradient reductions are measurably less
# accurate than a float32-accumulating kernel, so "equal to torch in bf16" would flag correct
# kernels.

OUT_NAMES = ("y", "h")


def grad_names(op: str) -> tuple:
    return ("dx", "dr", "dw", "db") if op == "add_layer_norm" else ("dx", "dw", "db")


def tolerances(dtype: torch.dtype):
    """(relative-norm floor, elementwise atol, elementwise rtol) of the gate."""
    if dtype in (torch.float32, torch.float64):
        return 1e-4, 1e-3, 1e-3
    return 1e-2, 1 / 16, 1 / 16


def _errors(out: torch.Tensor, ref: torch.Tensor) -> tuple:
    """(‖out − ref‖ / ‖ref‖, max |out − ref|), in float32."""
    d = (out.detach().float() - ref.detach().float()).abs_()
    return float(d.norm() / ref.detach().float().norm().clamp_min(1e-30)), float(d.max())


def compare(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
            own: Optional[tuple] = None, reduction: bool = False) -> Optional[str]:
    """None when ``out`` (in ``dtype``) matches ``ref`` loosely; else a short reason.

    own: (rel, max abs) error of torch eager in ``dtype`` against the same ``ref``; twice it is
        always admitted. None: torch eager is the reference itself.
    reduction: ``ref`` is a sum over rows (dweight, dbias): its rounding error scales with the
        partial sums, so the elementwise atol is scaled by max|ref|.
    """
    if out is None:
        return f"{name}: missing"
    if out.shape != ref.shape:
        return f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if out.dtype != dtype:
        return f"{name}: dtype {out.dtype} != {dtype}"
    rel_floor, atol, rtol = tolerances(dtype)
    own_rel, own_max = own if own is not None else (0.0, 0.0)
    rel_tol = max(rel_floor, 2 * own_rel)
    o, r = out.detach().float(), ref.detach().float()
    if not bool(torch.isfinite(o).all()):
        return f"{name}: non-finite values"
    diff = (o - r).abs_()
    rel = float(diff.norm() / r.norm().clamp_min(1e-30))
    if reduction:
        atol = atol * max(1.0, float(r.abs().max()))
    bad = diff > (atol + 2 * own_max) + rtol * r.abs()
    nbad = int(bad.sum())
    if rel > rel_tol or nbad:
        return (f"{name}: rel={rel:.2e} (tol {rel_tol:.1e}); {nbad} elements off; "
                f"max|diff|={float(diff.max()):.3g}")
    return None


class Reference:
    """What the gate compares with, for one op / shape / dtype (see the note above)."""

    def __init__(self, op: str, inputs, grads, dtype: torch.dtype, want_grad: bool):
        self.dtype = dtype
        self.grad_names = grad_names(op)
        fn = eager_fn(op)
        low = dtype in (torch.float16, torch.bfloat16)
        hi_inputs = tuple(t.float() for t in inputs) if low else inputs
        hi_grads = tuple(g.float() for g in grads) if low else grads
        self.out, self.grads = _eager_results(fn, hi_inputs, hi_grads, want_grad)
        self.own = {}
        if low:  # torch eager's own error in this dtype, per tensor
            out, got = _eager_results(fn, inputs, grads, want_grad)
            for nm, a, b in zip(OUT_NAMES, out, self.out):
                self.own[nm] = _errors(a, b)
            for nm, a, b in zip(self.grad_names, got or (), self.grads or ()):
                self.own[nm] = _errors(a, b)

    def check_out(self, outs) -> list:
        reasons = [compare(nm, o, r, self.dtype, self.own.get(nm))
                   for nm, o, r in zip(OUT_NAMES, outs, self.out)]
        if len(outs) != len(self.out):
            reasons.append(f"{len(outs)} outputs, expected {len(self.out)}")
        return [r for r in reasons if r]

    def check_grads(self, got) -> list:
        reasons = [compare(nm, o, r, self.dtype, self.own.get(nm), reduction=nm in ("dw", "db"))
                   for nm, o, r in zip(self.grad_names, got, self.grads)]
        return [r for r in reasons if r]


def _eager_results(fn, inputs, grads, want_grad):
    out = tuple(t.detach() for t in fn(*inputs))
    if not want_grad:
        return out, None
    leaves = _leaves(inputs)
    return out, torch.autograd.grad(fn(*leaves), leaves, grads)


# ------------------------------------------------------------------------------------- run

def _provider_fn(provider: str, op: str) -> Callable:
    if provider == EAGER:
        return eager_fn(op)
    if provider == COMPILE:
        return compile_fn(op)
    return pydl_fn(op, provider.split("-", 1)[1])


def _check(fn, inputs, grads, ref: Reference, want_grad):
    """(fwd_status, fwd_note, grad_status, grad_note); statuses OK / MISMATCH / SKIPPED / ERROR.

    A call that raises is ERROR for pydl providers; the caller maps torch-compile's to SKIPPED.
    """
    try:
        reasons = ref.check_out(fn(*inputs))
        fwd = (MISMATCH, "; ".join(reasons)) if reasons else (OK, "")
    except Exception as exc:
        fwd = (ERROR, _short(exc))
    grad = (SKIPPED, "not requested")
    if want_grad:
        try:
            leaves = _leaves(inputs)
            reasons = ref.check_grads(torch.autograd.grad(fn(*leaves), leaves, grads))
            grad = (MISMATCH, "; ".join(reasons)) if reasons else (OK, "")
        except Exception as exc:
            grad = (ERROR, _short(exc))
    return fwd[0], fwd[1], grad[0], grad[1]


def _timed_fn(mode: str, fn: Callable, inputs, grads) -> Callable:
    if mode == "fwd":
        return lambda: fn(*inputs)
    leaves = _leaves(inputs)
    if mode == "bwd":
        outs = fn(*leaves)  # the graph, built once
        return lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True)
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(fn(*leaves), leaves, grads)
    raise ValueError(f"unknown mode {mode!r}")


def _compile_settings() -> contextlib.ExitStack:
    """Dynamo/AOTAutograd settings for the torch-compile provider, restored on exit.

    - Each shape is its own compile: raise the recompile limits so dynamo never silently falls
      back to eager after a few shapes.
    - Donated buffers off: a backward compiled with donated buffers refuses
      ``retain_graph=True``, which the bwd mode needs to replay one graph. (Donation only saves
      memory by reusing saved activations; it moves no fewer bytes.)
    """
    stack = contextlib.ExitStack()
    dyn = torch._dynamo.config
    limits = {a: max(getattr(dyn, a), 256) for a in ("cache_size_limit", "recompile_limit",
              "accumulated_cache_size_limit", "accumulated_recompile_limit") if hasattr(dyn, a)}
    stack.enter_context(dyn.patch(**limits))
    try:
        import torch._functorch.config as functorch_config

        if hasattr(functorch_config, "donated_buffer"):
            stack.enter_context(functorch_config.patch(donated_buffer=False))
    except ImportError:  # older torch: no donated buffers
        pass
    return stack


def run(cfg: SuiteConfig) -> list:
    providers = [p for p in PROVIDERS if not cfg.providers or p in cfg.providers]
    with (_compile_settings() if COMPILE in providers else contextlib.nullcontext()):
        return _run(cfg, providers)


def _run(cfg: SuiteConfig, providers: list) -> list:
    device = cfg.device
    ops = [o for o in OPS if not cfg.ops or o in cfg.ops]
    shapes = cfg.shapes or default_shapes(device, cfg.quick)
    modes = [m for m in MODES if m in cfg.modes]
    want_grad = any(m != "fwd" for m in modes)
    avail = _Availability()
    records = []

    for dtype in cfg.dtypes:
        dname = str(dtype).replace("torch.", "")
        elem = torch.empty((), dtype=dtype).element_size()
        for op in ops:
            for (m, n) in shapes:
                shape = f"{m}x{n}"

                def rec(provider, mode, status, note="", meas=None):
                    records.append(Record(op=op, provider=provider, mode=mode, shape=shape,
                                          dtype=dname, device=device.type,
                                          bytes_moved=bytes_moved(op, mode, m, n, elem),
                                          status=status, note=note, measurement=meas))

                if cfg.out_of_time():
                    for p in providers:
                        for mode in modes:
                            rec(p, mode, SKIPPED, TIME_LIMIT_NOTE)
                    continue
                before = len(records)
                try:
                    _run_point(cfg, op, m, n, dtype, providers, modes, want_grad, avail, rec)
                except Exception as exc:  # e.g. out of memory making inputs: record, go on
                    done = {(r.provider, r.mode) for r in records[before:]}
                    for p in providers:
                        for mode in modes:
                            if (p, mode) not in done:
                                rec(p, mode, ERROR, _short(exc))
                    cfg.log(f"[{NAME}] {op} {shape} {dname}: error: {_short(exc)}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return records


def _run_point(cfg, op, m, n, dtype, providers, modes, want_grad, avail, rec):
    device = cfg.device
    shape = f"{m}x{n}"
    tag = f"[{NAME}] {op} {shape} {str(dtype).replace('torch.', '')}"
    inputs, grads = make_inputs(op, m, n, dtype, device, seed=cfg.seed + m * 7919 + n)

    ref = Reference(op, inputs, grads, dtype, want_grad)

    # Correctness gate, provider by provider (this call also compiles / autotunes).
    fns, gate = {}, {}
    for p in providers:
        if p.startswith("pydl-"):
            why = avail.reason(p, op, dtype, device)
            if why:
                gate[p] = (SKIPPED, why, SKIPPED, why)
                continue
        try:
            fns[p] = _provider_fn(p, op)
        except Exception as exc:
            gate[p] = (SKIPPED, _short(exc), SKIPPED, _short(exc))
            continue
        st = _check(fns[p], inputs, grads, ref, want_grad)
        if p == COMPILE:  # a compile failure is recorded as skipped, not as an error
            st = (*_compile_failure(st[0], st[1]), *_compile_failure(st[2], st[3]))
        gate[p] = st
    del ref
    _time_all(cfg, tag, providers, modes, fns, gate, inputs, grads, rec)


def _compile_failure(status: str, note: str) -> tuple:
    return (SKIPPED, "compile failed: " + note) if status == ERROR else (status, note)


def _time_all(cfg, tag, providers, modes, fns, gate, inputs, grads, rec):
    for p in providers:
        fwd_st, fwd_note, grad_st, grad_note = gate[p]
        for mode in modes:
            st, note = (fwd_st, fwd_note) if mode == "fwd" else (grad_st, grad_note)
            if st in (SKIPPED, ERROR):
                rec(p, mode, st, note)
                cfg.log(f"{tag} {p:13s} {mode:7s} {st}: {note}")
                continue
            try:
                meas = time_fn(_timed_fn(mode, fns[p], inputs, grads), cfg.device, cfg.policy)
            except Exception as exc:
                rec(p, mode, ERROR, _short(exc))
                cfg.log(f"{tag} {p:13s} {mode:7s} error: {_short(exc)}")
                continue
            rec(p, mode, st, note, meas)
            flag = "" if st == OK else f"  [{st}: {note}]"
            cfg.log(f"{tag} {p:13s} {mode:7s} {meas.p50_ms:9.4f} ms{flag}")
