"""The harness core: what every suite shares, so that a suite only declares its op family.

A suite is a ``Suite`` (below): its ops, shapes, a work formula (bytes or FLOPs), its providers
(name -> factory giving a callable for an op), ``make_inputs``, output / gradient names and
tolerances. ``run(suite, cfg)`` does the rest, for every dtype x op x shape of the plan:

1. make the inputs; probe each pydl provider once per op/dtype on tiny inputs (so a missing
   build, op or dtype is ``skipped`` with its reason, not an error);
2. the correctness gate (``gate.py``): every provider's outputs, and its gradients when a
   backward mode is requested, against the reference; a mismatch is still timed, but marked;
3. per mode (a *cell*): time all providers interleaved in A/B rounds (``timing.py``); an
   implausible cell (spread above the policy's max, or beating the measured ceiling) is measured
   again, up to ``policy.remeasure`` times, the best-behaved attempt kept and, if still
   implausible, flagged; ``--repeat K`` takes K such measurements and keeps their median.

It returns ``Record``s; the derived metrics (GB/s, % of ceiling, speed-ups) are filled in by
``report.py``.
"""

from __future__ import annotations

import contextlib
import time
import zlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Sequence, Union

import torch

from . import gate
from .gate import Reference, short
from .timing import Measurement, TimingPolicy, combine, time_interleaved

# Record.status values.
OK, MISMATCH, SKIPPED, ERROR = "ok", "mismatch", "skipped", "error"
STATUSES = (OK, MISMATCH, SKIPPED, ERROR)
EAGER, COMPILE = "torch-eager", "torch-compile"  # the baseline providers every suite names so
MODES = ("fwd", "bwd", "fwd+bwd")
TIME_LIMIT_NOTE = "not run: --time-limit-s reached"
# Suite.metric values: what ``value`` is (from the work formula and the median time).
BANDWIDTH, THROUGHPUT, LATENCY = "bandwidth", "throughput", "latency"
UNITS = {BANDWIDTH: "GB/s", THROUGHPUT: "TFLOP/s", LATENCY: "us"}
# Record.flag values (joined by ";").
NOISY, ABOVE_CEILING = "noisy", "above ceiling"
# Provider.kind values.
PYDL, REFERENCE, COMPILED, BASELINE = "pydl", "eager", "compile", "baseline"


class Unsupported(Exception):
    """A provider raises this (from its function, when called on a cell's inputs) to say it does
    not take that cell, e.g. an SDPA backend refusing a mask or a dtype: the cell is recorded as
    ``skipped`` with the message, not as an error."""


# --------------------------------------------------------------------------------- types

@dataclass(frozen=True)
class Provider:
    """One way to run a suite's ops.

    factory(op) -> fn(*inputs) -> output tuple (a bare tensor is wrapped). It may raise to say
    "not for this op": the cell is then ``skipped`` with that message; fn raises ``Unsupported``
    to say the same of one cell.
    kind: PYDL (availability-probed on tiny inputs first; a failure there is ``skipped``),
        REFERENCE (torch eager: the gate's reference and the ``speedup_vs_eager`` baseline),
        COMPILED (torch.compile: compile settings applied, a failure is ``skipped``), BASELINE.
    devices: where it runs at all; elsewhere every cell is ``skipped``.
    """

    name: str
    factory: Callable[[str], Callable]
    kind: str = BASELINE
    devices: tuple = ("cpu", "cuda")


Shapes = Union[list, dict, Callable]


@dataclass(frozen=True)
class Suite:
    """A suite's declaration. Fields that vary per op take a value, an {op: value} dict or a
    callable op -> value (see ``per_op``).

    shapes(device, quick) -> [shape, ...] or {op: [shape, ...]}; a shape is any tuple (or dict,
        or string); ``smoke_shapes`` is the same for the hidden --smoke mode (tests).
    make_inputs(op, shape, dtype, device, seed) -> (inputs, grads): random, never zeros;
        ``grads`` are the upstream gradients of the outputs (may be () for fwd-only suites).
    work(op, mode, shape, dtype) -> int: bytes (metric BANDWIDTH) or FLOPs (THROUGHPUT) one
        call must move / do; None with metric LATENCY (value = µs per call).
    out_names / grad_names: names of the outputs / of the gradients of the differentiated inputs
        (``diff_inputs``: indices; default every floating tensor), for the gate's notes.
    reduction_grads: gradient names that are sums over rows (elementwise atol scaled; per op).
    tolerances(dtype) -> (rel floor, atol, rtol). reference(op) -> fn: default the REFERENCE
        provider's factory. probe_shape: the tiny shape pydl providers are probed on.
    dtypes(device) -> the default dtypes. timing: TimingPolicy overrides for this suite.
    seed(shape) -> int added to --seed. plot_x(shape) -> number (x axis of the line plots) and
    x_label; plot_series(shape) -> a label ("D=128") splitting the line plots of an op into one
    figure per label (None: one figure per op). report(rows) -> extra markdown lines (targets,
    verdicts), also printed on stdout.
    """

    name: str
    ops: tuple
    providers: tuple
    make_inputs: Callable
    shapes: Callable
    smoke_shapes: Shapes
    probe_shape: Any
    work: Optional[Callable] = None
    metric: str = BANDWIDTH
    modes: Any = MODES
    out_names: Any = ("y",)
    grad_names: Any = ()
    reduction_grads: tuple = ()
    diff_inputs: Any = None
    tolerances: Callable = gate.default_tolerances
    reference: Optional[Callable] = None
    dtypes: Callable = field(default=lambda device: [torch.bfloat16 if device.type == "cuda"
                                                     else torch.float32])
    timing: dict = field(default_factory=dict)
    seed: Callable = field(default=lambda shape: zlib.crc32(shape_str(shape).encode()) % 100_003)
    plot_x: Callable = field(default=lambda shape: shape[-1] if isinstance(shape, tuple) else None)
    x_label: str = "N (normalized size)"
    plot_series: Optional[Callable] = None
    report: Optional[Callable] = None

    def run(self, cfg: "SuiteConfig") -> list:
        return run(self, cfg)

    def provider(self, name: str) -> Provider:
        return next(p for p in self.providers if p.name == name)


def per_op(value, op: str):
    """A Suite field's value for ``op``: value(op) if callable, value[op] if a dict, else value."""
    if callable(value):
        return value(op)
    if isinstance(value, dict):
        return value[op]
    return value


def shape_str(shape) -> str:
    """(16384, 1024) -> "16384x1024"; {"B": 8, "N": 1024} -> "B=8,N=1024"; strings as they are."""
    if isinstance(shape, str):
        return shape
    if isinstance(shape, dict):
        return ",".join(f"{k}={v}" for k, v in shape.items())
    return "x".join(str(int(d)) for d in shape)


def shape_dims(shape, keys: tuple, suite: str, defaults: Optional[dict] = None) -> tuple:
    """The ints of a keyed shape (a dict, a tuple in ``keys`` order, or its "K=..,K2=.." string), with
    ``defaults`` for keys a dict / string may leave out; ValueError naming the suite's shape form."""
    defaults = defaults or {}
    if isinstance(shape, str):
        shape = dict(p.split("=") for p in shape.split(",")) if "=" in shape else shape
    if isinstance(shape, dict):
        shape = tuple(shape.get(k, defaults.get(k)) for k in keys)
    if not isinstance(shape, (tuple, list)) or len(shape) != len(keys) or None in shape:
        form = ",".join(f"{k}=.." for k in keys)
        raise ValueError(f"{suite} shapes are {form}, got {shape!r}")
    return tuple(int(x) for x in shape)


@dataclass
class SuiteConfig:
    device: torch.device
    dtypes: Optional[list]            # torch.dtype; None: each suite's default
    modes: list                       # subset of MODES
    quick: bool
    policy: TimingPolicy
    shapes: Optional[list] = None     # override for every op: list of tuples, e.g. [(M, N), ...]
    providers: Optional[list] = None  # filter: provider names to run (others not listed at all)
    ops: Optional[list] = None        # filter: op names to run
    log: Callable[[str], None] = field(default=lambda msg: None)   # warnings / errors
    seed: int = 0
    deadline: Optional[float] = None  # time.monotonic() after which remaining points are skipped
    smoke: bool = False               # the suite's smoke shapes (tests)
    repeat: int = 1                   # --repeat K
    ceilings: Any = None              # ceilings.Ceilings of this run (for the plausibility check)
    verbose: bool = False             # a line per cell (otherwise only warnings / errors)
    progress: Any = None              # .update(desc) once per cell, .write(msg)

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


@dataclass
class Record:
    """One measured (or refused) cell of one provider: op x provider x mode x shape x dtype."""

    op: str
    provider: str
    mode: str
    shape: str                 # shape_str(shape), e.g. "MxN"
    dtype: str                 # "bfloat16"
    device: str                # "cuda" / "cpu"
    bytes_moved: Optional[int]  # metric BANDWIDTH: the op's minimal traffic
    status: str = OK
    note: str = ""
    measurement: Optional[Measurement] = None
    suite: str = ""
    metric: str = BANDWIDTH
    flops: Optional[float] = None   # metric THROUGHPUT
    flag: str = ""             # NOISY / ABOVE_CEILING, ";"-joined: implausible after re-measuring
    attempts: int = 0          # interleaved measurements taken (re-measures included)
    repeat_p50_ms: list = field(default_factory=list)   # --repeat K: the K medians
    plot_x: Optional[float] = None
    x_label: str = ""
    plot_series: str = ""


def achieved(metric: str, work, p50_ms: float) -> Optional[float]:
    """GB/s, TFLOP/s or µs per call from the work of one call and its median time."""
    if p50_ms is None or p50_ms <= 0:
        return None
    if metric == LATENCY:
        return p50_ms * 1e3
    if work is None:
        return None
    return work / (p50_ms * 1e-3) / (1e9 if metric == BANDWIDTH else 1e12)


def ceiling_for(metric: str, dtype: str, ceilings) -> Optional[float]:
    """The measured ceiling a value of ``metric`` in ``dtype`` is reported as a % of (or None):
    the copy bandwidth, or the same-dtype matmul rate."""
    if ceilings is None:
        return None
    if metric == BANDWIDTH:
        return ceilings.copy_gbps
    if metric == THROUGHPUT and ceilings.matmul_desc.split()[0] == dtype:
        return ceilings.matmul_tflops
    return None


def plausibility_ceiling(metric: str, dtype: str, ceilings) -> Optional[float]:
    """What a value of ``metric`` must not beat: bandwidth cells are held against the higher of
    the copy and read rates (a read-only kernel can beat a copy), the rest as ``ceiling_for``."""
    if ceilings is not None and metric == BANDWIDTH:
        return ceilings.bandwidth_limit_gbps
    return ceiling_for(metric, dtype, ceilings)


# ---------------------------------------------------------------------------- providers

def compile_fn(fn: Callable) -> Callable:
    """A fresh shape-specialized compile of ``fn`` (dynamo state reset first)."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def compile_provider(eager_factory: Callable[[str], Callable], name: str = COMPILE) -> Provider:
    """torch.compile(dynamic=False) of the eager function, compiled once per shape."""
    return Provider(name, lambda op: compile_fn(eager_factory(op)), COMPILED)


def compile_settings() -> contextlib.ExitStack:
    """Dynamo/AOTAutograd settings for torch.compile providers, restored on exit.

    - Each shape is its own compile: raise the recompile limits so dynamo never silently falls
      back to eager after a few shapes.
    - Donated buffers off: a backward compiled with donated buffers refuses
      ``retain_graph=True``, which the bwd mode needs to replay one graph. (Donation only saves
      memory by reusing saved activations; it moves no fewer bytes.)
    """
    stack = contextlib.ExitStack()
    dyn = torch._dynamo.config
    limits = {a: max(getattr(dyn, a), 256) for a in ("cache_size_limit", "recompile_limit",
              "accumulated_cache_size_limit", "accumulated_recompile_limit") if hasattr(dyn, a)}
    stack.enter_context(dyn.patch(**limits))
    try:
        import torch._functorch.config as functorch_config

        if hasattr(functorch_config, "donated_buffer"):
            stack.enter_context(functorch_config.patch(donated_buffer=False))
    except ImportError:  # older torch: no donated buffers
        pass
    return stack


class ModuleCall:
    """fn(x, *params) -> (module(x),) for a module built by ``build(x, *params)`` whose
    parameters are *bound to* ``params`` (so a backward differentiates them like any input and
    the module's own forward is what gets timed). Rebuilt only when other params are passed.
    """

    def __init__(self, build: Callable):
        self.build, self.mod, self.params = build, None, ()

    def __call__(self, x, *params):
        if len(params) != len(self.params) or any(a is not b for a, b in zip(params, self.params)):
            mod = self.build(x, *params)
            for (name, _), p in zip(list(mod.named_parameters()), params):
                owner, _, attr = name.rpartition(".")
                (mod.get_submodule(owner) if owner else mod)._parameters[attr] = p
            self.mod, self.params = mod, params
        return (self.mod(x),)


class Availability:
    """Whether a pydl provider can run op/dtype/device at all, probed once on tiny inputs."""

    def __init__(self, suite: Suite):
        self.suite, self._cache = suite, {}

    def reason(self, provider: Provider, op: str, dtype: torch.dtype, device: torch.device) -> Optional[str]:
        key = (provider.name, op, dtype, device.type)
        if key not in self._cache:
            self._cache[key] = self._probe(self.suite, provider, op, dtype, device)
        return self._cache[key]

    @staticmethod
    def _probe(suite: Suite, provider: Provider, op: str, dtype, device) -> Optional[str]:
        try:
            f = provider.factory(op)
        except ImportError as exc:  # pydl.ops missing or broken
            return f"import failed: {short(exc)}"
        except Exception as exc:
            return short(exc)
        try:
            inputs, _ = suite.make_inputs(op, suite.probe_shape, dtype, device, 1)
            f(*inputs)
        except Exception as exc:
            return f"probe failed: {short(exc)}"
        return None


def _not_here(p: Provider, device: torch.device) -> Optional[str]:
    if device.type in p.devices:
        return None
    return f"{p.name} is benchmarked on {' / '.join(p.devices)} only"


# --------------------------------------------------------------------------------- plan

@dataclass
class Point:
    """One dtype x op x shape of a suite, with the modes it is timed in (one cell per mode)."""

    suite: Suite
    dtype: torch.dtype
    op: str
    shape: Any
    modes: list

    @property
    def tag(self) -> str:
        return f"{self.suite.name} {self.op} {shape_str(self.shape)} {dname(self.dtype)}"


def dname(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _shapes_for(value, op: str) -> list:
    return list(value[op] if isinstance(value, dict) else value)


def plan(suite: Suite, cfg: SuiteConfig) -> list:
    """The points (and so cells) ``run(suite, cfg)`` will go through, in order."""
    ops = [o for o in suite.ops if not cfg.ops or o in cfg.ops]
    dtypes = cfg.dtypes or suite.dtypes(cfg.device)
    shapes = cfg.shapes or (suite.smoke_shapes if cfg.smoke else suite.shapes(cfg.device, cfg.quick))
    points = []
    for dtype in dtypes:
        for op in ops:
            modes = [m for m in per_op(suite.modes, op) if m in cfg.modes]
            if not modes:
                continue
            for shape in (cfg.shapes or _shapes_for(shapes, op)):
                points.append(Point(suite, dtype, op, shape, modes))
    return points


def count_cells(suite: Suite, cfg: SuiteConfig) -> int:
    return sum(len(pt.modes) for pt in plan(suite, cfg))


# ---------------------------------------------------------------------------------- run

def run(suite: Suite, cfg: SuiteConfig) -> list:
    providers = [p for p in suite.providers if not cfg.providers or p.name in cfg.providers]
    policy = replace(cfg.policy, **suite.timing) if suite.timing else cfg.policy
    records, avail = [], Availability(suite)
    with (compile_settings() if any(p.kind == COMPILED for p in providers) else contextlib.nullcontext()):
        for pt in plan(suite, cfg):
            _run_point(suite, cfg, policy, pt, providers, avail, records)
            if cfg.device.type == "cuda":
                torch.cuda.empty_cache()
    return records


def _tick(cfg: SuiteConfig, desc: str) -> None:
    if cfg.progress is not None:
        cfg.progress.update(desc)


def _say(cfg: SuiteConfig, msg: str) -> None:
    """A warning / error line (through the progress bar when there is one)."""
    if cfg.progress is not None:
        cfg.progress.write(msg)
    else:
        cfg.log(msg)


def _run_point(suite, cfg, policy, pt: Point, providers, avail, records) -> None:
    device, shape = cfg.device, shape_str(pt.shape)

    def rec(provider, mode, status, note="", meas=None, **kw):
        work = suite.work(pt.op, mode, pt.shape, pt.dtype) if suite.work else None
        records.append(Record(
            op=pt.op, provider=provider, mode=mode, shape=shape, dtype=dname(pt.dtype),
            device=device.type, bytes_moved=work if suite.metric == BANDWIDTH else None,
            flops=work if suite.metric == THROUGHPUT else None, status=status, note=note,
            measurement=meas, suite=suite.name, metric=suite.metric,
            plot_x=suite.plot_x(pt.shape), x_label=suite.x_label,
            plot_series=suite.plot_series(pt.shape) if suite.plot_series else "", **kw))

    if cfg.out_of_time():
        for mode in pt.modes:
            for p in providers:
                rec(p.name, mode, SKIPPED, TIME_LIMIT_NOTE)
            _tick(cfg, f"{pt.tag} {mode} (skipped)")
        return
    before, done_modes = len(records), []
    try:
        _measure_point(suite, cfg, policy, pt, providers, avail, rec, done_modes, records)
    except Exception as exc:  # e.g. out of memory making inputs: record, go on
        done = {(r.provider, r.mode) for r in records[before:]}
        for mode in pt.modes:
            for p in providers:
                if (p.name, mode) not in done:
                    rec(p.name, mode, ERROR, short(exc))
            if mode not in done_modes:
                _tick(cfg, f"{pt.tag} {mode} (error)")
        _say(cfg, f"error: [{pt.tag}]: {short(exc)}")


def _gate(p: Provider, fn, inputs, grads, ref, want_grad, diff) -> tuple:
    """(fwd_status, fwd_note, grad_status, grad_note) of one provider."""
    try:
        reasons = ref.check_out(fn(*inputs))
        fwd = (MISMATCH, "; ".join(reasons)) if reasons else (OK, "")
    except Unsupported as exc:
        fwd = (SKIPPED, str(exc))
    except Exception as exc:
        fwd = (ERROR, short(exc))
    grad = (SKIPPED, "not requested")
    if want_grad:
        try:
            reasons = ref.check_grads(gate.run_grads(fn, inputs, grads, diff))
            grad = (MISMATCH, "; ".join(reasons)) if reasons else (OK, "")
        except Unsupported as exc:
            grad = (SKIPPED, str(exc))
        except Exception as exc:
            grad = (ERROR, short(exc))
    if p.kind == COMPILED:  # a compile failure is recorded as skipped, not as an error
        fwd, grad = _compile_failure(*fwd), _compile_failure(*grad)
    return (*fwd, *grad)


def _compile_failure(status: str, note: str) -> tuple:
    return (SKIPPED, "compile failed: " + note) if status == ERROR else (status, note)


def reference_fn(suite: Suite, op: str) -> Callable:
    if suite.reference is not None:
        return suite.reference(op)
    ref = [p for p in suite.providers if p.kind == REFERENCE]
    if not ref:
        raise ValueError(f"suite {suite.name}: no reference (a REFERENCE provider or Suite.reference)")
    return ref[0].factory(op)


def _measure_point(suite, cfg, policy, pt: Point, providers, avail, rec, done_modes, records) -> None:
    device, op = cfg.device, pt.op
    want_grad = any(m != "fwd" for m in pt.modes)
    inputs, grads = suite.make_inputs(op, pt.shape, pt.dtype, device, cfg.seed + suite.seed(pt.shape))
    diff = gate.diff_indices(inputs, per_op(suite.diff_inputs, op))
    ref = Reference(reference_fn(suite, op), inputs, grads, pt.dtype, want_grad,
                    out_names=per_op(suite.out_names, op), grad_names=per_op(suite.grad_names, op),
                    reduction=per_op(suite.reduction_grads, op), diff=diff, tolerances=suite.tolerances)

    # Correctness gate, provider by provider (this call also compiles / autotunes).
    fns, gates = {}, {}
    for p in providers:
        why = _not_here(p, device) or (avail.reason(p, op, pt.dtype, device) if p.kind == PYDL else None)
        if why is None:
            try:
                fns[p.name] = p.factory(op)
            except Exception as exc:
                why = short(exc)
        if why is not None:
            gates[p.name] = (SKIPPED, why, SKIPPED, why)
            continue
        gates[p.name] = _gate(p, fns[p.name], inputs, grads, ref, want_grad, diff)
    del ref

    order = {p.name: i for i, p in enumerate(providers)}
    for mode in pt.modes:
        timed, notes, start = {}, {}, len(records)
        for p in providers:
            fs, fnote, gs, gnote = gates[p.name]
            st, note = (fs, fnote) if mode == "fwd" else (gs, gnote)
            notes[p.name] = (st, note)
            if st in (SKIPPED, ERROR):
                rec(p.name, mode, st, note)
                if st == ERROR:
                    _say(cfg, f"error: [{pt.tag} {mode}] {p.name}: {note}")
                continue
            try:
                timed[p.name] = timed_fn(mode, fns[p.name], inputs, grads, diff)
            except Exception as exc:
                rec(p.name, mode, ERROR, short(exc))
                _say(cfg, f"error: [{pt.tag} {mode}] {p.name}: {short(exc)}")
        results = measure_cell(timed, cfg, policy, suite.metric,
                               lambda name: suite.work(op, mode, pt.shape, pt.dtype) if suite.work else None,
                               dname(pt.dtype))
        for name, res in results.items():
            if isinstance(res, BaseException):
                rec(name, mode, ERROR, short(res))
                _say(cfg, f"error: [{pt.tag} {mode}] {name}: {short(res)}")
                continue
            meas, flags, attempts, p50s = res
            st, note = notes[name]
            rec(name, mode, st, note, meas, flag=";".join(flags), attempts=attempts, repeat_p50_ms=p50s)
            if flags:
                _say(cfg, f"warning: [{pt.tag} {mode}] {name}: {' and '.join(flags)} "
                          f"(spread {meas.spread:.0%}) after {attempts} measurement(s)")
            if st == MISMATCH:
                _say(cfg, f"warning: [{pt.tag} {mode}] {name}: mismatch: {note}")
        if cfg.verbose:
            for p in providers:
                r = results.get(p.name)
                st, note = notes[p.name]
                if r is None or isinstance(r, BaseException):
                    line = f"{'error' if r is not None else st}: {short(r) if r is not None else note}"
                else:
                    m = r[0]
                    line = (f"{m.p50_ms:9.4f} ms  spread {m.spread:4.0%}  x{m.calls_per_sample} calls/sample"
                            + (f"  [{st}: {note}]" if st != OK else "") + (f"  [{';'.join(r[1])}]" if r[1] else ""))
                _say(cfg, f"[{pt.tag} {mode:7s}] {p.name:13s} {line}")
        records[start:] = sorted(records[start:], key=lambda r: order[r.provider])  # provider order
        done_modes.append(mode)
        _tick(cfg, f"{pt.tag} {mode}")


def timed_fn(mode: str, fn: Callable, inputs, grads, diff: Sequence[int]) -> Callable:
    """The no-argument callable one rep of ``mode`` runs."""
    if mode == "fwd":
        return lambda: fn(*inputs)
    args, leaves = gate.make_leaves(inputs, diff)
    if mode == "bwd":
        outs = gate.as_tuple(fn(*args))  # the graph, built once
        return lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True)
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(gate.as_tuple(fn(*args)), leaves, grads)
    raise ValueError(f"unknown mode {mode!r}")


# ------------------------------------------------------------------------- plausibility

def implausible(meas: Measurement, policy: TimingPolicy, value: Optional[float],
                ceiling: Optional[float]) -> list:
    """The flags a measurement earns: NOISY (spread too wide), ABOVE_CEILING."""
    flags = []
    if meas.spread > policy.max_spread:
        flags.append(NOISY)
    if value is not None and ceiling and value > policy.max_ceiling_ratio * ceiling:
        flags.append(ABOVE_CEILING)
    return flags


def measure_cell(timed: dict, cfg: SuiteConfig, policy: TimingPolicy, metric: str,
                 work_of: Callable[[str], Any], dtype: str) -> dict:
    """Time one cell's providers interleaved, ``cfg.repeat`` times; each time re-measure an
    implausible cell up to ``policy.remeasure`` times and keep the best-behaved attempt.

    Returns {provider: (Measurement, flags, attempts, [p50 per repeat]) or an exception}.
    """
    ceiling = plausibility_ceiling(metric, dtype, cfg.ceilings)
    live = dict(timed)
    errors, kept, attempts = {}, {name: [] for name in timed}, {name: 0 for name in timed}

    def judge(res: dict) -> dict:
        return {n: implausible(m, policy, achieved(metric, work_of(n), m.p50_ms), ceiling)
                for n, m in res.items()}

    for _ in range(max(1, cfg.repeat)):
        best = None
        for attempt in range(1 + max(0, policy.remeasure)):
            if not live:
                break
            raw = time_interleaved(live, cfg.device, policy)
            for n, m in raw.items():
                attempts[n] += 1
                if isinstance(m, BaseException):
                    errors[n] = m
                    live.pop(n)
            res = {n: m for n, m in raw.items() if not isinstance(m, BaseException)}
            flags = judge(res)
            score = (sum(bool(f) for f in flags.values()),
                     max((m.spread for m in res.values()), default=0.0))
            if best is None or score < best[0]:
                best = (score, res)
            if not any(flags.values()):
                break
        if best is not None:
            for n, m in best[1].items():
                if n in live:
                    kept[n].append(m)
    out = {}
    for n in timed:
        if n in errors:
            out[n] = errors[n]
        elif kept[n]:
            m = combine(kept[n])
            flags = implausible(m, policy, achieved(metric, work_of(n), m.p50_ms), ceiling)
            out[n] = (m, flags, attempts[n], [k.p50_ms for k in kept[n]] if len(kept[n]) > 1 else [])
    return out
