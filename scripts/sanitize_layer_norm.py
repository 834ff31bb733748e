"""A small LayerNorm-family workload for compute-sanitizer (memcheck, racecheck) on a GPU.

    compute-sanitizer --tool memcheck --error-exitcode 1 python scripts/sanitize_layer_norm.py

Runs the forward and backward (dx, dresidual, dweight, dbias) of layer_norm, layer_norm_gelu and
add_layer_norm on the native CUDA backend (``--backend triton`` for the Triton kernels), in fp32
and bf16, over: an odd N (scalar tail path), a vectorized N, N = 20000 (the uncached path), and a
few small M, one of them large enough for several weight-gradient partial blocks. Inputs are made
on the CPU and copied over, and the float64 reference is computed on the CPU, so the only GPU
kernels the sanitizer sees are pydl's (plus copies). Each result is checked loosely against the
reference: a kernel that writes nothing or the wrong rows fails here even when the sanitizer is
quiet.

Run it with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so every tensor is its own allocation and memcheck
can see out-of-bounds accesses that the caching allocator would otherwise hide.
Exit codes: 0 all cases ran and matched; 1 a case failed; 2 the backend is unavailable here.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

# Run from anywhere: the checkout this script lives in comes first on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EPS = 1e-5
# (M, N): odd N, vectorized N, big N (uncached path), many rows for the dweight partials.
SHAPES = ((3, 97), (5, 1024), (2, 20000), (67, 768))
OPS = ("layer_norm", "layer_norm_gelu", "add_layer_norm")
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # ‖out − ref‖ / ‖ref‖


def reference(op, x, r, w, b):
    """float64 on the CPU; returns the outputs tuple."""
    if op == "add_layer_norm":
        h = x + r
        return F.layer_norm(h, (h.shape[-1],), w, b, EPS), h
    y = F.layer_norm(x, (x.shape[-1],), w, b, EPS)
    return (F.gelu(y) if op == "layer_norm_gelu" else y,)


def call(ops, op, backend, x, r, w, b):
    if op == "layer_norm":
        return (ops.layer_norm(x, w, b, EPS, backend=backend),)
    if op == "layer_norm_gelu":
        return (ops.layer_norm_gelu(x, w, b, EPS, backend=backend),)
    return tuple(ops.add_layer_norm(x, r, w, b, EPS, backend=backend))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().double().cpu()
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    ref = ref.detach()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def run_case(ops, op, backend, dtype, m, n, device, gen) -> tuple:
    cpu = [torch.randn(m, n, generator=gen, dtype=torch.float64),             # x
           torch.randn(m, n, generator=gen, dtype=torch.float64),             # residual
           1 + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64),      # weight
           0.1 * torch.randn(n, generator=gen, dtype=torch.float64)]          # bias
    cpu = [t.to(dtype).double() for t in cpu]  # the reference sees the rounded inputs
    n_out = 2 if op == "add_layer_norm" else 1
    grads_cpu = [torch.randn(m, n, generator=gen, dtype=torch.float64).to(dtype).double()
                 for _ in range(n_out)]

    leaves_ref = [t.clone().requires_grad_(True) for t in cpu]
    ref_out = reference(op, *leaves_ref)
    used = leaves_ref if op == "add_layer_norm" else [leaves_ref[0]] + leaves_ref[2:]
    ref_grads = torch.autograd.grad(ref_out, used, grads_cpu)

    dev_in = [t.to(dtype).to(device).requires_grad_(True) for t in cpu]
    x, r, w, b = dev_in
    out = call(ops, op, backend, x, r, w, b)
    used_dev = dev_in if op == "add_layer_norm" else [x, w, b]
    got_grads = torch.autograd.grad(out, used_dev, [g.to(dtype).to(device) for g in grads_cpu])
    if device.type == "cuda":
        torch.cuda.synchronize()

    names = ["y", "h"][:n_out] + (["dx", "dr", "dw", "db"] if op == "add_layer_norm" else ["dx", "dw", "db"])
    errs = [rel_err(o, ref) for o, ref in zip(list(out) + list(got_grads), list(ref_out) + list(ref_grads))]
    tol = TOL[dtype]
    bad = [f"{nm}={e:.2e}" for nm, e in zip(names, errs) if not e <= tol]
    return bad, max(errs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="native", choices=("native", "triton"))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: a dry run of this script on the native CPU kernels")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("sanitize_layer_norm: no CUDA device; nothing to check")
        return 2
    import pydl.ops as ops

    if args.backend == "native" and device.type == "cuda":
        from pydl import _native

        info = _native.info()
        if not info.get("cuda_built"):
            print(f"sanitize_layer_norm: native CUDA kernels not built ({info.get('error') or 'cpu-only build'})")
            return 2

    gen = torch.Generator().manual_seed(1234)
    failures, t0 = 0, time.perf_counter()
    print(f"{'op':16s} {'dtype':9s} {'shape':9s} {'max rel err':>11s}  result")
    for dtype in (getattr(torch, d) for d in args.dtypes):
        for op in OPS:
            for (m, n) in SHAPES:
                try:
                    bad, worst = run_case(ops, op, args.backend, dtype, m, n, device, gen)
                    result = "ok" if not bad else "MISMATCH " + ", ".join(bad)
                except Exception as exc:  # report and go on: the sanitizer log has the rest
                    bad, worst = [str(exc)], float("nan")
                    result = f"ERROR {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
                failures += bool(bad)
                print(f"{op:16s} {str(dtype).replace('torch.', ''):9s} {f'{m}x{n}':9s} {worst:11.2e}  {result}",
                      flush=True)
    print(f"sanitize_layer_norm: {failures} failing case(s), backend {args.backend}, "
          f"{time.perf_counter() - t0:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
