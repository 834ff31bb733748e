"""The machine's own ceilings, measured in the same run as the benchmarks.

copy bandwidth: ``dst.copy_(src)`` of a large buffer, counting bytes read + bytes written
    (CUDA: 2 GiB each way; CPU: 256 MB). The % of ceiling of every bandwidth cell is of this.
read bandwidth: ``src.sum()`` of the copy's source buffer, counting the bytes read. A read-only
    kernel (decode attention reading a KV cache) can beat the copy rate: on a CPU each store of a
    copy first reads its destination line (write-allocate), which the copy's byte count does not
    see. The plausibility check holds bandwidth cells against the higher of the two.
matmul rate: ``a @ b`` on random data (CUDA: bf16 8192^3; CPU: fp32 2048^3), 2·M·N·K flops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .timing import TimingPolicy, time_fn


@dataclass
class Ceilings:
    copy_gbps: float          # GB/s (1e9 bytes/s), read + write
    copy_bytes: int           # bytes moved per copy (read + write)
    matmul_tflops: float      # TFLOP/s
    matmul_desc: str          # e.g. "bfloat16 8192x8192x8192"
    copy_p50_ms: float = float("nan")
    matmul_p50_ms: float = float("nan")
    read_gbps: float = float("nan")   # GB/s of a sum over copy_bytes / 2 bytes (nan: not measured)
    read_p50_ms: float = float("nan")

    @property
    def has_read(self) -> bool:
        return not math.isnan(self.read_gbps)

    @property
    def bandwidth_limit_gbps(self) -> float:
        """The highest bandwidth measured (copy or read): what no bandwidth cell can beat."""
        return max(self.copy_gbps, self.read_gbps) if self.has_read else self.copy_gbps


def measure_bandwidth(device: torch.device, nbytes: int, policy: TimingPolicy):
    """Returns (copy GB/s counting read + write, copy p50 ms, bytes moved per copy, read GB/s of
    ``src.sum()`` over the copy's source, read p50 ms)."""
    n = nbytes // 4
    src = torch.randn(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    # The source is far larger than any L2, so no flush is needed (and it would only add time).
    copy = time_fn(lambda: dst.copy_(src), device, _no_flush(policy))
    del dst
    read = time_fn(lambda: src.sum(), device, _no_flush(policy))
    del src
    moved = 2 * n * 4
    gbps = lambda nb, ms: nb / (ms * 1e-3) / 1e9  # noqa: E731
    return gbps(moved, copy.p50_ms), copy.p50_ms, moved, gbps(n * 4, read.p50_ms), read.p50_ms


def measure_matmul_tflops(device: torch.device, size: int, dtype: torch.dtype, policy: TimingPolicy):
    """Returns (TFLOP/s, p50 ms) of a size^3 matmul on random data (never zeros)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    m = time_fn(lambda: torch.mm(a, b, out=out), device, _no_flush(policy))
    flops = 2.0 * size ** 3
    del a, b, out
    return flops / (m.p50_ms * 1e-3) / 1e12, m.p50_ms


def _no_flush(policy: TimingPolicy) -> TimingPolicy:
    return replace(policy, flush_l2=False)


def measure(device: torch.device | str, quick: bool = False, small: bool = False) -> Ceilings:
    """Measure both ceilings on ``device``. ``small`` shrinks the problems (tests only)."""
    device = torch.device(device)
    if device.type == "cuda":
        copy_bytes = (16 << 20) if small else (2 << 30)
        mm_size, mm_dtype = (512 if small else 8192), torch.bfloat16
        policy = TimingPolicy(budget_s=0.2 if quick else 0.5, min_reps=10 if quick else 20,
                              max_reps=500, warmup_s=0.05, min_warmup=3, flush_l2=False)
    else:
        copy_bytes = (4 << 20) if small else (256 << 20)
        mm_size, mm_dtype = (128 if small else 2048), torch.float32
        policy = TimingPolicy(budget_s=0.3 if quick else 0.5, min_reps=3, max_reps=200,
                              warmup_s=0.0, min_warmup=1, flush_l2=False)
    gbps, copy_ms, moved, read_gbps, read_ms = measure_bandwidth(device, copy_bytes, policy)
    tflops, mm_ms = measure_matmul_tflops(device, mm_size, mm_dtype, policy)
    dname = str(mm_dtype).replace("torch.", "")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Ceilings(copy_gbps=gbps, copy_bytes=moved, matmul_tflops=tflops,
                    matmul_desc=f"{dname} {mm_size}x{mm_size}x{mm_size}",
                    copy_p50_ms=copy_ms, matmul_p50_ms=mm_ms, read_gbps=read_gbps,
                    read_p50_ms=read_ms)
