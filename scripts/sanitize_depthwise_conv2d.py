"""The depthwise-conv2d workload for compute-sanitizer: every CUDA kernel and launch configuration of
csrc/cuda/depthwise_conv2d_{fwd,bwd}.cu, on small shapes, forward and backward (autograd) checked
against float64 F.conv2d(..., groups=C) on the CPU.

    compute-sanitizer --tool memcheck --error-exitcode 99 python scripts/sanitize_depthwise_conv2d.py
    python scripts/sanitize_depthwise_conv2d.py --coverage   # no sanitizer: which kernels really ran

What the launchers run (T: the storage type; VEC = 16 bytes / element: 4 fp32, 8 fp16 / bf16):
  dw_nhwc<T, VEC, WIN>         channels_last forward, and dx at stride 1 (flipped filter). VEC when
                               m = 1, C a multiple of VEC and in / out 16-byte aligned, else 1;
                               WIN: column stride 1 and column dilation 1 (dx: dilation 1)
  dw_nchw_tiled<T, WIN>        NCHW forward / dx at stride 1, when the input tile (+ halo) fits 48 KB
  dw_direct<T>                 dx at stride > 1 (both layouts); NCHW spans too large for a tile
  dw_wgrad_partial<T, VEC, TK> dweight / dbias partials per pixel slice (VEC: channels_last, m = 1,
                               C % VEC == 0, dy and x aligned; TK = 8 for VEC = 1, else 32 / VEC)
  dw_wgrad_reduce<T>           the partials summed in a fixed order (deterministic)
The cases cover, per dtype, both layouts, kernels 1 / 3 / 7 / 13 / 31, even and non-square kernels,
"same" padding, stride 2, dilation 2 and 4, multipliers 2 / 3, C not a multiple of VEC, misaligned
(storage-offset) views, several channel chunks, batch 0, partial gradient requests, a side stream;
expected_kernels is a replica of the launchers' choices and --coverage checks with torch.profiler
that every expected kernel ran.

Exit codes: 0 ok; 1 a case failed; 2 nothing to run here (no GPU / kernels not built); 3 --coverage: an
expected kernel did not run; 4 --time-limit-s stopped it before every kernel configuration had run.
Run under sanitizers with PYTORCH_NO_CUDA_MEMORY_CACHING=1 (every tensor its own allocation).
"""

from __future__ import annotations

import time

T_START = time.monotonic()  # --time-limit-s counts from here, torch's import and CUDA init included

import contextlib  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scripts.sanitize_common import SHORT, finish, parser, profiled_kernels, run_cases, start  # noqa: E402

TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (4e-3, 2e-3), torch.bfloat16: (3e-2, 1e-2)}  # rel, abs (x max|ref|)
PW, TILE_SMEM = 4, 48 * 1024


@dataclass
class Case:
    dtype: torch.dtype
    layout: str        # "nchw" or "nhwc" (channels_last)
    N: int
    C: int
    H: int
    W: int
    k: tuple           # (KH, KW)
    stride: tuple = (1, 1)
    padding: object = (0, 0)  # pair or "same" / "valid"
    dilation: tuple = (1, 1)
    m: int = 1
    misaligned: bool = False  # x is a dense view at a storage offset of one element (scalar paths)
    grads: str = "xwb"        # which of x, weight, bias require grad
    bias: bool = True
    stream: bool = False


# ---- replica of the launchers' choices (csrc/cuda/depthwise_conv2d_{fwd,bwd}.cu) -----------------

def _cdiv(a, b):
    return -(-a // b)


def _pads(c):
    """(top, left, Ho, Wo) as torch computes them."""
    KH, KW = c.k
    (dh, dw), (sh, sw) = c.dilation, c.stride
    if c.padding == "same":
        th, tw = dh * (KH - 1), dw * (KW - 1)
        pt, pb, pl, pr = th // 2, th - th // 2, tw // 2, tw - tw // 2
    elif c.padding == "valid":
        pt = pb = pl = pr = 0
    else:
        pt = pb = c.padding[0]
        pl = pr = c.padding[1]
    Ho = max(0, (c.H + pt + pb - dh * (KH - 1) - 1) // sh + 1)
    Wo = max(0, (c.W + pl + pr - dw * (KW - 1) - 1) // sw + 1)
    return pt, pl, Ho, Wo


def _tile_fits(Ho, Wo, KH, KW, up_h, up_w, dil_h, dil_w):
    """choose_tile of depthwise_conv2d_fwd.cu: does some tile fit 48 KB?"""
    wq = _cdiv(Wo, PW)
    tx = min(wq, 8)
    ty = min(Ho, 256 // tx)
    if ty < 256 // tx:
        tx = min(wq, 256 // max(ty, 1))
    ty = max(1, min(ty, 256 // tx))
    while True:
        ih = (ty - 1) * up_h + (KH - 1) * dil_h + 1
        iw = (tx * PW - 1) * up_w + (KW - 1) * dil_w + 1
        if ih * iw <= (1 << 24) and (ih * iw + KH * KW) * 4 <= TILE_SMEM:
            return True
        if ty > 1:
            ty = (ty + 1) // 2
        elif tx > 1:
            tx = (tx + 1) // 2
        else:
            return False


def _pass_kernel(t, nhwc, vec, win, fast, Ho, Wo, KH, KW, up, dil):
    """The kernel of one conv pass (forward or dx)."""
    if not fast:
        return f"dw_direct<{t}>"
    if nhwc:
        return f"dw_nhwc<{t},{vec},{'true' if win else 'false'}>"
    if not _tile_fits(Ho, Wo, KH, KW, up[0], up[1], dil[0], dil[1]):
        return f"dw_direct<{t}>"
    return f"dw_nchw_tiled<{t},{'true' if win else 'false'}>"


def expected_kernels(c, x_aligned, dy_aligned=True):
    """The kernel keys ('name<T,...>') of the forward and the backward of the case."""
    t = SHORT[c.dtype]
    nv = 4 if c.dtype == torch.float32 else 8
    nhwc = c.layout == "nhwc"
    KH, KW = c.k
    _, _, Ho, Wo = _pads(c)
    Cout = c.C * c.m
    keys = []
    if c.N * Cout * Ho * Wo == 0:
        return keys
    vec_f = nv if (c.m == 1 and c.C % nv == 0 and x_aligned) else 1
    win_f = c.stride[1] == 1 and c.dilation[1] == 1
    keys.append(_pass_kernel(t, nhwc, vec_f, win_f, True, Ho, Wo, KH, KW, c.stride, c.dilation))
    if "x" in c.grads and c.N * c.C * c.H * c.W > 0:
        vec_x = nv if (c.m == 1 and c.C % nv == 0 and dy_aligned) else 1
        fast = c.stride == (1, 1)
        keys.append(_pass_kernel(t, nhwc, vec_x, c.dilation[1] == 1, fast, c.H, c.W, KH, KW, (1, 1), c.dilation))
    if "w" in c.grads or ("b" in c.grads and c.bias):
        need_x = "w" in c.grads
        vec_w = nv if (nhwc and c.m == 1 and c.C % nv == 0 and dy_aligned and (x_aligned or not need_x)) else 1
        tk = 8 if vec_w == 1 else 32 // vec_w
        keys += [f"dw_wgrad_partial<{t},{vec_w},{tk}>", f"dw_wgrad_reduce<{t}>"]
    return keys


# ---- cases ---------------------------------------------------------------------------------------

def cases_of(dtype, quick):
    nv = 4 if dtype == torch.float32 else 8
    cs = []
    for lay in ("nhwc", "nchw"):
        cs += [
            Case(dtype, lay, 2, 16, 14, 14, (7, 7), padding=(3, 3)),                       # vector / tiled, window
            Case(dtype, lay, 2, 16, 13, 13, (3, 3), stride=(2, 2), padding=(1, 1)),       # no window; dx direct
            Case(dtype, lay, 1, 16, 9, 17, (3, 3), padding=(2, 2), dilation=(2, 2)),      # dilation: no window
            Case(dtype, lay, 3, 6, 7, 13, (5, 5), padding=(2, 2)),                        # C % VEC != 0: scalar
            Case(dtype, lay, 1, 6, 9, 9, (3, 3), padding=(2, 2), dilation=(2, 2)),        # scalar, no window
            Case(dtype, lay, 2, 4, 7, 7, (3, 3), padding=(1, 1), m=2),                    # multiplier 2
            Case(dtype, lay, 2, 3, 11, 8, (3, 5), stride=(2, 1), padding=(1, 3), dilation=(1, 2), m=3),
            Case(dtype, lay, 1, 8, 7, 13, (2, 4), padding="same"),                        # even: asymmetric
            Case(dtype, lay, 2, 16, 7, 9, (3, 3), padding=(1, 1), misaligned=True),       # scalar (offset view)
            Case(dtype, lay, 1, 8, 9, 9, (13, 13), padding=(6, 6)),
            Case(dtype, lay, 1, 4, 33, 33, (31, 31), padding=(15, 15)),                   # big kernel
            Case(dtype, lay, 1, 2, 4, 5, (31, 31), padding=(60, 60), dilation=(4, 4)),    # NCHW: direct
            Case(dtype, lay, 1, 264, 5, 7, (3, 3), padding=(1, 1)),                       # channel chunks
            Case(dtype, lay, 4, 96, 28, 28, (7, 7), padding=(3, 3), stream=True),         # ConvNeXt-like, slices
            Case(dtype, lay, 2, nv, 6, 6, (1, 1), grads="x", bias=False),                 # dx only, k = 1
            Case(dtype, lay, 2, nv, 6, 6, (3, 3), padding=(1, 1), grads="w"),             # dweight only
            Case(dtype, lay, 2, nv, 6, 6, (3, 3), padding=(1, 1), grads="b"),             # dbias only
            Case(dtype, lay, 0, nv, 6, 6, (3, 3), padding=(1, 1)),                        # empty batch
        ]
    if quick:
        cs = [c for i, c in enumerate(cs) if i % 18 in (0, 1, 3, 10, 11)]
    return cs


def build_cases(dtypes, quick):
    """Every dtype's cases, those adding a kernel configuration first."""
    cases = [c for d in dtypes for c in cases_of(d, quick)]
    first, rest, seen = [], [], set()
    for c in cases:
        keys = set(expected_kernels(c, not c.misaligned))
        (first if keys - seen else rest).append(c)
        seen |= keys
    return first + rest


def make_input(c, gen, device):
    """x (N, C, H, W) in the case's layout on `device` (a storage-offset view when misaligned)."""
    shape = (c.N, c.C, c.H, c.W)
    x = torch.randn(shape, generator=gen).to(c.dtype)
    nhwc = c.layout == "nhwc"
    perm = x.permute(0, 2, 3, 1) if nhwc else x  # the memory order
    flat = torch.empty(perm.numel() + 1, dtype=c.dtype, device=device)
    off = 1 if c.misaligned else 0
    dev = flat[off:off + perm.numel()].view(perm.shape)
    dev.copy_(perm.to(device))
    return dev.permute(0, 3, 1, 2) if nhwc else dev


def _compare(name, got, ref, dtype, bad):
    if got is None or ref is None:
        if (got is None) != (ref is None):
            bad.append(f"{name}: gradient presence differs")
        return
    o = got.double().cpu()
    rtol, atol = TOL[dtype]
    if o.shape != ref.shape:
        bad.append(f"{name}: shape {tuple(o.shape)} != {tuple(ref.shape)}")
    elif o.numel() and not torch.isfinite(o).all():
        bad.append(f"{name}: non-finite values")
    elif o.numel():
        scale = max(1.0, ref.abs().max().item())
        err = ((o - ref).abs() - rtol * ref.abs()).max().item()
        if err > atol * scale:
            bad.append(f"{name}: max err {(o - ref).abs().max().item():.3e} (scale {scale:.3g})")


def run_case(ops, c, device, gen, side):
    KH, KW = c.k
    x = make_input(c, gen, device)
    w = (torch.randn(c.C * c.m, 1, KH, KW, generator=gen) / (KH * KW) ** 0.5).to(c.dtype).to(device)
    b = torch.randn(c.C * c.m, generator=gen).to(c.dtype).to(device) if c.bias else None
    x_aligned = x.data_ptr() % 16 == 0
    x.requires_grad_("x" in c.grads)
    w.requires_grad_("w" in c.grads)
    if b is not None:
        b.requires_grad_("b" in c.grads)
    padding = c.padding
    stream = side if (c.stream and side is not None) else None
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream())
    ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
    with ctx:
        y = ops.depthwise_conv2d(x, w, b, c.stride, padding, c.dilation, backend="native")
        gy = torch.randn(y.shape, generator=gen).to(c.dtype).to(device)
        if c.layout == "nhwc":
            gy = gy.contiguous(memory_format=torch.channels_last)
        inputs = [t for t in (x, w, b) if t is not None and t.requires_grad]
        grads = torch.autograd.grad(y, inputs, gy, allow_unused=True) if inputs else ()
    if stream is not None:
        torch.cuda.current_stream().wait_stream(stream)
    # float64 reference on the CPU (no sanitized kernels)
    xr = x.detach().double().cpu().requires_grad_(x.requires_grad)
    wr = w.detach().double().cpu().requires_grad_(w.requires_grad)
    br = None if b is None else b.detach().double().cpu().requires_grad_(b.requires_grad)
    yr = F.conv2d(xr, wr, br, c.stride, padding, c.dilation, groups=c.C)
    refs_in = [t for t in (xr, wr, br) if t is not None and t.requires_grad]
    refs = torch.autograd.grad(yr, refs_in, gy.double().cpu(), allow_unused=True) if refs_in else ()
    bad = []
    _compare("y", y.detach(), yr.detach(), c.dtype, bad)
    if y.numel() and c.layout == "nhwc" and not y.is_contiguous(memory_format=torch.channels_last):
        bad.append("y is not channels_last")
    names = [n for n, t in zip(("dx", "dweight", "dbias"), (x, w, b)) if t is not None and t.requires_grad]
    for name, got, ref in zip(names, grads, refs):
        _compare(name, got, ref, c.dtype, bad)
    return bad, (expected_kernels(c, x_aligned) if device.type == "cuda" else [])


# ---- main ----------------------------------------------------------------------------------------

# what --coverage looks for among the profiled kernels
KERNEL_NAMES = "dw_nhwc|dw_nchw_tiled|dw_direct|dw_wgrad_partial|dw_wgrad_reduce"


def main(argv=None) -> int:
    args = parser(__doc__).parse_args(argv)
    run = start("sanitize_depthwise_conv2d", args)
    if run is None:
        return 2
    device, dtypes, side, gen, prof = run
    import pydl.ops as ops

    def row(i, c, keys, _, result):
        shape = f"{c.N} {c.C} {c.H} {c.W}"
        pad = c.padding if isinstance(c.padding, str) else f"{c.padding[0]},{c.padding[1]}"
        geo = f"{c.k[0]}x{c.k[1]} {c.stride[0]},{c.stride[1]} {pad} {c.dilation[0]},{c.dilation[1]} {c.m}"
        geo += " mis" if c.misaligned else ""
        return (f"{i:3d} {SHORT[c.dtype]:5s} {c.layout:4s} {shape:16s} {geo:28s} {c.grads:5s} "
                f"{' '.join(keys):70s} {result}")

    cases = build_cases(dtypes, args.quick)
    results = run_cases(
        "sanitize_depthwise_conv2d", cases, args, T_START,
        f"{'#':>3s} {'dtype':5s} {'lay':4s} {'N C H W':16s} {'k s p d m':28s} {'grads':5s} "
        f"{'expected kernels':70s} result",
        lambda c: run_case(ops, c, device, gen, side) + (None,), row)
    return finish("sanitize_depthwise_conv2d", cases, results, device, profiled_kernels(prof, KERNEL_NAMES),
                  (lambda c: expected_kernels(c, not c.misaligned)) if device.type == "cuda" else None,
                  what="the launchers chose differently: update expected_kernels / the cases")


if __name__ == "__main__":
    sys.exit(main())
