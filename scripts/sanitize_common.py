"""What the compute-sanitizer workloads (scripts/sanitize_<op>.py) share: their command line, the
"nothing to run here" checks (exit 2), the case loop, the profiler that records which kernels ran
(--coverage) and the coverage verdict (exit 3), and the final verdict and summary line (exits 1 and
4). The contract of a workload: scripts/gpu_check/stages.txt."""

from __future__ import annotations

import argparse
import re
import time
from typing import Callable, Iterable, NamedTuple, Optional

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# (part of a C++ type in a kernel's template arguments, as the profiler names it; its short name)
SHORT_TYPE_NAMES = (("bfloat16", "bf16"), ("half", "fp16"), ("float", "fp32"))


def parser(doc: str) -> argparse.ArgumentParser:
    """--dtypes, --device, --quick, --coverage, --time-limit-s, --seed."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: a dry run of this script on the native CPU kernels (fp32, bf16)")
    ap.add_argument("--quick", action="store_true", help="fewer shapes, the first dtype only (dry runs)")
    ap.add_argument("--coverage", action="store_true", help="check with torch.profiler that every expected kernel ran")
    ap.add_argument("--time-limit-s", type=float, default=0.0,
                    help="start no case later than this many seconds after the process started")
    ap.add_argument("--seed", type=int, default=1234)
    return ap


def nothing_to_run(prog: str, device: torch.device, native: bool = True) -> Optional[str]:
    """Why this machine cannot run the workload (exit 2), or None."""
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"{prog}: no CUDA device; nothing to check"
    from pydl import _native

    if native and device.type == "cuda" and not _native.cuda_built():
        return f"{prog}: native CUDA kernels not built ({_native.load_error() or 'cpu-only build'})"
    return None


def dtypes_for(args) -> list:
    """The dtypes of --dtypes runnable on --device (no float16 CPU kernel); --quick: the first."""
    dtypes = [DTYPES[d] for d in args.dtypes]
    if args.device == "cpu":
        dtypes = [d for d in dtypes if d != torch.float16] or [torch.float32]
    return dtypes[:1] if args.quick else dtypes


def start_profiler(args, device: torch.device):
    """A started torch.profiler recording CUDA kernels for --coverage on a GPU, else None."""
    if not (args.coverage and device.type == "cuda"):
        return None
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CUDA])
    prof.__enter__()
    return prof


def profiled_kernels(prof, names: str) -> Optional[set]:
    """None without a profiler (no --coverage, or not on a GPU); else waits for the GPU, stops the
    profiler and returns the kernels it saw whose name matches the regular expression ``names``
    (e.g. ``"decode_split|decode_combine"``) as ``name<args>`` keys, the storage types among the
    template arguments by their short names (``decode_split<bf16,8>``)."""
    if prof is None:
        return None
    torch.cuda.synchronize()
    prof.__exit__(None, None, None)
    seen = set()
    for e in prof.key_averages():
        m = re.search(r"\b(" + names + r")<([^<>]*)>", e.key)
        if not m:
            continue
        args = [a.strip() for a in m.group(2).split(",")]
        args = [next((s for long_, s in SHORT_TYPE_NAMES if long_ in a), a) for a in args]
        seen.add(f"{m.group(1)}<{','.join(args)}>")
    return seen


def coverage_verdict(expected, seen, what: str = "the launchers chose differently: update the replica / the cases") -> int:
    """Prints the kernels seen against the expected ones; 3 if one is missing, else 0."""
    missing = sorted(k for k in expected if k not in seen)
    extra = sorted(k for k in seen if k not in expected)
    if extra:
        print("coverage note: launched but not predicted by the replica: " + " ".join(extra))
    if missing:
        print("coverage: MISSING " + " ".join(missing) + f" ({what})")
        return 3
    if not seen:
        print("coverage: unavailable (the profiler recorded no kernels)")
    else:
        print(f"coverage: complete ({len(expected)} expected kernel configurations all launched)")
    return 0


class CaseResults(NamedTuple):
    """What run_cases() leaves for finish()."""
    failures: int  # failed cases
    ran: int  # cases run (fewer than planned when --time-limit-s stopped the run)
    expected: dict  # {kernel key: index of the first case that expected it}
    started: float  # time.perf_counter() when the header was printed, before the first case


def run_cases(prog: str, cases, args, t_start: float, header: str, run_one, row) -> CaseResults:
    """Prints the table's ``header``, then runs ``run_one(case) -> (bad, keys, extra)`` for each case
    in order (an exception is a failed case: reported, and the run goes on; the sanitizer log has
    the rest), starting none later than --time-limit-s after ``t_start`` (time.monotonic()), and
    prints ``row(i, case, keys, extra, result)`` per case."""
    started = time.perf_counter()
    print(header, flush=True)
    failures, ran, expected = 0, 0, {}
    for i, c in enumerate(cases):
        if args.time_limit_s and time.monotonic() - t_start > args.time_limit_s:
            print(f"{prog}: --time-limit-s {args.time_limit_s:g} reached after {ran} of {len(cases)} cases",
                  flush=True)
            break
        try:
            bad, keys, extra = run_one(c)
            result = "ok" if not bad else "FAIL " + ", ".join(bad)
        except Exception as exc:
            bad, keys, extra = [str(exc)], [], None
            result = f"FAIL {type(exc).__name__}: {' '.join(str(exc).split())[:240]}"
        ran += 1
        failures += bool(bad)
        for k in keys:
            expected.setdefault(k, i)
        print(row(i, c, keys, extra, result), flush=True)
    return CaseResults(failures, ran, expected, started)


def finish(prog: str, cases, results: CaseResults, device: torch.device, seen,
           planned_keys: Optional[Callable[[object], Iterable[str]]], *, what: str,
           seen_note: str = "", details: str = "") -> int:
    """Prints a run's verdict and summary line and returns its exit status: 1 if a case failed;
    with ``seen`` (the kernels the --coverage profiler saw; None without one) the kernels seen,
    ``seen_note`` and coverage_verdict(``what``) (3); when --time-limit-s stopped the run early,
    4 if a kernel key ``planned_keys(case)`` predicts for some case had not been expected by a case
    that ran (None: nothing to check, only noted). ``details`` goes into the summary line before
    the device."""
    rc = 1 if results.failures else 0
    if seen is not None:
        print(f"kernels seen ({len(seen)}): " + " ".join(sorted(seen)))
        if seen_note:
            print(seen_note)
        rc = rc or coverage_verdict(results.expected, seen, what)
    else:
        print(f"kernel configurations exercised (replica): {len(results.expected)}")
    if results.ran < len(cases):
        planned = {k for c in cases for k in planned_keys(c)} if planned_keys is not None else set()
        if planned <= set(results.expected):
            print(f"note: stopped after {results.ran} of {len(cases)} cases; every kernel configuration had run")
        else:
            rc = rc or 4
    print(f"{prog}: {results.failures} failing case(s) of {results.ran} run ({len(cases)} planned), "
          f"{details + ', ' if details else ''}device {device.type}, "
          f"{time.perf_counter() - results.started:.1f} s", flush=True)
    return rc


def start(prog: str, args, native: bool = True):
    """(device, dtypes, side stream or None, generator, profiler or None) for a run, or None when
    this machine has nothing to run (the reason printed: exit 2)."""
    device = torch.device(args.device)
    why = nothing_to_run(prog, device, native)
    if why:
        print(why)
        return None
    side = torch.cuda.Stream() if device.type == "cuda" else None
    gen = torch.Generator().manual_seed(args.seed)
    return device, dtypes_for(args), side, gen, start_profiler(args, device)
