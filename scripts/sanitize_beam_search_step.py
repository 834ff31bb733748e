"""The beam-search-step workload for compute-sanitizer: every CUDA kernel and launch configuration of
csrc/cuda/beam_search_step.cu, on small shapes, each result checked against the float64 reference.

    compute-sanitizer --tool memcheck --error-exitcode 99 python scripts/sanitize_beam_search_step.py
    python scripts/sanitize_beam_search_step.py --coverage   # no sanitizer: which kernels really ran

What the launcher runs (T: the logits' storage type; VEC = 16 bytes / element (4 fp32, 8 fp16 / bf16)
when the logits' base pointer is 16-byte aligned and their row stride a multiple of VEC, else 1,
"scalar"):
  beam_partial<T, VEC>  one block per (row b*K + k, vocabulary slice): online max / sum-exp and the
                        slice's top n (logit, id) into the workspace; slices per row from the SM count
                        (about 4 blocks per SM), at most K * slices * n = 32768 candidates per batch row
  beam_merge<T>         one block per batch row: row statistics, scores, the top n over K x slices,
                        and (boundary ties only) a rescan of the row's logits in flat order
Inside the kernels (no separate configurations): the first-tile survivor cut, its bisection (one
thread's elements all low), the boundary-tie rescan (float32 scores collapsing at -1e6, ties of equal
logits, banned ids with n = K*V). The cases cover each per dtype, plus misaligned / odd-stride logits
(scalar path), banned ids, -inf logits, the first step (beam scores -1e9), V = 128256 with several
slices, K = 64 with n = 256, and a side stream; expected_kernels is a replica of the launcher's choice
and --coverage checks with torch.profiler that every expected kernel ran.

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

RTOL, ATOL = 2e-6, 2e-6  # scores: float32 math on exactly converted logits, every dtype


@dataclass
class Case:
    dtype: torch.dtype
    B: int
    K: int
    V: int
    n: int
    fill: str = "randn"  # or "zeros", "ints", "neginf" (every 3rd -inf), "lowthread", "collapse"
    layout: str = "contiguous"  # or "misaligned" (base + 1 element), "padded" (row stride V + 1)
    first_step: bool = False  # beam scores -1e9 but beam 0's
    banned: list = field(default_factory=list)
    stream: bool = False


# ---- replica of the launcher's choice (csrc/cuda/beam_search_step.cu) ---------------------------

def vector_ok(logits):
    vec = 16 // logits.element_size()
    return logits.data_ptr() % 16 == 0 and (logits.shape[0] <= 1 or logits.stride(0) % vec == 0)


def expected_kernels(c, vector):
    t = SHORT[c.dtype]
    vec = (4 if c.dtype == torch.float32 else 8) if vector else 1
    return [f"beam_partial<{t},{vec}>", f"beam_merge<{t}>"]


def static_keys(c):
    vec = 4 if c.dtype == torch.float32 else 8
    return expected_kernels(c, c.layout == "contiguous" or (c.layout == "padded" and (c.V + 1) % vec == 0))


# ---- cases ---------------------------------------------------------------------------------------

def cases_of(dtype, quick):
    cs = [
        Case(dtype, 8, 4, 50257, 8),                                      # GPT-2, vector path
        Case(dtype, 2, 4, 1003, 8, layout="misaligned"),                  # scalar path
        Case(dtype, 2, 3, 640, 6, layout="padded", banned=[0, 17, 639]),  # odd row stride, banned
        Case(dtype, 1, 4, 128256, 8, stream=True),                        # several slices per row
        Case(dtype, 1, 64, 4100, 256),                                    # K = 64, n = 256
        Case(dtype, 1, 1, 8192, 256, fill="lowthread"),                   # the bisection
        Case(dtype, 2, 4, 1000, 8, fill="zeros"),                         # equal logits
        Case(dtype, 2, 4, 3000, 100, fill="ints", banned=[3, 4]),         # many ties
        Case(dtype, 2, 3, 1000, 8, fill="collapse"),                      # boundary-tie rescan
        Case(dtype, 2, 4, 1500, 8, fill="neginf", banned=[1, 2]),         # -inf logits
        Case(dtype, 2, 4, 7, 8, first_step=True),                         # first step, n > V
        Case(dtype, 1, 2, 5, 10, banned=[1, 3]),                          # n = K*V with banned ids
    ]
    if quick:
        cs = [cs[i] for i in (0, 1, 8)]
    return cs


def build_cases(dtypes, quick):
    """Every dtype's cases, those adding a kernel configuration first."""
    cases = [c for d in dtypes for c in cases_of(d, quick)]
    first, rest, seen = [], [], set()
    for c in cases:
        keys = set(static_keys(c))
        (first if keys - seen else rest).append(c)
        seen |= keys
    return first + rest


def make_logits(c, gen, device):
    rows, V = c.B * c.K, c.V
    vec = 4 if c.dtype == torch.float32 else 8
    if c.fill == "zeros":
        x = torch.zeros(rows, V)
    elif c.fill == "ints":
        x = torch.randint(-3, 4, (rows, V), generator=gen).float()
    elif c.fill == "collapse":
        x = torch.randn(rows, V, generator=gen) * 0.05
    elif c.fill == "lowthread":  # thread 0 of every 4096-element tile holds only -100
        x = torch.randn(rows, V, generator=gen)
        v = torch.arange(V)
        x[:, ((v % 4096) // vec) % 256 == 0] = -100.0
    else:
        x = torch.randn(rows, V, generator=gen) * 3
        if c.fill == "neginf":
            x[:, ::3] = float("-inf")
    x = x.to(c.dtype)
    if c.layout == "misaligned":
        buf = torch.empty(rows * V + 1, dtype=c.dtype, device=device)
        t = buf[1:].view(rows, V)
        t.copy_(x)
        return t
    if c.layout == "padded":
        buf = torch.full((rows, V + 1), float("nan"), dtype=c.dtype, device=device)
        t = buf[:, :V]
        t.copy_(x)
        return t
    return x.to(device)


def run_case(ops, ref_fn, c, device, gen, side):
    logits = make_logits(c, gen, device)
    beam = torch.randn(c.B, c.K, generator=gen) * 2
    if c.first_step:
        beam = torch.full((c.B, c.K), -1e9)
        beam[:, 0] = 0
    if c.fill == "collapse":
        beam = beam - 1e6  # ulp(1e6) = 1/16: distinct logits give equal float32 scores
    beam = beam.to(device)
    banned = torch.tensor(c.banned, dtype=torch.int64, device=device) if c.banned else None
    stream = side if (c.stream and side is not None) else None
    with torch.no_grad():
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                s, t, b = ops.beam_search_step(logits, beam, c.n, banned_tokens=banned, backend="native")
            torch.cuda.current_stream().wait_stream(stream)
        else:
            s, t, b = ops.beam_search_step(logits, beam, c.n, banned_tokens=banned, backend="native")
    # float64 reference on the CPU (no sanitized kernels): scores, and every entry's score for ties
    lc, bc = logits.cpu(), beam.cpu()
    rs, rt, rb = ref_fn(lc, bc, c.n, None if banned is None else banned.cpu())
    full = torch.log_softmax(lc.double(), -1).view(c.B, c.K, c.V) + bc.double()[..., None]
    if banned is not None:
        full[..., banned.cpu()] = float("-inf")
    full = full.view(c.B, -1)
    s, t, b = s.double().cpu(), t.cpu(), b.cpu()
    bad = []
    if not ((t >= 0) & (t < c.V) & (b >= 0) & (b < c.K)).all():
        bad.append("token / beam out of range")
        return bad, []
    flat, rflat = b * c.V + t, rb * c.V + rt
    got_ref = full.gather(1, flat)
    err = ((s - got_ref).abs() - RTOL * got_ref.abs()).nan_to_num(0.0, posinf=0.0, neginf=0.0)
    same_inf = (s == got_ref) | (s.isnan() & got_ref.isnan())
    if ((err > ATOL) & ~same_inf).any():
        bad.append(f"score error {(s - got_ref).abs().nan_to_num(0).max().item():.3e}")
    # Indices: the reference's, except where both scores are near (not exactly) equal.
    a, r = full.gather(1, flat), full.gather(1, rflat)
    near = (a - r).abs() <= ATOL + RTOL * r.abs()
    ok = (flat == rflat) | (near & (a != r))
    if not ok.all():
        i = int((~ok).reshape(-1).nonzero()[0])
        bad.append(f"index mismatch at {i}: got flat {int(flat.reshape(-1)[i])}, want {int(rflat.reshape(-1)[i])}")
    return bad, (expected_kernels(c, vector_ok(logits)) if device.type == "cuda" else [])


# ---- main ----------------------------------------------------------------------------------------

KERNEL_NAMES = "beam_partial|beam_merge"  # what --coverage looks for among the profiled kernels


def main(argv=None) -> int:
    args = parser(__doc__).parse_args(argv)
    run = start("sanitize_beam_search_step", args)
    if run is None:
        return 2
    device, dtypes, side, gen, prof = run
    import pydl.ops as ops
    from pydl.ops.beam_search_step import beam_search_step_ref

    def row(i, c, keys, _, result):
        extra = ("first " if c.first_step else "") + (f"ban{len(c.banned)}" if c.banned else "")
        return (f"{i:3d} {SHORT[c.dtype]:5s} {f'{c.B} {c.K} {c.V} {c.n}':20s} {c.fill:9s} {c.layout:10s} "
                f"{extra:14s} {'side' if c.stream and side is not None else 'dflt':6s} {' '.join(keys):40s} {result}")

    cases = build_cases(dtypes, args.quick)
    results = run_cases(
        "sanitize_beam_search_step", cases, args, T_START,
        f"{'#':>3s} {'dtype':5s} {'B K V n':20s} {'fill':9s} {'layout':10s} {'extra':14s} {'stream':6s} "
        f"{'expected kernels':40s} result",
        lambda c: run_case(ops, beam_search_step_ref, c, device, gen, side) + (None,), row)
    return finish("sanitize_beam_search_step", cases, results, device, profiled_kernels(prof, KERNEL_NAMES),
                  static_keys if device.type == "cuda" else None,
                  what="the launcher chose differently: update expected_kernels / the cases")


if __name__ == "__main__":
    sys.exit(main())
