#!/usr/bin/env python3
"""Compiles the Triton kernels of pydl/triton/layer_norm.py for sm_90 (no GPU needed).

The Triton interpreter that runs the kernels in CI is not the compiler: compile errors,
register spills and shared-memory overflows only show up here. Each kernel is compiled with
``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (ptxas ships with Triton) in the launch
configurations its launcher picks (BLOCK_M, BLOCK_N, num_warps come from the launcher's own
``_*_config`` functions, enumerated over M and N), for float32 / float16 / bfloat16 (and
float32 weight / bias with float16 / bfloat16 x: mixed precision, "bf16:fp32") and the
has-residual / weight / bias / activation / gradient / RMS (RMSNorm) constexprs, with 16-byte-aligned and
unaligned pointers and sizes. For each configuration it prints registers and spill bytes (from
Triton's own ``ptxas -v`` run, in a private empty cache) and shared memory.

Configuration sets:
  default  every launch shape with the heaviest flags, plus a pairwise cover of the flags,
           dtypes and alignment (every pair of values appears together at least once);
           ~140 compiles per Triton version.
  --all    the full product (thousands of compiles: for a build machine, with -j).

Exit status 1 when a compile fails, shared memory exceeds sm_90's 227 KB, registers x threads
exceed the SM's 64K registers (the launch would fail), or (with --strict) anything spills.

usage: python scripts/check_triton_compile.py [--all] [--strict] [-j N] [--kernel SUBSTR]
                                              [--dump-ptx DIR]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import itertools
import os
import time

# before triton: a private, empty cache (every kernel really compiled, its ptxas log there to read),
# no TRITON_INTERPRET
import triton_compile_common as common
from triton_compile_common import MAX_SMEM, REGS_PER_SM

SM_COUNT = 132  # H100 / H200 SXM: decides which BLOCK_M the forward launcher can pick
# x's dtype, or "x:parameters" (mixed precision: float32 weight / bias with a 16-bit x).
DTYPES = ("fp32", "fp16", "bf16", "bf16:fp32", "fp16:fp32")
PARAM_PTRS = {"W", "B"}  # weight, bias: the parameters' dtype
ACC_PTRS = {"MEAN", "RSTD", "PDW", "PDB", "C1", "C2"}  # float32 (the accumulation dtype)
BOOL = (False, True)
ACTS = (0, 1, 2)


def _tile_shapes(tile_config, max_tile):
    """Every (BLOCK_M, BLOCK_N, num_warps) the single-tile launcher returns, over M and N."""
    shapes = set()
    for n_log in range(0, max_tile.bit_length()):
        for m_log in range(0, 24):
            cfg = tile_config(1 << m_log, 1 << n_log)
            if cfg is not None:
                shapes.add(cfg)
    return sorted(shapes, key=lambda s: (s[0] * s[1], -s[0]))


def _representative(shapes):
    """One single-row tile (BLOCK_M = 1) per tile size, plus a few packed (BLOCK_M > 1) tiles:
    the layouts and per-thread element counts the launcher produces. shapes: [(constexprs,
    num_warps)]."""
    picked = []
    for shape, nw in shapes:
        bm, bn = shape["BLOCK_M"], shape["BLOCK_N"]
        single = bm == 1 and (bn.bit_length() % 2 == 1 or nw > 1)  # 1, 4, 16, ..; all multi-warp
        if single or (bm, bn) in ((2048, 1), (128, 16), (16, 128), (2, 1024)):
            picked.append((shape, nw))
    return picked


def _pairwise(factors: dict) -> list:
    """A small set of assignments covering every pair of values of every two factors
    (deterministic greedy all-pairs)."""
    names = list(factors)
    uncovered = set()
    for a, b in itertools.combinations(range(len(names)), 2):
        for va in factors[names[a]]:
            for vb in factors[names[b]]:
                uncovered.add((a, va, b, vb))
    product = list(itertools.product(*(factors[n] for n in names)))
    chosen = []
    while uncovered:
        best, best_gain = None, -1
        for combo in product:
            gain = sum((a, combo[a], b, combo[b]) in uncovered
                       for a, b in itertools.combinations(range(len(names)), 2))
            if gain > best_gain:
                best, best_gain = combo, gain
        chosen.append(dict(zip(names, best)))
        for a, b in itertools.combinations(range(len(names)), 2):
            uncovered.discard((a, best[a], b, best[b]))
    return chosen


def _kernel_specs(ln):
    """(kernel, shapes [(constexprs, num_warps)], flag factors, heaviest flags)."""
    fwd_tiles = _tile_shapes(lambda m, n: ln._fwd_tile_config(m, n, SM_COUNT), ln.FWD_MAX_TILE)
    bwd_tiles = _tile_shapes(ln._bwd_tile_config, ln.BWD_MAX_TILE)
    fchunk, fnw = ln._fwd_chunk_config()
    bchunk, bnw = ln._bwd_chunk_config()
    wb3 = [(False, False), (True, False), (True, True)]

    def tile_shapes(tiles):
        return [(dict(BLOCK_M=m, BLOCK_N=n), nw) for m, n, nw in tiles]

    # Heaviest flags: LayerNorm with each GELU, and RMSNorm (no bias) with the tanh GELU.
    return [
        ("_ln_fwd_fused_kernel", tile_shapes(fwd_tiles),
         dict(HAS_RES=BOOL, HAS_W=BOOL, HAS_B=BOOL, ACT=ACTS, RMS=BOOL),
         [dict(HAS_RES=True, HAS_W=True, HAS_B=True, ACT=a, RMS=False) for a in (1, 2)]
         + [dict(HAS_RES=True, HAS_W=True, HAS_B=False, ACT=2, RMS=True)]),
        ("_ln_fwd_stats_chunked_kernel", [(dict(BLOCK_N=fchunk), fnw)],
         dict(HAS_RES=BOOL, RMS=BOOL), [dict(HAS_RES=True, RMS=r) for r in BOOL]),
        ("_ln_fwd_apply_chunked_kernel", [(dict(BLOCK_N=fchunk), fnw)],
         dict(HAS_W=BOOL, HAS_B=BOOL, ACT=ACTS, RMS=BOOL),
         [dict(HAS_W=True, HAS_B=True, ACT=a, RMS=False) for a in (1, 2)]
         + [dict(HAS_W=True, HAS_B=False, ACT=2, RMS=True)]),
        ("_ln_bwd_fused_kernel", tile_shapes(bwd_tiles),
         dict(HAS_DH=BOOL, WGRAD=wb3, BGRAD=wb3, ACT=ACTS, RMS=BOOL),
         [dict(HAS_DH=True, WGRAD=(True, True), BGRAD=(True, True), ACT=a, RMS=False) for a in (1, 2)]
         + [dict(HAS_DH=True, WGRAD=(True, True), BGRAD=(False, False), ACT=2, RMS=True)]),
        ("_ln_bwd_rowsums_chunked_kernel", [(dict(BLOCK_N=bchunk), bnw)],
         dict(HAS_W=BOOL, HAS_B=BOOL, ACT=ACTS, RMS=BOOL),
         [dict(HAS_W=True, HAS_B=True, ACT=a, RMS=False) for a in (1, 2)]
         + [dict(HAS_W=True, HAS_B=False, ACT=2, RMS=True)]),
        ("_ln_bwd_apply_chunked_kernel", [(dict(BLOCK_N=bchunk), bnw)],
         dict(HAS_DH=BOOL, WGRAD=wb3, BGRAD=wb3, ACT=ACTS, RMS=BOOL),
         [dict(HAS_DH=True, WGRAD=(True, True), BGRAD=(True, True), ACT=a, RMS=False) for a in (1, 2)]
         + [dict(HAS_DH=True, WGRAD=(True, True), BGRAD=(False, False), ACT=2, RMS=True)]),
    ]


def _expand_flags(flags: dict) -> dict:
    out = dict(flags)
    if "WGRAD" in out:
        out["HAS_W"], out["STORE_DW"] = out.pop("WGRAD")
    if "BGRAD" in out:
        out["HAS_B"], out["STORE_DB"] = out.pop("BGRAD")
    if out.get("RMS"):  # RMSNorm has no bias: the launchers never combine them
        out["HAS_B"] = False
        if "STORE_DB" in out:
            out["STORE_DB"] = False
    return out


def configs(ln, full: bool, kernel_filter: str | None):
    """[(kernel name, dtype, aligned, constexprs, num_warps)]."""
    out = []
    for name, shapes, factors, heavy in _kernel_specs(ln):
        if kernel_filter and kernel_filter not in name:
            continue
        has_params = bool(PARAM_PTRS & set(getattr(ln, name).arg_names))
        dtypes = DTYPES if has_params else tuple(d for d in DTYPES if ":" not in d)
        if full:
            for (shape, nw), dt, aligned in itertools.product(shapes, dtypes, BOOL):
                for combo in itertools.product(*factors.values()):
                    flags = _expand_flags(dict(zip(factors, combo)))
                    out.append((name, dt, aligned, {**shape, **flags}, nw))
            continue
        seen = set()

        def add(dt, aligned, shape, nw, flags):
            cfg = (name, dt, aligned, {**shape, **_expand_flags(flags)}, nw)
            key = (dt, aligned, tuple(sorted(cfg[3].items())), nw)
            if key not in seen:
                seen.add(key)
                out.append(cfg)

        reps = _representative(shapes) if len(shapes) > 1 else shapes
        for i, (shape, nw) in enumerate(reps):  # every launch shape, heaviest flags
            add(DTYPES[i % 3], True, shape, nw, heavy[i % len(heavy)])
        big_shape, big_nw = reps[-1]  # the largest tile: every dtype, every heavy flag set
        for dt, flags in itertools.product(dtypes, heavy):
            add(dt, True, big_shape, big_nw, flags)
        mid_shape, mid_nw = reps[len(reps) // 2]
        for assign in _pairwise({**factors, "dtype": dtypes, "aligned": BOOL}):
            dt, aligned = assign.pop("dtype"), assign.pop("aligned")
            add(dt, aligned, mid_shape, mid_nw, assign)
    return out


def _signature(fn, dt: str, constexprs: dict, aligned: bool):
    x_dt, _, param_dt = dt.partition(":")
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs or name == "SOFT_RNE":
            sig[name] = "constexpr"
            consts[(i,)] = constexprs.get(name, False)  # SOFT_RNE: False on a GPU
        elif name == "eps":
            sig[name] = "fp32"
        elif name in ("M", "N") or name.startswith("stride"):  # sizes and row strides
            sig[name] = "i32"
            if aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:  # pointers (torch's allocations are 16-byte aligned; views may not be)
            sig[name] = ("*fp32" if name in ACC_PTRS else
                         f"*{param_dt or x_dt}" if name in PARAM_PTRS else f"*{x_dt}")
            if aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def compile_one(cfg, dump_dir=None):
    """Compiles one configuration; returns a result dict (never raises)."""
    import pydl.triton.layer_norm as ln

    name, dt, aligned, constexprs, nw = cfg
    fn = getattr(ln, name)
    res = dict(kernel=name, dtype=dt, aligned=aligned, constexprs=constexprs, num_warps=nw)
    return common.compile_into(res, fn, functools.partial(_signature, fn, dt, constexprs, aligned), nw,
                               ptx_path=os.path.join(dump_dir, config_id(cfg) + ".ptx") if dump_dir else None)


_ABBREV = {"HAS_RES": "res", "HAS_DH": "dh", "HAS_W": "w", "HAS_B": "b", "ACT": "act",
           "STORE_DW": "dw", "STORE_DB": "db", "BLOCK_M": "bm", "BLOCK_N": "bn", "RMS": "rms"}


def config_id(cfg) -> str:
    name, dt, aligned, constexprs, nw = cfg
    flags = "-".join(f"{_ABBREV.get(k, k)}{int(v)}" for k, v in constexprs.items())
    return f"{name.strip('_')}.{dt.replace(':', '-')}.{'a16' if aligned else 'a1'}.nw{nw}.{flags}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--all", action="store_true", help="the full product of configurations")
    ap.add_argument("--strict", action="store_true", help="fail when a kernel spills")
    ap.add_argument("-j", "--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--kernel", help="only kernels whose name contains this")
    ap.add_argument("--dump-ptx", metavar="DIR", help="write each config's PTX (no debug info)")
    args = ap.parse_args(argv)

    import triton

    import pydl.triton.layer_norm as ln

    cfgs = configs(ln, args.all, args.kernel)
    print(f"triton {triton.__version__}: compiling {len(cfgs)} configurations for sm_90 "
          f"({args.jobs} jobs)", flush=True)
    t0 = time.perf_counter()
    if args.jobs > 1:
        with cf.ProcessPoolExecutor(args.jobs) as pool:
            results = list(pool.map(compile_one, cfgs, itertools.repeat(args.dump_ptx),
                                    chunksize=4))
    else:
        results = [compile_one(c, args.dump_ptx) for c in cfgs]

    failed = bad_smem = bad_regs = spilled = 0
    print(f"{'regs':>5} {'spill_st':>8} {'spill_ld':>8} {'smem':>7} {'secs':>5}  config")
    for cfg, r in zip(cfgs, results):
        cid = config_id(cfg)
        if not r["ok"]:
            failed += 1
            print(f"COMPILE FAILED  {cid}\n    {r['error'][:2000]}")
            continue
        flags = []
        if r["spill_st"] or r["spill_ld"]:
            spilled += 1
            flags.append("<-- spills")
        if r["smem"] > MAX_SMEM:
            bad_smem += 1
            flags.append(f"<-- shared memory > {MAX_SMEM}")
        if r["regs"] * 32 * r["num_warps"] > REGS_PER_SM:
            bad_regs += 1
            flags.append("<-- registers x threads > 64K: cannot launch")
        print(f"{r['regs']:>5} {r['spill_st']:>8} {r['spill_ld']:>8} {r['smem']:>7} "
              f"{r['secs']:>5.1f}  {cid}{'  ' + ' '.join(flags) if flags else ''}")
    ok = [r for r in results if r["ok"]]
    if ok:
        print(f"max registers {max(r['regs'] for r in ok)}, max shared memory "
              f"{max(r['smem'] for r in ok)} B")
    print(f"{len(cfgs)} configurations in {time.perf_counter() - t0:.0f}s: {failed} failed, "
          f"{spilled} spill, {bad_smem} over shared memory, {bad_regs} over the register file")
    status = failed or bad_smem or bad_regs or (args.strict and spilled)
    return 1 if status else 0


if __name__ == "__main__":
    common.run_and_clean_up(main)
