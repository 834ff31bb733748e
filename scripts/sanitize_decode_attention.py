"""The decode-attention workload for compute-sanitizer: every CUDA kernel and launch configuration of
csrc/cuda/decode_attention.cu, on small shapes, each result checked against the float64 reference.

    compute-sanitizer --tool memcheck --error-exitcode 99 python scripts/sanitize_decode_attention.py
    python scripts/sanitize_decode_attention.py --coverage   # no sanitizer: which kernels really ran

What the launcher runs (T: the storage type; VEC = 16 bytes / element (4 fp32, 8 fp16 / bf16) when E
and Ev are multiples of it and the caches' pointers and batch / head / position strides keep 16-byte
alignment, else 1, "scalar"):
  decode_split<T, VEC, GB, ITEMS>  one block per (row, KV head, head group, split): GB query heads
                                   (1, 2, 4, 8: the GQA ratio rounded up to a power of two, at most 8
                                   and at most 64 / (ITEMS * VEC)), ITEMS Ev chunks per thread (1, 2,
                                   4 by Ev / VEC <= 128, 256, 512; the scalar path always 4)
  decode_combine<T>                merges the splits through the float32 workspace; launched when
                                   the cache is split (B * Hkv * ceil(G / 8) < 4 * SMs and L > 256)
The cases below cover, per dtype, every GB, every ITEMS of the vector path, the scalar path, one split
and many, G = 16 (two head groups), lengths 0 / 1 / 17 / Lmax in one batch with NaN past them, int32
and int64 lengths, sliced / transposed caches and a side stream; expected_kernels is a replica of the
launcher's choice and --coverage checks with torch.profiler that every expected kernel ran.

Exit codes: 0 ok; 1 a case failed; 2 nothing to run here (no GPU / kernels not built); 3 --coverage: an
expected kernel did not run; 4 --time-limit-s stopped it before every kernel configuration had run.
Run under sanitizers with PYTORCH_NO_CUDA_MEMORY_CACHING=1 (every tensor its own allocation).
"""

from __future__ import annotations

import time

T_START = time.monotonic()  # --time-limit-s counts from here, torch's import and CUDA init included

import os  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scripts.sanitize_common import SHORT, finish, parser, profiled_kernels, run_cases, start  # noqa: E402

TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (5e-3, 1e-3), torch.bfloat16: (2e-2, 2e-3)}  # rel, abs
THREADS, TILE, MIN_SPLIT, MAX_SPLITS, BLOCKS_PER_SM = 128, 128, 256, 64, 4


@dataclass
class Case:
    dtype: torch.dtype
    B: int
    Hkv: int
    G: int
    L: int
    E: int
    Ev: int
    lens: list = field(default_factory=list)  # cycled over the rows
    layout: str = "contiguous"  # or "sliced", "bshd" (transposed), "misaligned" (scalar path)
    lens64: bool = False
    stream: bool = False


# ---- replica of the launcher's choice (csrc/cuda/decode_attention.cu) ---------------------------

def _cdiv(a, b):
    return -(-a // b)


def _pow2(n):
    p = 1
    while p < n:
        p <<= 1
    return p


def num_splits(B, Hkv, G, L, sms):
    units = B * Hkv * _cdiv(G, 8)
    s = 1
    if units < BLOCKS_PER_SM * sms and L > MIN_SPLIT:
        s = min(_cdiv(BLOCKS_PER_SM * sms, units), _cdiv(L, MIN_SPLIT), MAX_SPLITS)
    n = max(TILE, _cdiv(_cdiv(max(L, 1), s), TILE) * TILE)
    return _cdiv(max(L, 1), n)


def vector_ok(k, v, vec):
    def ok(t):
        return t.data_ptr() % 16 == 0 and all(t.stride(d) % vec == 0 for d in range(3) if t.shape[d] > 1)

    return k.shape[-1] % vec == 0 and v.shape[-1] % vec == 0 and ok(k) and ok(v)


def expected_kernels(c, vector, sms):
    """The kernel keys ('name<T,VEC,GB,ITEMS>') the call launches; vector: the 16-byte path."""
    t = SHORT[c.dtype]
    vec = (4 if c.dtype == torch.float32 else 8) if vector else 1
    cv = c.Ev // vec
    items = 4 if vec == 1 else (1 if cv <= THREADS else 2 if cv <= 2 * THREADS else 4)
    gb = min(_pow2(min(c.G, 8)), 64 // (items * vec))
    tppv = _pow2(_cdiv(cv, items))

    def smem(g):
        return 4 * (g * 4 + max(g * (c.E + TILE), (THREADS // tppv) * g * c.Ev))

    while gb > 1 and smem(gb) > 48 * 1024:
        gb //= 2
    keys = [f"decode_split<{t},{vec},{gb},{items}>"]
    if num_splits(c.B, c.Hkv, c.G, c.L, sms) > 1:
        keys.append(f"decode_combine<{t}>")
    return keys


def static_keys(c, sms):
    """expected_kernels from the case's layout alone (used to order the cases)."""
    vec = 4 if c.dtype == torch.float32 else 8
    return expected_kernels(c, c.layout != "misaligned" and c.E % vec == 0 and c.Ev % vec == 0, sms)


# ---- cases ---------------------------------------------------------------------------------------

def cases_of(dtype, quick):
    vec = 4 if dtype == torch.float32 else 8
    mixed = [0, 1, 17, 10 ** 9]  # 10**9: Lmax (clipped below)
    cs = []
    for G in (1, 2, 4, 8):  # every GB, split (B * Hkv = 2)
        cs.append(Case(dtype, 2, 1, G, 700, 64, 64, mixed))
    cs += [
        Case(dtype, 1, 1, 16, 300, 128, 128, [300], lens64=True),          # two head groups
        Case(dtype, 3, 1, 3, 200, 64, 64, [200, 0, 5]),                      # G = 3 (GB 4)
        Case(dtype, 2, 2, 4, 1100, 128, 128, [1100, 640], layout="sliced"),  # many splits, slice
        Case(dtype, 2, 2, 2, 600, 64, 64, [600, 17], layout="bshd", stream=True),
        Case(dtype, 2, 1, 4, 500, 64, 64, mixed, layout="misaligned"),       # scalar path, split
        Case(dtype, 1, 1, 8, 300, 64, 64, [300], layout="misaligned"),       # scalar path, GB 8
        Case(dtype, 2, 1, 2, 90, 7, 5, [90, 1]),                             # scalar: odd E / Ev
        Case(dtype, 1, 1, 2, 64, 16, vec * 200, [64]),                       # ITEMS 2
        Case(dtype, 1, 1, 2, 64, 16, vec * 300, [50]),                       # ITEMS 4
        Case(dtype, 1, 1, 1, 64, 16, 509, [64], layout="misaligned"),        # scalar, near its Ev limit
        Case(dtype, 8, 96, 1, 300, 64, 64, [300, 1, 0, 299]),                # one split (fills the GPU)
        Case(dtype, 2, 1, 2, 0, 16, 16, [0, 0]),                             # Lmax = 0
    ]
    if quick:
        cs = [c for i, c in enumerate(cs) if i in (3, 6, 8, 14, 15)]
    return cs


def build_cases(dtypes, quick, sms):
    """Every dtype's cases, those adding a kernel configuration first (a cut run has still
    launched every configuration once the first pass is through)."""
    cases = [c for d in dtypes for c in cases_of(d, quick)]
    first, rest, seen = [], [], set()
    for c in cases:
        keys = set(static_keys(c, sms))
        (first if keys - seen else rest).append(c)
        seen |= keys
    return first + rest


def make_cache(c, e, lens, gen, device):
    """The (B, Hkv, L, e) cache of the case's layout on `device`, NaN at and past each row's length;
    the view is taken on the device, so its strides and storage offset are the layout's."""
    views = {
        "sliced": ((c.B, c.Hkv, c.L + 29, e), lambda t: t[:, :, :c.L]),
        "bshd": ((c.B, c.L, c.Hkv, e), lambda t: t.transpose(1, 2)),
        "misaligned": ((c.B * c.Hkv * c.L * e + 1,), lambda t: t[1:].view(c.B, c.Hkv, c.L, e)),
    }
    shape, view = views.get(c.layout, ((c.B, c.Hkv, c.L, e), lambda t: t))
    base = torch.randn(shape, generator=gen).to(c.dtype)
    t = view(base)
    for b, n in enumerate(lens):
        t[b, :, n:] = float("nan")
    return view(base.to(device))


def run_case(ops, ref_fn, c, device, gen, side, sms):
    lens = [min(c.lens[b % len(c.lens)], c.L) for b in range(c.B)]
    q = (torch.randn(c.B, c.Hkv * c.G, 1, c.E, generator=gen) * 2).to(c.dtype).to(device)
    k = make_cache(c, c.E, lens, gen, device)
    v = make_cache(c, c.Ev, lens, gen, device)
    seq = torch.tensor(lens, dtype=torch.int64 if c.lens64 else torch.int32, device=device)
    stream = side if (c.stream and side is not None) else None
    with torch.no_grad():
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                out = ops.decode_attention(q, k, v, seq, backend="native")
            torch.cuda.current_stream().wait_stream(stream)
        else:
            out = ops.decode_attention(q, k, v, seq, backend="native")
    ref = ref_fn(q.cpu(), k.cpu(), v.cpu(), seq.cpu())  # float64 on the CPU: no sanitized kernels
    o = out.double().cpu()
    rtol, atol = TOL[c.dtype]
    bad = []
    if not torch.isfinite(o).all():
        bad.append("non-finite output (NaN past the lengths leaked?)")
    else:
        err = (o - ref).abs() - rtol * ref.abs()
        if err.max().item() > atol:
            i = int(err.reshape(-1).argmax())
            bad.append(f"max err {(o - ref).abs().max().item():.3e} at flat index {i}")
    vec = 4 if c.dtype == torch.float32 else 8
    return bad, (expected_kernels(c, vector_ok(k, v, vec), sms) if device.type == "cuda" else [])


# ---- main ----------------------------------------------------------------------------------------

KERNEL_NAMES = "decode_split|decode_combine"  # what --coverage looks for among the profiled kernels


def main(argv=None) -> int:
    args = parser(__doc__).parse_args(argv)
    run = start("sanitize_decode_attention", args)
    if run is None:
        return 2
    device, dtypes, side, gen, prof = run
    import pydl.ops as ops
    from pydl.ops.decode_attention import decode_attention_ref

    def row(i, c, keys, _, result):
        shape = f"{c.B} {c.Hkv} {c.G} {c.L} {c.E} {c.Ev}"
        lens = ",".join(str(min(n, c.L)) for n in c.lens[:4]) + ("/64" if c.lens64 else "")
        return (f"{i:3d} {SHORT[c.dtype]:5s} {shape:22s} {c.layout:10s} {lens:16s} "
                f"{'side' if c.stream and side is not None else 'dflt':6s} {' '.join(keys):50s} {result}")

    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    cases = build_cases(dtypes, args.quick, sms)
    results = run_cases(
        "sanitize_decode_attention", cases, args, T_START,
        f"{'#':>3s} {'dtype':5s} {'B Hkv G L E Ev':22s} {'layout':10s} {'lens':16s} {'stream':6s} "
        f"{'expected kernels':50s} result",
        lambda c: run_case(ops, decode_attention_ref, c, device, gen, side, sms) + (None,), row)
    return finish("sanitize_decode_attention", cases, results, device, profiled_kernels(prof, KERNEL_NAMES),
                  (lambda c: static_keys(c, sms)) if device.type == "cuda" else None,
                  what="the launcher chose differently: update expected_kernels / the cases")


if __name__ == "__main__":
    sys.exit(main())
