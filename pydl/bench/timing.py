"""Timing utilities for the benchmark harness.

CUDA: one pair of CUDA events around each rep, warm-up first, an L2 flush (a write over a
256 MB buffer) before every rep that stays outside the events, rep count time-boxed.
CPU: ``time.perf_counter`` around each rep, warm-up first, rep count time-boxed.
Both report the median and the 20th/80th percentiles in milliseconds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

L2_FLUSH_BYTES = 256 * 1024 * 1024  # larger than any current L2 (H100: 50 MB, H200: 60 MB)


@dataclass(frozen=True)
class TimingPolicy:
    """How long and how often one measurement may run.

    budget_s: wall-clock box for the timed reps of one measurement (warm-up excluded).
    min_reps / max_reps: bounds on the rep count derived from that box.
    warmup_s / min_warmup: warm-up runs until both are met (and at least one call).
    flush_l2: CUDA only; write L2_FLUSH_BYTES before every rep (outside the events).
    """

    budget_s: float = 1.0
    min_reps: int = 50
    max_reps: int = 2000
    warmup_s: float = 0.05
    min_warmup: int = 3
    flush_l2: bool = True


@dataclass
class Measurement:
    p50_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    threads: int
    samples_ms: list = field(default_factory=list, repr=False)

    @property
    def spread(self) -> float:
        """(p80 - p20) / p50: a quick noise indicator."""
        return (self.p80_ms - self.p20_ms) / self.p50_ms if self.p50_ms > 0 else float("nan")


def quantile(samples: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default 'linear' method), q in [0, 1]."""
    if not samples:
        raise ValueError("quantile of an empty sample")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    xs = sorted(samples)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    frac = pos - lo
    return xs[lo] + (xs[hi] - xs[lo]) * frac


def summarize(samples_ms: Sequence[float], threads: int) -> Measurement:
    samples = list(samples_ms)
    return Measurement(
        p50_ms=quantile(samples, 0.5),
        p20_ms=quantile(samples, 0.2),
        p80_ms=quantile(samples, 0.8),
        reps=len(samples),
        threads=threads,
        samples_ms=samples,
    )


def reps_for_budget(est_s: float, policy: TimingPolicy) -> int:
    """Rep count that fits the policy's time box given a per-rep estimate (seconds)."""
    if est_s <= 0 or not math.isfinite(est_s):
        return policy.max_reps
    n = int(policy.budget_s / est_s)
    return max(policy.min_reps, min(policy.max_reps, n))


class _L2Flusher:
    """Holds one 256 MB device buffer per device; ``flush()`` overwrites it."""

    _buffers: dict = {}

    @classmethod
    def flush(cls, device: torch.device) -> None:
        key = str(device)
        buf = cls._buffers.get(key)
        if buf is None:
            buf = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
            cls._buffers[key] = buf
        buf.zero_()

    @classmethod
    def release(cls) -> None:
        cls._buffers.clear()


def release_buffers() -> None:
    """Free the L2 flush buffers (call at the end of a run)."""
    _L2Flusher.release()


def _time_cuda(fn: Callable[[], object], policy: TimingPolicy, device: torch.device) -> Measurement:
    flush = (lambda: _L2Flusher.flush(device)) if policy.flush_l2 else (lambda: None)
    stream = torch.cuda.current_stream(device)

    # Warm-up (also compiles / autotunes whatever is lazily built), and a per-rep estimate
    # that includes the flush, since the flush spends wall time inside the box too.
    n_warm = 0
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    while n_warm < max(1, policy.min_warmup) or time.perf_counter() - t0 < policy.warmup_s:
        flush()
        fn()
        n_warm += 1
        if n_warm >= 3 and n_warm % 3 == 0:
            torch.cuda.synchronize(device)
        if n_warm >= 10_000:
            break
    torch.cuda.synchronize(device)
    est = (time.perf_counter() - t0) / n_warm
    reps = reps_for_budget(est, policy)

    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        flush()  # outside the events: its time is not counted
        starts[i].record(stream)
        fn()
        ends[i].record(stream)
    torch.cuda.synchronize(device)
    samples = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return summarize(samples, torch.get_num_threads())


def _time_cpu(fn: Callable[[], object], policy: TimingPolicy) -> Measurement:
    n_warm = 0
    t0 = time.perf_counter()
    while n_warm < max(1, policy.min_warmup) or time.perf_counter() - t0 < policy.warmup_s:
        fn()
        n_warm += 1
        if n_warm >= 10_000:
            break
    est = (time.perf_counter() - t0) / n_warm
    reps = reps_for_budget(est, policy)
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    return summarize(samples, torch.get_num_threads())


def time_fn(
    fn: Callable[[], object],
    device: torch.device | str,
    policy: Optional[TimingPolicy] = None,
) -> Measurement:
    """Time ``fn()`` on ``device`` under ``policy``; returns p50/p20/p80 in ms."""
    device = torch.device(device)
    policy = policy or TimingPolicy()
    if device.type == "cuda":
        return _time_cuda(fn, policy, device)
    if device.type == "cpu":
        return _time_cpu(fn, policy)
    raise ValueError(f"device must be cpu or cuda, got {device}")


def default_policy(device: torch.device | str, quick: bool) -> TimingPolicy:
    """The harness defaults: CUDA ≥ 50 reps in ≤ 1 s (0.3 s quick); CPU ≥ 3 reps in ≤ 0.5 s (0.2 s quick)
    after ≥ 0.3 s of warm-up (0.15 s quick).

    (A slow op takes longer than the box: the rep floor wins.)
    """
    device = torch.device(device)
    if device.type == "cuda":
        return TimingPolicy(budget_s=0.3 if quick else 1.0, min_reps=50, max_reps=2000,
                            warmup_s=0.025, min_warmup=3, flush_l2=True)
    # CPU warm-up is time-boxed too: the first calls that write a fresh multi-MiB output can
    # be several times slower than the steady state while the kernel (or, on a VM, the host)
    # first backs that memory; a steady training loop recycles it and never sees that again.
    return TimingPolicy(budget_s=0.2 if quick else 0.5, min_reps=3, max_reps=500,
                        warmup_s=0.15 if quick else 0.3, min_warmup=3, flush_l2=False)
