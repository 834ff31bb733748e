"""Timing utilities for the benchmark harness.

One *sample* times ``calls_per_sample`` back-to-back calls and divides by that count: a tiny
op (a few µs) is looped so that one sample lasts at least ``min_sample_s`` and neither the
timer's resolution nor the Python cost of taking a sample dominates. Clocks:

- CUDA events (the CUDA default): a pair of events around each sample; an L2 flush (a write
  over a 256 MB buffer) before every sample, outside the events; a sync only after all samples.
- wall clock (the CPU default; on CUDA on request): ``time.perf_counter`` around each sample,
  on CUDA with a device sync before and after it (never inside the inner loop).

``time_interleaved`` times several callables (the providers of one benchmark cell) in A/B
rounds: each warms up first, then round r runs the providers in an order rotated by r, each
taking its share of its samples, so that drifting machine load hits all providers alike.
Every measurement reports the median and the 20th/80th percentiles, in ms per call.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch

L2_FLUSH_BYTES = 256 * 1024 * 1024  # larger than any current L2 (H100: 50 MB, H200: 60 MB)
CLOCKS = ("auto", "events", "wall")


@dataclass(frozen=True)
class TimingPolicy:
    """How long and how often one measurement may run, and when a result is implausible.

    budget_s: wall-clock box for the timed samples of one callable (warm-up excluded).
    min_reps / max_reps: bounds on the sample count derived from that box.
    warmup_s / min_warmup: warm-up runs until both are met (and at least one call).
    flush_l2: CUDA only; write L2_FLUSH_BYTES before every sample (outside the timing).
    rounds: A/B rounds of ``time_interleaved`` (each provider's samples are split across them).
    min_sample_s: the inner loop makes one sample last at least this long (0: one call per sample).
    max_calls_per_sample: cap of that inner loop; calls_per_sample > 0 fixes it instead.
    clock: "events" (CUDA events), "wall" (perf_counter, CUDA synced at sample ends) or
        "auto" (events on CUDA, wall on CPU).
    max_spread: a measurement whose (p80 - p20) / p50 exceeds this is "noisy".
    max_ceiling_ratio: a result above this multiple of the machine's measured ceiling is
        "above ceiling".
    remeasure: how many more times an implausible cell is measured (the best-behaved wins).
    """

    budget_s: float = 1.0
    min_reps: int = 50
    max_reps: int = 2000
    warmup_s: float = 0.05
    min_warmup: int = 3
    flush_l2: bool = True
    rounds: int = 1
    min_sample_s: float = 0.0
    max_calls_per_sample: int = 1000
    calls_per_sample: int = 0
    clock: str = "auto"
    max_spread: float = math.inf
    max_ceiling_ratio: float = 1.1
    remeasure: int = 0


@dataclass
class Measurement:
    p50_ms: float            # per call
    p20_ms: float
    p80_ms: float
    reps: int                # samples
    threads: int
    samples_ms: list = field(default_factory=list, repr=False)  # per call, one per sample
    calls_per_sample: int = 1

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


def summarize(samples_ms: Sequence[float], threads: int, calls_per_sample: int = 1) -> Measurement:
    samples = list(samples_ms)
    return Measurement(
        p50_ms=quantile(samples, 0.5),
        p20_ms=quantile(samples, 0.2),
        p80_ms=quantile(samples, 0.8),
        reps=len(samples),
        threads=threads,
        samples_ms=samples,
        calls_per_sample=calls_per_sample,
    )


def combine(measurements: Sequence[Measurement]) -> Measurement:
    """The median of several full measurements of one thing (``--repeat``): p50/p20/p80 are the
    medians of theirs; the samples are pooled."""
    ms = list(measurements)
    if len(ms) == 1:
        return ms[0]
    med = lambda xs: quantile(xs, 0.5)
    return Measurement(p50_ms=med([m.p50_ms for m in ms]), p20_ms=med([m.p20_ms for m in ms]),
                       p80_ms=med([m.p80_ms for m in ms]), reps=sum(m.reps for m in ms),
                       threads=ms[-1].threads, samples_ms=[s for m in ms for s in m.samples_ms],
                       calls_per_sample=max(m.calls_per_sample for m in ms))


def reps_for_budget(est_s: float, policy: TimingPolicy) -> int:
    """Sample count that fits the policy's time box given a per-sample estimate (seconds)."""
    if est_s <= 0 or not math.isfinite(est_s):
        return policy.max_reps
    n = int(policy.budget_s / est_s)
    return max(policy.min_reps, min(policy.max_reps, n))


def calls_for_sample(est_call_s: float, policy: TimingPolicy) -> int:
    """Inner-loop length: enough calls that one sample lasts ``policy.min_sample_s``."""
    if policy.calls_per_sample > 0:
        return policy.calls_per_sample
    if policy.min_sample_s <= 0:
        return 1
    if est_call_s <= 0 or not math.isfinite(est_call_s):
        return policy.max_calls_per_sample
    return max(1, min(policy.max_calls_per_sample, math.ceil(policy.min_sample_s / est_call_s)))


def split_evenly(n: int, parts: int) -> list:
    """n items over ``parts`` rounds, as evenly as possible: split_evenly(5, 3) == [1, 2, 2]."""
    return [(n * (r + 1)) // parts - (n * r) // parts for r in range(parts)]


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


class _Timer:
    """One callable's warm-up, calibration and samples under one clock."""

    def __init__(self, fn: Callable[[], object], device: torch.device, policy: TimingPolicy):
        self.fn, self.device, self.policy = fn, device, policy
        self.cuda = device.type == "cuda"
        clock = policy.clock if policy.clock != "auto" else ("events" if self.cuda else "wall")
        if clock not in ("events", "wall") or (clock == "events" and not self.cuda):
            raise ValueError(f"clock {policy.clock!r} is not available on {device}")
        self.events = clock == "events"
        self.flush = (lambda: _L2Flusher.flush(device)) if (self.cuda and policy.flush_l2) else None
        self.samples: list = []        # wall clock: ms per call
        self.pending: list = []        # events: (start, end) pairs
        self.k = 1
        self.n = 0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def warm_up(self) -> None:
        """Warm-up (also compiles / autotunes whatever is lazily built); sets k and n."""
        p, fn = self.policy, self.fn
        n_warm, calls = 0, []
        self.sync()
        t0 = t = time.perf_counter()
        while n_warm < max(1, p.min_warmup) or t - t0 < p.warmup_s:
            if self.flush:
                self.flush()
            fn()
            n_warm += 1
            if self.cuda and n_warm >= 3 and n_warm % 3 == 0:
                self.sync()
            t, t_prev = time.perf_counter(), t
            calls.append(t - t_prev)
            if n_warm >= 10_000:
                break
        self.sync()
        est = (time.perf_counter() - t0) / n_warm   # per call (the flush included: it spends box time)
        # The inner loop is sized from a typical call: on CPU the median warm-up call, so that one
        # call descheduled by a busy machine does not shrink it; on CUDA the mean (calls are async).
        typical = est if self.cuda else min(est, quantile(calls, 0.5))
        self.k = calls_for_sample(typical, p)
        self.n = reps_for_budget(est * self.k, p)

    def sample(self, count: int) -> None:
        fn, k, flush = self.fn, self.k, self.flush
        if self.events:
            stream = torch.cuda.current_stream(self.device)
            for _ in range(count):
                if flush:
                    flush()  # outside the events: its time is not counted
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record(stream)
                for _ in range(k):
                    fn()
                e.record(stream)
                self.pending.append((s, e))
            return
        for _ in range(count):
            if flush:
                flush()
            self.sync()
            t = time.perf_counter()
            for _ in range(k):
                fn()
            self.sync()
            self.samples.append((time.perf_counter() - t) * 1e3 / k)

    def result(self) -> Measurement:
        if self.pending:
            self.sync()
            self.samples += [s.elapsed_time(e) / self.k for s, e in self.pending]
            self.pending = []
        return summarize(self.samples, torch.get_num_threads(), self.k)


def time_interleaved(fns: Mapping[str, Callable[[], object]], device: torch.device | str,
                     policy: Optional[TimingPolicy] = None) -> dict:
    """Time each ``fns[name]()`` on ``device``, interleaved in A/B rounds (see the module doc).

    Returns {name: Measurement, or the exception that callable raised (it is then dropped from
    the remaining rounds)}, in the order of ``fns``.
    """
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device}")
    policy = policy or TimingPolicy()
    timers, out = {}, {name: None for name in fns}
    for name, fn in fns.items():
        t = _Timer(fn, device, policy)
        try:
            t.warm_up()
            timers[name] = t
        except Exception as exc:  # noqa: BLE001 - recorded per provider
            out[name] = exc
    if timers:
        rounds = max(1, min(policy.rounds, max(t.n for t in timers.values())))
        shares = {name: split_evenly(t.n, rounds) for name, t in timers.items()}
        for r in range(rounds):
            live = [name for name in fns if name in timers]
            if not live:
                break
            shift = r % len(live)
            for name in live[shift:] + live[:shift]:
                try:
                    timers[name].sample(shares[name][r])
                except Exception as exc:  # noqa: BLE001
                    out[name] = exc
                    del timers[name]
        for name, t in timers.items():
            try:
                out[name] = t.result()
            except Exception as exc:  # noqa: BLE001
                out[name] = exc
    return out


def time_fn(
    fn: Callable[[], object],
    device: torch.device | str,
    policy: Optional[TimingPolicy] = None,
) -> Measurement:
    """Time ``fn()`` on ``device`` under ``policy``; returns p50/p20/p80 in ms per call."""
    res = time_interleaved({"fn": fn}, device, policy)["fn"]
    if isinstance(res, BaseException):
        raise res
    return res


def default_policy(device: torch.device | str, quick: bool) -> TimingPolicy:
    """The harness defaults: CUDA ≥ 50 samples in ≤ 1 s (0.3 s quick); CPU ≥ 3 samples in ≤ 0.5 s
    (0.2 s quick) after ≥ 0.3 s of warm-up (0.15 s quick). (A slow op takes longer than the box:
    the floor wins.) Providers interleave in 10 (CUDA) / 5 (CPU) rounds; a cell whose spread
    exceeds 0.10 (CUDA) / 0.25 (CPU), or that beats 1.1x the measured ceiling, is measured up to
    twice more.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return TimingPolicy(budget_s=0.3 if quick else 1.0, min_reps=50, max_reps=2000,
                            warmup_s=0.025, min_warmup=3, flush_l2=True, rounds=10,
                            max_spread=0.10, remeasure=2)
    # CPU warm-up is time-boxed too: the first calls that write a fresh multi-MiB output can
    # be several times slower than the steady state while the kernel (or, on a VM, the host)
    # first backs that memory; a steady training loop recycles it and never sees that again.
    # A sample lasts >= 1 ms (tiny ops are looped), so timer resolution never dominates.
    return TimingPolicy(budget_s=0.2 if quick else 0.5, min_reps=3, max_reps=500,
                        warmup_s=0.15 if quick else 0.3, min_warmup=3, flush_l2=False, rounds=5,
                        min_sample_s=1e-3, max_spread=0.25, remeasure=2)
