"""CLI: ``python -m pydl.bench [suite ...] [--device cpu|cuda] [--dtype ...] [--quick]
[--out DIR] [--compare OLD.csv] [--modes fwd bwd fwd+bwd]``.

Writes DIR/results.csv (long format), DIR/report.md and DIR/plot_*.png; prints progress to
stderr and a summary table (plus any --compare regressions) to stdout. Exit code 0 unless the
command line is wrong or a suite crashed; regressions and mismatches are reported, not fatal.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback

import torch

from . import ceilings as _ceilings
from . import report, suites
from .timing import default_policy, release_buffers

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MODES = ("fwd", "bwd", "fwd+bwd")
# Hidden --smoke: tiny shapes and a tiny time box, so the whole pipeline runs in seconds (tests).
_SMOKE_SHAPES = [(64, 97), (64, 128)]


def parse_shapes(text: str) -> list:
    """'16384x1024,64x97' -> [(16384, 1024), (64, 97)]."""
    out = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        dims = part.lower().split("x")
        if len(dims) != 2 or not all(d.isdigit() and int(d) > 0 for d in dims):
            raise argparse.ArgumentTypeError(f"bad shape {part!r}: expected MxN, e.g. 16384x1024")
        out.append((int(dims[0]), int(dims[1])))
    if not out:
        raise argparse.ArgumentTypeError("no shapes given")
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pydl.bench",
                                 description="pydl microbenchmarks against torch eager and torch.compile.")
    ap.add_argument("suites", nargs="*", metavar="suite",
                    help=f"suites to run (default: all): {', '.join(suites.names())}")
    ap.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", nargs="+", choices=tuple(_DTYPES), dest="dtypes",
                    help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--quick", action="store_true", help="a subset of shapes and shorter time boxes")
    ap.add_argument("--out", help="output folder (default: ./bench-out/<timestamp>-<device>)")
    ap.add_argument("--compare", metavar="OLD.csv",
                    help="flag rows > 10%% slower than in OLD.csv (exit code stays 0)")
    ap.add_argument("--modes", nargs="+", choices=_MODES, default=list(_MODES))
    ap.add_argument("--providers", nargs="+", help="only these providers (e.g. pydl-native torch-eager)")
    ap.add_argument("--ops", nargs="+", help="only these ops of the chosen suites")
    ap.add_argument("--shapes", type=parse_shapes, help="override shapes: MxN[,MxN...]")
    ap.add_argument("--budget-s", type=float, help="override the time box of one measurement (s)")
    ap.add_argument("--time-limit-s", type=float,
                    help="stop starting new points after this many seconds; the rest are recorded "
                         "as skipped and the report is still written")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    return ap


def _git_commit() -> tuple:
    """(short hash, dirty) of the checkout that holds this package; ('', False) if none.

    $PYDL_COMMIT overrides (for copies of a checkout without .git, e.g. on a GPU machine).
    """
    if os.environ.get("PYDL_COMMIT"):
        return os.environ["PYDL_COMMIT"], False
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        h = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True, timeout=10)
        if h.returncode != 0:
            return "", False
        d = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10)
        return h.stdout.strip(), bool(d.stdout.strip())
    except Exception:
        return "", False


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.multi_processor_count} SMs, cc {p.major}.{p.minor})"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect_meta(device: torch.device, argv: list) -> dict:
    meta = {"device": device.type, "device_name": _device_name(device),
            "timestamp": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "command": "python -m pydl.bench " + " ".join(shlex.quote(a) for a in argv)}
    try:
        import pydl
        meta["version"] = getattr(pydl, "__version__", "")
    except Exception as exc:
        meta["version"] = f"unavailable ({type(exc).__name__})"
    try:
        from pydl import _native
        info = _native.info()
        meta["native"] = ", ".join(f"{k}={v}" for k, v in dict(info).items())
    except Exception as exc:
        meta["native"] = f"unavailable ({type(exc).__name__}: {str(exc)[:120]})"
    try:
        import triton
        meta["triton"] = triton.__version__
    except Exception:
        meta["triton"] = "not installed"
    commit, dirty = _git_commit()
    meta["commit"] = commit
    if dirty:
        meta["commit_note"] = "uncommitted changes present"
    return meta


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    args = ap.parse_args(argv)

    unknown = [s for s in args.suites if s not in suites.names()]
    if unknown:
        ap.error(f"unknown suite(s) {', '.join(unknown)}; known: {', '.join(suites.names())}")
    names = args.suites or suites.names()

    if args.device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA device is available")
    dtypes = [_DTYPES[d] for d in (args.dtypes or (["bfloat16"] if device.type == "cuda" else ["float32"]))]

    policy = default_policy(device, args.quick or args.smoke)
    shapes = args.shapes or (_SMOKE_SHAPES if args.smoke else None)
    if args.smoke:
        policy = dataclasses.replace(policy, budget_s=0.01, min_reps=3, max_reps=20, warmup_s=0.0,
                                     min_warmup=1)
    if args.budget_s is not None:
        policy = dataclasses.replace(policy, budget_s=args.budget_s)

    started = time.monotonic()
    out = args.out or os.path.join("bench-out", f"{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{device.type}")
    os.makedirs(out, exist_ok=True)
    old_rows = None
    if args.compare:
        try:
            old_rows = report.read_csv(args.compare)
        except OSError as exc:
            ap.error(f"--compare: cannot read {args.compare}: {exc}")

    meta = collect_meta(device, argv)
    if args.compare:
        meta["compare"] = args.compare
    if meta.get("commit_note"):
        meta["commit"] = f"{meta['commit']} ({meta['commit_note']})" if meta["commit"] else ""
    _log(f"pydl.bench: {', '.join(names)} on {meta['device_name']}; dtypes "
         f"{', '.join(str(d).replace('torch.', '') for d in dtypes)}; modes {' '.join(args.modes)}; "
         f"{policy.budget_s:g} s per measurement; threads {meta['threads']}")

    ceil = _ceilings.measure(device, quick=args.quick, small=args.smoke)
    _log(f"ceilings: copy {ceil.copy_gbps:.1f} GB/s (read + write), matmul {ceil.matmul_tflops:.2f} "
         f"TFLOP/s ({ceil.matmul_desc})")

    cfg = suites.SuiteConfig(device=device, dtypes=dtypes, modes=list(args.modes), quick=args.quick,
                             policy=policy, shapes=shapes, providers=args.providers, ops=args.ops,
                             log=_log, seed=args.seed,
                             deadline=None if args.time_limit_s is None else started + args.time_limit_s)
    records, crashed = [], []
    for name in names:
        try:
            records += suites.get(name).run(cfg)
        except Exception:
            crashed.append(name)
            _log(f"suite {name} crashed:\n{traceback.format_exc()}")
    release_buffers()

    csv_meta = dict(meta, commit=meta["commit"].split(" ")[0])
    rows = report.finalize(records, ceil, csv_meta)
    csv_path = os.path.join(out, "results.csv")
    report.write_csv(rows, csv_path)

    cmp = report.compare(old_rows, rows) if old_rows is not None else None
    plot_files, plot_note = ([], "disabled (--no-plots)") if args.no_plots else report.plots(rows, out)
    md = report.markdown(rows, meta, cmp, plot_files, plot_note)
    if crashed:
        md += "\n## Crashed suites\n\n" + "\n".join(f"- {n} (see stderr)" for n in crashed) + "\n"
    md_path = os.path.join(out, "report.md")
    with open(md_path, "w") as f:
        f.write(md)

    print(f"pydl.bench — {meta['device_name']} — copy {ceil.copy_gbps:.0f} GB/s, "
          f"matmul {ceil.matmul_tflops:.1f} TFLOP/s — p50 ms per provider")
    print(report.summary_table(rows))
    bad = [r for r in rows if r["status"] not in ("ok", "skipped")]
    if bad:
        print(f"{len(bad)} row(s) with status mismatch/error: see {md_path}")
    if cmp is not None:
        print("\n".join(report.compare_lines(cmp)))
    print(f"wrote {csv_path}, {md_path}" + (f", {len(plot_files)} plot(s)" if plot_files else ""))
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
