#!/usr/bin/env python3
"""Compiles the attention Triton kernels (pydl/triton/attention.py) for sm_90 (no GPU needed).

The companion of scripts/check_triton_compile.py (the LayerNorm family), with its compile
settings: ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` in a private empty cache, so
Triton's own ``ptxas -v`` log gives registers and spills. Configurations: each kernel (forward,
backward dk/dv, backward dq) in the launch configuration its launcher picks (``config()``) for
head dims 64 and 128 (and 256 with --all), bfloat16 plain (no mask, not causal, no dropout) and
with every flag on (additive mask, causal, dropout, dq storing ds), float32 (IEEE dot) plain;
--all adds float16, float32 with every flag, varlen and the bool mask. Runtime strides equal to 1 are specialized by
Triton at launch; the mask's key stride and every inner stride are taken as 1 here, as in the
common layouts.

Exit status 1 when a compile fails, shared memory exceeds sm_90's 227 KB or registers x threads
exceed the register file; spills are reported (--strict: they fail too).

usage: python scripts/check_triton_compile_attention.py [--all] [--strict] [-j N]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import io
import itertools
import sys
import time

import check_triton_compile as base  # noqa: E402 - sets the private cache, drops TRITON_INTERPRET

KERNELS = {"fwd": "_attn_fwd_kernel", "dkdv": "_attn_bwd_dkdv_kernel", "dq": "_attn_bwd_dq_kernel"}
SCALARS_FP32 = {"qk_scale", "sm_scale", "dropout_p"}
PTRS_FP32 = {"LSE", "Delta", "DS"}
SIZES = {"H", "GROUP", "Nq", "Nk", "E", "EV"}
PLAIN = dict(MASK=0, CAUSAL=False, DROPOUT=False, VARLEN=False, STORE_DS=False)
HEAVY = dict(MASK=2, CAUSAL=True, DROPOUT=True, VARLEN=False, STORE_DS=True)


def configs(full: bool) -> list:
    """[(kernel key, dtype, head block, (flag set name, flags))]."""
    dims = (64, 128, 256) if full else (64, 128)
    dtypes = ("bf16", "fp16", "fp32") if full else ("bf16", "fp32")
    flag_sets = [("plain", PLAIN), ("all-flags", HEAVY)]
    if full:
        flag_sets.append(("varlen-bool", dict(HEAVY, MASK=1, VARLEN=True, DROPOUT=False)))
    cfgs = [(k, dt, d, f) for k, dt, d, f in itertools.product(KERNELS, dtypes, dims, flag_sets)]
    # float32 (IEEE dots: FMA code, the slowest compiles): every flag only with --all
    return [c for c in cfgs if full or c[1] != "fp32" or c[3][0] == "plain"]


def _signature(fn, dt: str, constexprs: dict):
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name], consts[(i,)] = "constexpr", constexprs[name]
        elif name in SCALARS_FP32:
            sig[name] = "fp32"
        elif name == "sm_n":  # the mask's key stride: 1 in the usual layouts (Triton specializes it)
            sig[name], consts[(i,)] = "constexpr", 1
        elif name in SIZES or name.startswith("s"):
            sig[name] = "i32"
        else:  # pointers: torch's allocations are 16-byte aligned
            sig[name] = ("*i64" if name == "Seed" else "*i32" if name in ("CuQ", "CuK") else
                         "*fp32" if name in PTRS_FP32 else f"*{dt}")
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def compile_one(cfg) -> dict:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import pydl.triton.attention as attn

    key, dt, block_e, (flag_name, flags) = cfg
    fn = getattr(attn, KERNELS[key])
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt]
    launch = attn.config(key, block_e, torch_dtype)
    constexprs = {k: v for k, v in flags.items() if k in fn.arg_names}
    constexprs.update(PRECISION="ieee", BLOCK_M=launch.block_m, BLOCK_N=launch.block_n,
                      BLOCK_E=block_e, BLOCK_EV=block_e)
    res = dict(id=f"{key}.{dt}.e{block_e}.{flag_name}", launch=launch)
    t0 = time.perf_counter()
    try:
        sig, consts, attrs = _signature(fn, dt, constexprs)
        triton.knobs.nvidia.dump_ptxas_log = True
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                                    target=GPUTarget("cuda", 90, 32),
                                    options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
        log = out.getvalue()
        spill = base._PTXAS_RE["spill"].search(log)
        res.update(ok=True, regs=int(base._PTXAS_RE["regs"].search(log).group(1)),
                   spill=int(spill.group(1)) + int(spill.group(2)), smem=int(kernel.metadata.shared))
    except Exception as e:  # noqa: BLE001 - reported; the exit status says so
        res.update(ok=False, error=f"{type(e).__name__}: {e}")
    res["secs"] = time.perf_counter() - t0
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--all", action="store_true", help="more dtypes, head dims and flag sets")
    ap.add_argument("--strict", action="store_true", help="fail when a kernel spills")
    ap.add_argument("-j", "--jobs", type=int, default=2)
    args = ap.parse_args(argv)
    import triton

    cfgs = configs(args.all)
    print(f"triton {triton.__version__}: compiling {len(cfgs)} attention configurations for sm_90", flush=True)
    with cf.ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(compile_one, cfgs))
    bad = spilled = 0
    print(f"{'regs':>5} {'spill':>6} {'smem':>7} {'secs':>5}  config (BLOCK_M, BLOCK_N, warps, stages)")
    for r in results:
        if not r["ok"]:
            bad += 1
            print(f"COMPILE FAILED  {r['id']}\n    {r['error'][:2000]}")
            continue
        notes = []
        if r["spill"]:
            spilled += 1
            notes.append("<-- spills")
        if r["smem"] > base.MAX_SMEM or r["regs"] * 32 * r["launch"].num_warps > base.REGS_PER_SM:
            bad += 1
            notes.append("<-- exceeds sm_90 shared memory or registers: cannot launch")
        print(f"{r['regs']:>5} {r['spill']:>6} {r['smem']:>7} {r['secs']:>5.1f}  {r['id']} "
              f"{tuple(r['launch'])} {' '.join(notes)}")
    print(f"{len(cfgs)} configurations: {bad} failed or over the limits, {spilled} spill")
    return 1 if bad or (args.strict and spilled) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        base.shutil.rmtree(base._CACHE, ignore_errors=True)
