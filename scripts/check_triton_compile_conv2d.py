#!/usr/bin/env python3
"""Compiles the conv2d Triton kernels (pydl/triton/conv2d.py) for sm_90 (no GPU needed).

The companion of scripts/check_triton_compile.py (the LayerNorm family), with its compile
settings: ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` in a private empty cache, so
Triton's own ``ptxas -v`` log gives registers and spills. Configurations: every entry of the
launchers' tile tables (``_TILES_16`` for bfloat16 / float16, ``_TILES_32`` for float32) for each
kernel variant the launchers pick — forward (3×3 per-tap K, 4×4 FLAT K for small Cin, with bias),
data gradient (3×3), weight gradient (3×3 per-tap N, 4×4 FLAT N), the 1×1 GEMM as the forward
(16-bit output, bias) and as the split-K weight gradient (float32 partials), and the FLAT
variants once more with no integer argument a multiple of 16 (the RGB stem: Cin = 3) — in bfloat16 and
float32 (IEEE dots); --all adds float16 and the float32 tf32 dots. The channel strides are taken
as 1 (channels_last, the layout the launchers hand the kernels); Triton specializes them so at
launch.

Exit status 1 when a compile fails, shared memory exceeds sm_90's 227 KB or registers x threads
exceed the register file; spills are reported (--strict: they fail too).

usage: python scripts/check_triton_compile_conv2d.py [--all] [--strict] [-j N]
"""

from __future__ import annotations

import functools
import itertools

import triton_compile_common as common  # before triton: sets the private cache, drops TRITON_INTERPRET

# variant -> (kernel, table key, constexprs, pointer dtypes: name -> "x" (the operand dtype) or fp32,
#             runtime args taken as 1)
_FWD_ONES = {"sxc", "swc", "syc"}
VARIANTS = {
    "fwd": ("_conv_fwd_kernel", "fwd", dict(KH=3, KW=3, FLAT=False, HAS_BIAS=True), {}, _FWD_ONES),
    "fwd-flat": ("_conv_fwd_kernel", "fwd", dict(KH=4, KW=4, FLAT=True, HAS_BIAS=True), {}, _FWD_ONES),
    "dx": ("_conv_dx_kernel", "dx", dict(KH=3, KW=3), {}, {"sdc", "swc", "sxc"}),
    "dw": ("_conv_dw_kernel", "dw", dict(KH=3, KW=3, FLAT=False), {"P": "fp32"}, {"sxc", "sdc"}),
    "dw-flat": ("_conv_dw_kernel", "dw", dict(KH=4, KW=4, FLAT=True), {"P": "fp32"}, {"sxc", "sdc"}),
    # the RGB stem's real launch: Cin_g = 3, so no size or stride is a multiple of 16
    "fwd-flat-unaligned": ("_conv_fwd_kernel", "fwd", dict(KH=4, KW=4, FLAT=True, HAS_BIAS=True), {}, _FWD_ONES),
    "dw-flat-unaligned": ("_conv_dw_kernel", "dw", dict(KH=4, KW=4, FLAT=True), {"P": "fp32"}, {"sxc", "sdc"}),
    "gemm-fwd": ("_gemm_kernel", "gemm", dict(HAS_BIAS=True), {}, {"sak", "sbk", "scn"}),
    "gemm-dw": ("_gemm_kernel", "gemm", dict(HAS_BIAS=False), {"C": "fp32", "Bias": "fp32"}, {"sam", "sbn", "scn"}),
}


# Integer arguments taken as multiples of 16, as Triton specializes them at launch in the common
# case (channel counts multiples of 16, so every stride but the channels' is one too; the 1x1
# GEMMs' N and K, and the split-K chunk, a multiple of BLOCK_K); spatial sizes and the GEMMs' M are not.
DIVISIBLE = {"CIN_G", "COUT_G", "K_SPLIT", "N_GEMM", "K"}


def configs(full: bool) -> list:
    """[(variant, dtype, size class, precision)]."""
    import pydl.triton.conv2d as conv

    dtypes = ("bf16", "fp16", "fp32") if full else ("bf16", "fp32")
    out = []
    for variant, dt in itertools.product(VARIANTS, dtypes):
        table = (conv._TILES_32 if dt == "fp32" else conv._TILES_16)[VARIANTS[variant][1]]
        for size in table:
            precisions = ("ieee", "tf32") if dt == "fp32" and full else ("ieee",)
            out += [(variant, dt, size, p) for p in precisions]
    seen, unique = set(), []
    for variant, dt, size, p in out:  # one compile per distinct launch (the cache would hide the log)
        table = (conv._TILES_32 if dt == "fp32" else conv._TILES_16)[VARIANTS[variant][1]]
        key = (variant, dt, table[size], p)
        if key not in seen:
            seen.add(key)
            unique.append((variant, dt, size, p))
    return unique


def _signature(fn, dt: str, constexprs: dict, ptr_types: dict, ones: set, aligned: bool = True):
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name], consts[(i,)] = "constexpr", constexprs[name]
        elif name in ones:
            sig[name], consts[(i,)] = "constexpr", 1
        elif name[0].isupper() and len(name) <= 4 and name not in ("N", "H", "W", "M", "K", "HO", "WO"):
            sig[name] = f"*{ptr_types.get(name, dt)}"  # pointers: torch's allocations are 16-byte aligned
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if not aligned:
                continue
            if name in DIVISIBLE or (name.startswith("s") and name not in ones) or (name == "N" and fn.__name__ == "_gemm_kernel"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def compile_one(cfg) -> dict:
    import pydl.triton.conv2d as conv

    variant, dt, size, precision = cfg
    kname, table_key, flags, ptr_types, ones = VARIANTS[variant]
    fn = getattr(conv, kname)
    launch = conv.config(table_key, size, common.torch_dtype(dt))
    constexprs = dict(flags, PRECISION=precision, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n,
                      BLOCK_K=launch.block_k, GROUP_M=conv.GROUP_M)
    res = dict(id=f"{variant}.{dt}.n{size}{'.tf32' if precision == 'tf32' else ''}", launch=launch)
    signature = functools.partial(_signature, fn, dt, constexprs, ptr_types, ones,
                                  aligned=not variant.endswith("unaligned"))
    return common.compile_into(res, fn, signature, launch.num_warps, launch.num_stages)


def main(argv=None) -> int:
    return common.companion_main(argv, doc=__doc__, family="conv2d", all_help="float16 and tf32 too",
                                 configs=configs, compile_one=compile_one,
                                 launch_fields="BLOCK_M, BLOCK_N, BLOCK_K, warps, stages")


if __name__ == "__main__":
    common.run_and_clean_up(main)
