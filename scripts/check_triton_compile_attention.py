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

import functools
import itertools

import triton_compile_common as common  # before triton: sets the private cache, drops TRITON_INTERPRET

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
    import pydl.triton.attention as attn

    key, dt, block_e, (flag_name, flags) = cfg
    fn = getattr(attn, KERNELS[key])
    launch = attn.config(key, block_e, common.torch_dtype(dt))
    constexprs = {k: v for k, v in flags.items() if k in fn.arg_names}
    constexprs.update(PRECISION="ieee", BLOCK_M=launch.block_m, BLOCK_N=launch.block_n,
                      BLOCK_E=block_e, BLOCK_EV=block_e)
    res = dict(id=f"{key}.{dt}.e{block_e}.{flag_name}", launch=launch)
    signature = functools.partial(_signature, fn, dt, constexprs)
    return common.compile_into(res, fn, signature, launch.num_warps, launch.num_stages)


def main(argv=None) -> int:
    return common.companion_main(argv, doc=__doc__, family="attention",
                                 all_help="more dtypes, head dims and flag sets",
                                 configs=configs, compile_one=compile_one,
                                 launch_fields="BLOCK_M, BLOCK_N, warps, stages")


if __name__ == "__main__":
    common.run_and_clean_up(main)
