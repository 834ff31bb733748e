"""The LayerNorm-family workload for compute-sanitizer: every CUDA kernel and launch configuration
of csrc/cuda/layer_norm_{fwd,bwd,dweight}.cu, on small shapes, each result checked against a
float64 reference.

    compute-sanitizer --tool memcheck --error-exitcode 99 python scripts/sanitize_layer_norm.py
    python scripts/sanitize_layer_norm.py --coverage        # no sanitizer: which kernels really ran

What the launchers run (T: x's storage type; P: the parameters', T or fp32 for a 16-bit T (mixed
precision: the "params=fp32" cases); each kernel's last template argument RMS: LayerNorm or
RMSNorm, the rms_norm / add_rms_norm cases; VEC = 16 bytes / element: 4 for fp32, 8 for fp16 / bf16,
when N % VEC == 0 and every pointer / row stride allows 16-byte accesses; else VEC = 1, "scalar"):
  ln_fwd_cached<T, P, VEC, ITEMS>   forward, N <= 32768 (vector; E = ITEMS * VEC in 8, 16, 24, 32,
                                 chosen by N) or N <= 8192 (scalar, ITEMS 8); inference (no
                                 grad) launches it with no statistics outputs
  ln_fwd_uncached<T, P, VEC, U>  forward, longer rows (vector N > 32768, scalar N > 8192), 512
                                 threads per row, U = 16 / VEC
  ln_bwd_rows<T, P, VEC, ITEMS, ACC_SMEM>   backward, N <= 8192 (vector) / 4096 (scalar); dw / db
                                 in registers (vector) or shared memory (scalar), row groups
                                 merged in shared memory when a block holds several rows; its
                                 shared memory never exceeds ~33 KB
  ln_bwd_uncached<T, P, VEC, ACC_SMEM>  backward, longer rows, 1024 threads; ACC_SMEM (dw / db in
                                 2N floats of shared memory, N <= 16384): above N ~ 6080 that is
                                 more than 48 KB, the opt-in (cudaFuncSetAttribute) path;
                                 else in the block's workspace row (also without weight / bias)
  ln_reduce_partials<P>          sums the per-block dw / db rows (whenever weight or bias is given)
The cases below are chosen with a replica of that choice (expected_kernels) for fp32, fp16 and
bf16: each E, both VEC paths, both sides of every N threshold, > 48 KB shared memory, grid-stride
loops (more rows than one wave), misaligned and row-strided views, with / without residual,
weight, bias, each activation, grad and inference, default and side streams. --coverage records
the launched kernels with torch.profiler and fails (exit 3) if an expected one did not run.

Inputs are made on the CPU, rounded to the dtype, copied over; the reference is float64 on the
CPU (torch's rounding of h = x + residual included), so the sanitizer sees pydl's kernels plus
copies. A result off by more than the dtype's tolerance fails the run: exit 1, with a FAIL line.
Run under sanitizers with PYTORCH_NO_CUDA_MEMORY_CACHING=1 (every tensor its own allocation, so
out-of-bounds accesses are not hidden inside a cached block); without it (the check stage) freed
blocks are poisoned with NaN first, so an output element nobody wrote cannot pass.
Exit codes: 0 ok; 1 a case failed; 2 nothing to run here (no GPU / kernels not built);
3 --coverage: an expected kernel did not run; 4 --time-limit-s stopped it before every kernel
configuration had run (the cases adding a configuration come first; a stop after them is noted).
"""

from __future__ import annotations

import time

T_START = time.monotonic()  # --time-limit-s counts from here, torch's import and CUDA init included

import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Optional  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scripts.sanitize_common import SHORT, SHORT_TYPE_NAMES, finish, parser, run_cases, start  # noqa: E402

EPS = 1e-5
TOL = {torch.float32: (1e-4, 1e-6), torch.float16: (5e-3, 1e-3), torch.bfloat16: (2e-2, 1e-3)}  # rel, abs
# (op, activation) with a residual, and without; cycled over the shapes.
WITH_RES = (("add_layer_norm", None), ("add_layer_norm", "gelu"), ("add_layer_norm", "gelu_tanh"))
NO_RES = (("layer_norm", None), ("layer_norm_gelu", "gelu"), ("layer_norm_gelu", "gelu_tanh"))
AFFINE = ((True, True), (True, False), (False, True), (False, False))  # (weight, bias)
RES_OPS = ("add_layer_norm", "add_rms_norm")
RMS_OPS = ("rms_norm", "add_rms_norm")  # no bias, no activation


def _b(flag):
    return "true" if flag else "false"


# ---- replica of the launchers' choice (csrc/cuda/layer_norm_fwd.cu: choose_fwd_cfg; _bwd.cu: bwd_launch)

def _cdiv(a, b):
    return -(-a // b)


def _round_tpr(units):
    if units <= 32:
        p = 1
        while p < units:
            p <<= 1
        return p
    return _cdiv(units, 32) * 32


def fwd_elems(n, vec):
    """E of choose_fwd_cfg: the best slot use, ties (within 1%) to the larger E."""
    nch, best, out = n // vec, 0.0, 0
    for pass_ in (0, 1):
        for e in range(8, (32 if vec > 1 else 8) + 1, 8):
            tpr = _round_tpr(_cdiv(nch, e // vec))
            if tpr > 1024:
                continue
            use = nch / (tpr * (e // vec))
            if pass_ == 0:
                best = max(best, use)
            elif use >= best - 0.01:
                out = e
    return out


def expected_kernels(n, vec_fwd, vec_bwd, t, p, grad, partials, res=False, rms=False):
    """The kernel keys ('name<types,args>') the call should launch, and the backward's dynamic smem.
    t, p: the short names of x's and the parameters' storage types (p = t without parameters)."""
    keys = []
    r = _b(rms)
    if n <= (32768 if vec_fwd > 1 else 8192):
        keys.append(f"ln_fwd_cached<{t},{p},{vec_fwd},{fwd_elems(n, vec_fwd) // vec_fwd},{r}>")
    else:
        keys.append(f"ln_fwd_uncached<{t},{p},{vec_fwd},{max(1, 16 // vec_fwd)},{_b(res)},{r}>")
    smem = 0
    if grad:
        v, e = vec_bwd, (4 if vec_bwd == 1 else 8)
        smem = 2 * 32 * 8
        if n <= 1024 * e:
            keys.append(f"ln_bwd_rows<{t},{p},{v},{e // v},{_b(v == 1)},{r}>")
            tpr = _round_tpr(_cdiv(n // v, e // v))
            rpb = max(1, 512 // tpr)
            if partials and (v == 1 or rpb > 1):
                smem += rpb * 2 * n * 4
        else:
            acc = partials and n <= 16384  # (and it fits the opt-in limit: 227 KB on Hopper)
            keys.append(f"ln_bwd_uncached<{t},{p},{v},{_b(acc)},{r}>")
            smem += 2 * n * 4 if acc else 0
        if partials:
            keys.append(f"ln_reduce_partials<{p}>")
    return keys, smem


def vec_ok(n, vec, mats, vecs):
    """The host's vectorizable(): N % VEC, 16-byte aligned pointers, row strides % VEC."""
    if n % vec:
        return False
    for t in mats:
        if t is not None and (t.data_ptr() % 16 or (t.shape[0] > 1 and t.stride(0) % vec)):
            return False
    return all(t is None or t.data_ptr() % 16 == 0 for t in vecs)


# ---- cases ---------------------------------------------------------------------------------------

@dataclass
class Case:
    dtype: torch.dtype
    m: int
    n: int
    op: str
    act: object
    weight: bool
    bias: bool
    layout: str = "contiguous"  # or "misaligned" (x = base[:, 1:]) or "strided" (x = base[:, :n])
    stream: bool = False
    param_dtype: Optional[torch.dtype] = None  # weight / bias: None = dtype; fp32: mixed precision

    @property
    def params(self) -> torch.dtype:
        return self.param_dtype or self.dtype

    def type_keys(self) -> tuple:
        """(T, P) short names as in the kernel keys (P = T without parameters)."""
        t = SHORT[self.dtype]
        return t, (SHORT[self.params] if self.weight or self.bias else t)


def shapes_for(dtype, quick):
    vec = 4 if dtype == torch.float32 else 8
    per_e = {}
    for n in range(vec, 129 * vec, vec):  # the smallest N choosing each E (tiny rows, tpr 1 or 2)
        per_e.setdefault(fwd_elems(n, vec), n)
    s = [(5, per_e[e], "contiguous") for e in sorted(per_e)]
    s += [(67, 768, "contiguous"), (9, 1024, "contiguous"), (4, 4096, "contiguous"),
          (3, 8192, "contiguous"), (2, 12288, "contiguous"), (2, 16384, "contiguous"),
          (2, 32768, "contiguous"), (2, 32776, "contiguous"), (2, 65536, "contiguous"),
          # scalar path: odd N on each side of 4096 / 8192 / 16384
          (3, 1, "contiguous"), (7, 7, "contiguous"), (33, 97, "contiguous"), (5, 1023, "contiguous"),
          (3, 4095, "contiguous"), (3, 4097, "contiguous"), (2, 8191, "contiguous"),
          (2, 8193, "contiguous"), (2, 20001, "contiguous"),
          (6, 1024, "misaligned"), (6, 768, "strided")]
    # more rows than one wave (grid-stride loops, several rows per partial block)
    s.append((300, 8191, "contiguous") if dtype == torch.float32 else (300, 8192, "contiguous"))
    if quick:
        s = [x for x in s if x[1] in (per_e[8], 97, 768, 4097, 8193, 12288, 32776)]
    return s


def build_cases(dtypes, quick):
    """Cases of every dtype, interleaved; those adding a kernel configuration first, so a run cut
    by --time-limit-s has still launched every configuration when the first pass is through."""
    per = [_cases_of(dtype, quick) for dtype in dtypes]
    cases = [c for group in zip(*per) for c in group] + [c for p in per for c in p[min(map(len, per)):]]
    first, rest, seen = [], [], set()
    for c in cases:
        keys = set(static_keys(c))
        (first if keys - seen else rest).append(c)
        seen |= keys
    return first + rest


def static_keys(c):
    """expected_kernels from the case's layout alone (the run checks the real tensors)."""
    vec = 4 if c.dtype == torch.float32 else 8
    vf = vec if c.layout != "misaligned" and c.n % vec == 0 else 1
    vb = vf if c.op not in RES_OPS else (vec if c.n % vec == 0 else 1)  # backward reads h
    return expected_kernels(c.n, vf, vb, *c.type_keys(), True, c.weight or c.bias,
                            c.op in RES_OPS, c.op in RMS_OPS)[0]


def _cases_of(dtype, quick):
    cases = []
    for i, (m, n, layout) in enumerate(shapes_for(dtype, quick)):
        op, act = WITH_RES[i % len(WITH_RES)]
        cases.append(Case(dtype, m, n, op, act, True, True, layout, stream=bool(i % 2)))
        if not quick or i % 2:
            op, act = NO_RES[i % len(NO_RES)]
            w, b = AFFINE[(i // 2) % len(AFFINE)]
            cases.append(Case(dtype, m, n, op, act, w, b, layout, stream=not i % 2))
        if not quick or i % 2:  # RMSNorm through the same kernels (RMS = true)
            op = RMS_OPS[(i // 2) % 2]
            cases.append(Case(dtype, m, n, op, None, (i // 4) % 3 != 2, False, layout, stream=bool(i % 2)))
        if dtype != torch.float32:  # mixed precision: float32 weight / bias, LN and RMS alternately
            op, act = (WITH_RES[i % len(WITH_RES)] if i % 2 == 0 else (RMS_OPS[(i // 2) % 2], None))
            cases.append(Case(dtype, m, n, op, act, True, op not in RMS_OPS, layout, stream=bool(i % 2),
                              param_dtype=torch.float32))
    if not quick:  # long rows without weight and bias: no workspace, no partials kernel
        cases.append(Case(dtype, 2, 12288, "layer_norm_gelu", "gelu", False, False, stream=True))
        cases.append(Case(dtype, 3, 8191, "layer_norm", None, False, False))
        # add_rms_norm on the long-row kernels: scalar ln_fwd_uncached with h, dw in shared memory
        cases.append(Case(dtype, 2, 8193, "add_rms_norm", None, True, False, stream=True))
        cases.append(Case(dtype, 3, 12288, "add_rms_norm", None, True, False))
    return cases


# ---- one case ------------------------------------------------------------------------------------

def _make_x(case, gen):
    """(x for the reference (float64), a function giving x on the device in the case's layout)."""
    m, n = case.m, case.n
    pad = {"contiguous": 0, "misaligned": 1, "strided": 4 if case.dtype == torch.float32 else 8}[case.layout]
    base = torch.randn(m, n + pad, generator=gen, dtype=torch.float64).to(case.dtype)
    sl = (slice(None), slice(1, None)) if case.layout == "misaligned" else (slice(None), slice(0, n))
    return base[sl].double(), lambda device: base.to(device)[sl]


def reference(case, x, r, w, b):
    h = (x + r).to(case.dtype).double() if r is not None else None  # torch rounds h to the dtype
    src = h if h is not None else x
    if case.op in RMS_OPS:
        y = F.rms_norm(src, (case.n,), w, EPS)
        return (y, h) if h is not None else (y,)
    y = F.layer_norm(src, (case.n,), w, b, EPS)
    if case.act is not None:
        y = F.gelu(y, approximate="tanh" if case.act == "gelu_tanh" else "none")
    return (y, h) if h is not None else (y,)


def call(ops, case, backend, x, r, w, b):
    if case.op == "add_rms_norm":
        return tuple(ops.add_rms_norm(x, r, w, EPS, backend=backend))
    if case.op == "rms_norm":
        return (ops.rms_norm(x, w, EPS, backend=backend),)
    if case.op == "add_layer_norm":
        return tuple(ops.add_layer_norm(x, r, w, b, EPS, case.act, backend=backend))
    if case.op == "layer_norm_gelu":
        return (ops.layer_norm_gelu(x, w, b, EPS, "tanh" if case.act == "gelu_tanh" else "none", backend=backend),)
    return (ops.layer_norm(x, w, b, EPS, backend=backend),)


def _err(out, ref, dtype):
    """'' when out matches ref within the dtype's tolerance, else the relative error."""
    out = out.detach().double().cpu()
    if out.shape != ref.shape:
        return f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if not bool(torch.isfinite(out).all()):
        return "non-finite"
    rel, ab = TOL[dtype]
    diff, scale = float((out - ref).norm()), float(ref.norm())
    return "" if diff <= rel * scale + ab * out.numel() ** 0.5 else f"{diff / max(scale, 1e-30):.2e}"


def poison(device):
    """Fill the caching allocator's free blocks with NaN, so unwritten outputs show (no-op when
    caching is off, as under the sanitizers)."""
    if device.type == "cuda" and os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") != "1":
        # Both pools: large blocks (> 1 MB requests) and the small-request pool's segments.
        blocks = [torch.empty(1 << 24, device=device)] + [torch.empty(1 << 16, device=device) for _ in range(32)]
        for b in blocks:
            b.fill_(float("nan"))
        del blocks  # back to the cache, NaN-filled


def run_case(ops, case, backend, device, gen, side):
    dt, n = case.dtype, case.n
    x_ref, x_on = _make_x(case, gen)
    res = case.op in RES_OPS
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dt)  # noqa: E731
    r_c = rnd(case.m, n) if res else None
    pdt = case.params
    w_c = (1 + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)).to(pdt) if case.weight else None
    b_c = (0.1 * torch.randn(n, generator=gen, dtype=torch.float64)).to(pdt) if case.bias else None
    g_c = [rnd(case.m, n) for _ in range(2 if res else 1)]

    leaves = [t.double().requires_grad_(True) if t is not None else None for t in (x_ref, r_c, w_c, b_c)]
    want = reference(case, *leaves)
    used = [t for t in leaves if t is not None]
    want_g = torch.autograd.grad(want, used, [g.double() for g in g_c])

    poison(device)
    stream = side if (case.stream and side is not None) else None
    ctx = torch.cuda.stream(stream) if stream is not None else _Null()
    with ctx:  # inputs are copied on the stream that uses them
        x = x_on(device).detach().requires_grad_(True)
        r, w, b = (None if t is None else t.to(device).requires_grad_(True) for t in (r_c, w_c, b_c))
        with torch.no_grad():  # inference: the kernels skip the statistics
            got_inf = call(ops, case, backend, x, r, w, b)
        poison(device)
        got = call(ops, case, backend, x, r, w, b)
        got_g = torch.autograd.grad(got, [t for t in (x, r, w, b) if t is not None],
                                    [g.to(device) for g in g_c])
    if device.type == "cuda":
        torch.cuda.synchronize()
    names = ["y", "h"][:len(want)] + [nm for nm, t in zip(("dx", "dr", "dw", "db"), leaves) if t is not None]
    bad = []
    for nm, o, ref in zip(names, list(got) + list(got_g), list(want) + list(want_g)):
        e = _err(o, ref.detach(), dt)
        if e:
            bad.append(f"{nm} {e}")
    for nm, o, ref in zip(("y(inference)", "h(inference)"), got_inf, want):
        e = _err(o, ref.detach(), dt)
        if e:
            bad.append(f"{nm} {e}")
    # What the launchers should pick for these very tensors.
    normalized = got[1].detach() if res else x
    vec = 4 if dt == torch.float32 else 8
    vf = vec if vec_ok(n, vec, [x, r, got[0]] + ([got[1]] if res else []), [w, b]) else 1
    vb = vec if vec_ok(n, vec, [normalized, got_g[0]], [w, b]) else 1
    keys, smem = expected_kernels(n, vf, vb, *case.type_keys(), True, case.weight or case.bias, res,
                                  case.op in RMS_OPS)
    return bad, keys, smem


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ---- coverage: the kernels torch.profiler saw ----------------------------------------------------

def observed_kernels(prof) -> tuple:
    """({key: max dynamic smem seen or -1}, note) from the profiler's trace."""
    seen, note = {}, ""
    try:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "trace.json")
            prof.export_chrome_trace(path)
            with open(path) as f:
                events = json.load(f).get("traceEvents", [])
        items = [(e.get("name", ""), (e.get("args") or {}).get("shared memory", -1))
                 for e in events if e.get("cat") == "kernel"]
    except Exception as exc:  # fall back to the names alone
        note = f"trace args unavailable ({type(exc).__name__})"
        items = [(e.key, -1) for e in prof.key_averages()]
    for name, smem in items:
        m = re.search(r"\b(ln_[a-z_]+)<([^<>]*)>", name)
        if not m:
            continue
        args = [a.strip() for a in m.group(2).split(",")]
        for i, a in enumerate(args):  # the storage types (T, P) by their short names
            args[i] = next((short for long_, short in SHORT_TYPE_NAMES if long_ in a), a)
        key = f"{m.group(1)}<{','.join(args)}>"
        seen[key] = max(seen.get(key, -1), int(smem) if str(smem).lstrip("-").isdigit() else -1)
    return seen, note


# ---- main ----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--backend", default="native", choices=("native", "triton"))
    args = ap.parse_args(argv)

    run = start("sanitize_layer_norm", args, native=args.backend == "native")
    if run is None:
        return 2
    device, dtypes, side, gen, prof = run
    import pydl.ops as ops

    def row(i, c, keys, smem, result):
        smem = smem or 0
        kern = " ".join(k.replace("ln_", "") for k in keys) + (f" smem {smem // 1024}K" if smem > 48 * 1024 else "")
        wb = ("w" if c.weight else "-") + ("b" if c.bias else "-")
        dts = SHORT[c.dtype] + (f":{SHORT[c.param_dtype]}" if c.param_dtype else "")
        return (f"{i:3d} {dts:9s} {f'{c.m}x{c.n}':10s} {c.layout:10s} {c.op:15s} {str(c.act):9s} "
                f"{wb:4s} {'side' if c.stream and side is not None else 'dflt':6s} {kern:60s} {result}")

    cases = build_cases(dtypes, args.quick)
    results = run_cases(
        "sanitize_layer_norm", cases, args, T_START,
        f"{'#':>3s} {'dtype':9s} {'shape':10s} {'layout':10s} {'op':15s} {'act':9s} {'w b':4s} "
        f"{'stream':6s} {'expected kernels':60s} result",
        lambda c: run_case(ops, c, args.backend, device, gen, side), row)
    seen, smem_note = None, ""
    if prof is not None:
        prof.__exit__(None, None, None)
        seen, note = observed_kernels(prof)
        optin = [k for k, s in seen.items() if s > 48 * 1024]
        smem_note = (f"kernels with > 48 KB dynamic shared memory: {' '.join(sorted(optin)) or 'none seen'}"
                     + (f" ({note})" if note else ""))
    return finish("sanitize_layer_norm", cases, results, device, seen, static_keys,
                  what="the launchers chose differently: update expected_kernels / the shapes",
                  seen_note=smem_note, details=f"backend {args.backend}")


if __name__ == "__main__":
    sys.exit(main())
