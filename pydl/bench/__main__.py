"""CLI: ``python -m pydl.bench [suite ...] [--device cpu|cuda] [--dtype ...] [--quick]
[--out DIR] [--compare OLD.csv] [--modes fwd bwd fwd+bwd] [--repeat K] [--verbose]``.

Writes DIR/results.csv (long format), DIR/report.md and DIR/plot_*.png; shows a progress bar
(plus warnings / errors; a line per cell with --verbose) on stderr and a summary table (plus
any --compare regressions) on stdout. Exit code 0 unless the command line is wrong or a suite
crashed; regressions, mismatches and flagged cells are reported, not fatal.
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
from . import core, report, suites
from .allocator import make_steady
from .progress import Progress
from .timing import default_policy, release_buffers

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MODES = core.MODES
# Hidden --smoke: each suite's smoke shapes and a tiny time box, so the whole pipeline runs in
# seconds (tests).


def parse_shapes(text: str) -> list:
    """'16384x1024,64x97' -> [(16384, 1024), (64, 97)]; any rank >= 2 ('2x8x1024x64')."""
    out = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        dims = part.lower().split("x")
        if len(dims) < 2 or not all(d.isdigit() and int(d) > 0 for d in dims):
            raise argparse.ArgumentTypeError(f"bad shape {part!r}: expected MxN[x...], e.g. 16384x1024")
        out.append(tuple(int(d) for d in dims))
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
    ap.add_argument("--shapes", type=parse_shapes, help="override shapes of every op: MxN[,MxN...]")
    ap.add_argument("--budget-s", type=float, help="override the time box of one measurement (s)")
    ap.add_argument("--time-limit-s", type=float,
                    help="stop starting new points after this many seconds; the rest are recorded "
                         "as skipped and the report is still written")
    ap.add_argument("--repeat", type=int, default=1, metavar="K",
                    help="measure each cell K times (full interleaved measurements) and report the "
                         "median of the K medians, with their min / max")
    ap.add_argument("--remeasure", type=int, metavar="N",
                    help="re-measure an implausible cell (too noisy, above the ceiling) up to N times "
                         "(default 2)")
    ap.add_argument("--malloc", choices=("steady", "default"), default="steady",
                    help="host allocator during the run: steady (default; freed memory is reused, "
                         "no page faults from the OS between calls — pydl/bench/allocator.py) or default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true", help="a line per cell on stderr")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    return ap


def _repo_root(path: str):
    """The folder above ``path`` that holds ``.git`` (a directory, or a worktree's file), or None."""
    path = os.path.abspath(path)
    while True:
        if os.path.exists(os.path.join(path, ".git")):
            return path
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


def _head_from_files(root: str) -> str:
    """HEAD's short hash read from .git itself (no git binary needed); '' if that fails."""
    try:
        gitdir = os.path.join(root, ".git")
        if os.path.isfile(gitdir):  # a worktree / submodule: "gitdir: <path>"
            with open(gitdir) as f:
                gitdir = os.path.join(root, f.read().split(":", 1)[1].strip())
        with open(os.path.join(gitdir, "HEAD")) as f:
            head = f.read().strip()
        if not head.startswith("ref:"):
            return head[:7]
        ref = head.split(":", 1)[1].strip()
        for base in (gitdir, os.path.join(gitdir, "..")):
            p = os.path.join(base, ref)
            if os.path.exists(p):
                with open(p) as f:
                    return f.read().strip()[:7]
        with open(os.path.join(gitdir, "packed-refs")) as f:
            for line in f:
                if line.rstrip().endswith(" " + ref):
                    return line.split()[0][:7]
    except (OSError, IndexError):
        pass
    return ""


def _git(root: str, *args: str):
    """Run git in ``root``; None on failure. The checkout may belong to another user (a copy on a
    GPU machine, a container): git then refuses with "dubious ownership" unless the folder is
    marked safe, which it is here for these read-only queries (with hooks such as fsmonitor off)."""
    try:
        p = subprocess.run(["git", "-c", f"safe.directory={root}", "-c", "core.fsmonitor=false",
                            "-C", root, *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout if p.returncode == 0 else None


def _git_commit() -> tuple:
    """(short hash, dirty) of the checkout that holds this package: dirty is "true", "false", or
    "" when unknown; hash "unknown" when not in a checkout.

    $PYDL_COMMIT overrides the hash (for copies of a checkout without .git, e.g. on a GPU
    machine); "<hash>-dirty" there, or $PYDL_COMMIT_DIRTY=1/0, gives the flag.
    Why results once had an empty commit: ``git rev-parse`` fails with "detected dubious
    ownership" in a checkout owned by another user, and the failure was swallowed.
    """
    env = os.environ.get("PYDL_COMMIT", "").strip()
    root = _repo_root(os.path.dirname(os.path.abspath(__file__)))
    if env:
        commit, dirty = env, ""
        if env.endswith("-dirty"):
            commit, dirty = env[: -len("-dirty")], "true"
        flag = os.environ.get("PYDL_COMMIT_DIRTY", "").strip().lower()
        if flag:
            dirty = "true" if flag in ("1", "true", "yes", "dirty") else "false"
        if not dirty and root:   # the override names the checkout we are in: ask it
            head = (_git(root, "rev-parse", "--short", "HEAD") or "").strip()
            if head and (head.startswith(commit) or commit.startswith(head)):
                st = _git(root, "status", "--porcelain", "--untracked-files=no")
                dirty = "" if st is None else ("true" if st.strip() else "false")
        return commit, dirty
    if root is None:
        return "unknown", ""
    head = (_git(root, "rev-parse", "--short", "HEAD") or "").strip()
    if not head:
        return _head_from_files(root) or "unknown", ""
    st = _git(root, "status", "--porcelain", "--untracked-files=no")
    return head, "" if st is None else ("true" if st.strip() else "false")


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
    meta["commit"], meta["dirty"] = _git_commit()
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
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    names = args.suites or suites.names()

    if args.device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA device is available")
    dtypes = [_DTYPES[d] for d in args.dtypes] if args.dtypes else None   # None: each suite's default

    policy = default_policy(device, args.quick or args.smoke)
    if args.smoke:
        policy = dataclasses.replace(policy, budget_s=0.01, min_reps=3, max_reps=20, warmup_s=0.0,
                                     min_warmup=1, rounds=3, min_sample_s=2e-4, remeasure=1)
    if args.budget_s is not None:
        policy = dataclasses.replace(policy, budget_s=args.budget_s)
    if args.remeasure is not None:
        policy = dataclasses.replace(policy, remeasure=max(0, args.remeasure))

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
    meta["host allocator"] = make_steady() if args.malloc == "steady" else "default"
    if args.compare:
        meta["compare"] = args.compare
    meta["measurement"] = (
        f"providers interleaved in {policy.rounds} round(s) per cell; a cell with spread > "
        f"{policy.max_spread:g} or above {policy.max_ceiling_ratio:g}× the measured ceiling is "
        f"re-measured up to {policy.remeasure} time(s)"
        + (f"; --repeat {args.repeat}: median of {args.repeat} medians" if args.repeat > 1 else ""))
    dirty = {"true": " (uncommitted changes present)", "": " (clean/dirty unknown)"}.get(meta["dirty"], "")
    _log(f"pydl.bench: {', '.join(names)} on {meta['device_name']}; commit {meta['commit']}{dirty}; "
         f"dtypes {', '.join(core.dname(d) for d in dtypes) if dtypes else 'per suite'}; "
         f"modes {' '.join(args.modes)}; {policy.budget_s:g} s per measurement; threads {meta['threads']}")

    ceil = _ceilings.measure(device, quick=args.quick, small=args.smoke)
    _log(f"ceilings: copy {ceil.copy_gbps:.1f} GB/s (read + write), read {ceil.read_gbps:.1f} GB/s, "
         f"matmul {ceil.matmul_tflops:.2f} "
         f"TFLOP/s ({ceil.matmul_desc})")

    cfg = suites.SuiteConfig(device=device, dtypes=dtypes, modes=list(args.modes), quick=args.quick,
                             policy=policy, shapes=args.shapes, providers=args.providers, ops=args.ops,
                             log=_log, seed=args.seed, smoke=args.smoke, repeat=args.repeat,
                             ceilings=ceil, verbose=args.verbose,
                             deadline=None if args.time_limit_s is None else started + args.time_limit_s)
    specs, crashed = {}, []
    for name in names:
        try:
            specs[name] = suites.get(name).SUITE
        except Exception:
            crashed.append(name)
            _log(f"suite {name} failed to load:\n{traceback.format_exc()}")
    cfg.progress = Progress(sum(core.count_cells(s, cfg) for s in specs.values()))
    records = []
    try:
        for name, spec in specs.items():
            try:
                records += spec.run(cfg)
            except Exception:
                crashed.append(name)
                cfg.progress.write(f"suite {name} crashed:\n{traceback.format_exc()}")
    finally:
        cfg.progress.close()
    release_buffers()

    rows = report.finalize(records, ceil, meta)
    csv_path = os.path.join(out, "results.csv")
    report.write_csv(rows, csv_path)

    extra = []
    for name, spec in specs.items():
        if spec.report is not None:
            try:
                extra += spec.report(rows)
            except Exception:
                _log(f"suite {name}: report hook failed:\n{traceback.format_exc()}")
    cmp = report.compare(old_rows, rows) if old_rows is not None else None
    plot_files, plot_note = ([], "disabled (--no-plots)") if args.no_plots else report.plots(rows, out)
    md = report.markdown(rows, meta, cmp, plot_files, plot_note, extra=extra)
    if crashed:
        md += "\n## Crashed suites\n\n" + "\n".join(f"- {n} (see stderr)" for n in crashed) + "\n"
    md_path = os.path.join(out, "report.md")
    with open(md_path, "w") as f:
        f.write(md)

    print(f"pydl.bench — {meta['device_name']} — copy {ceil.copy_gbps:.0f} GB/s, "
          f"matmul {ceil.matmul_tflops:.1f} TFLOP/s — p50 ms per provider (µs per call for latency suites)")
    print(report.summary_table(rows))
    for line in extra:
        if line.startswith("|") or line.endswith("met."):
            print(line)
    bad = [r for r in rows if r["status"] not in ("ok", "skipped")]
    if bad:
        print(f"{len(bad)} row(s) with status mismatch/error: see {md_path}")
    flags = report.flag_counts(rows)
    if flags:
        print(f"{sum(flags.values())} flag(s) on implausible cells ("
              + ", ".join(f"{n} {f}" for f, n in flags.items()) + f"): see {md_path}")
    if cmp is not None:
        print("\n".join(report.compare_lines(cmp)))
    if plot_note and not args.no_plots:
        print(plot_note)
    print(f"wrote {csv_path}, {md_path}" + (f", {len(plot_files)} plot(s)" if plot_files else ""))
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
