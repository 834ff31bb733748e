"""Driver of scripts/gpu_check.sh (DESIGN.md §6): the one prepared command of a GPU machine.

    python scripts/gpu_check/driver.py OUTDIR [--dry-run] [--stages FILE] [--only REGEX]

Stages: env (loud abort, exit 3, when torch cannot see the expected GPU), build (this GPU's arch
only, all cores), then the op families' stages from stages.txt, then the report. Each stage runs
in its own process group under a timeout cut from its budget and from what is left of the overall
budget (a reserve is kept for every later required stage and for the report); pytest stages stop
starting tests shortly before their timeout and write junit XML. OUTDIR gets at most 6 files:
report.md, summary.txt, results.json, bench.csv, bench-plots.png and logs.tar.gz (every stage log,
junit XML and event log); report.md and logs.tar.gz are rewritten after every stage, so a killed
run still leaves them. Exit status: 0 all clean, 1 something failed, 2 usage, 3 not a GPU run.

Environment: GPU_CHECK_BUDGET_S (450; dry run 240), GPU_CHECK_DRY_RUN=1, GPU_CHECK_STAGES (stage
file), GPU_CHECK_ONLY (regex on stage names), GPU_CHECK_EXPECT_GPU (regex on the device name,
default H200|H100; "any" accepts every CUDA device), GPU_CHECK_BUILD_S (180), PYDL_CUDA_ARCHS
(skip detection), PYDL_COMMIT (commit to report when the copy has no .git), PYTHON,
GPU_CHECK_IGNORE_MISSING (modules whose absence drops the test files importing them instead of
aborting collection; default hypothesis), GPU_CHECK_KEEP_WORK=1 (keep the work folder).
`driver.py --digest` prints the source digest the report carries (to match a report to a tree).
Modules: gc_stages (stage list), gc_proc (processes), gc_stage_impl (the stages), gc_results
(junit / events / sanitizer / bench parsing), gc_report (report.md, summary), pytest_gpu_check
(the pytest plugin), probe_env (the torch / GPU probe).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import gc_report  # noqa: E402
import gc_results  # noqa: E402
import gc_stages  # noqa: E402
from gc_proc import PY, ROOT, Run, killpg, listdir, probe_text, res  # noqa: E402
from gc_stage_impl import STAGE_FUNCS  # noqa: E402
from gc_stages import Stage  # noqa: E402

REPORT_RESERVE_S = 10
# The least a required stage is given: what every later required stage reserves from the budget.
# Eight op families make ~16 required stages; 12 s each keeps >= 250 s of a 450 s run for the first.
MIN_STAGE_S = 12


def limit_for(run: Run, stages: list, i: int) -> float:
    later = sum(min(s.budget, MIN_STAGE_S) for s in stages[i + 1:] if not s.optional)
    left = run.deadline - time.monotonic() - REPORT_RESERVE_S - later
    return min(stages[i].budget, left)


def publish(run: Run, final: bool = False) -> None:
    """report.md, summary.txt, results.json, bench.csv, bench-plots.png, logs.tar.gz in OUTDIR."""
    csvs = [p for p in run.facts.get("bench_csvs", []) if os.path.exists(p)]
    if csvs:
        gc_results.merge_csv(csvs, os.path.join(run.out, "bench.csv"))
    if final:
        pngs = sorted(os.path.join(d, f) for d in (os.path.dirname(p) for p in csvs)
                      for f in listdir(d) if f.endswith(".png"))
        if pngs:
            gc_report.combine_pngs(pngs, os.path.join(run.out, "bench-plots.png"), PY)
    run.facts["elapsed_s"] = round(run.elapsed())
    _write(os.path.join(run.out, "report.md"), gc_report.markdown(run.facts, run.results, final))
    _write(os.path.join(run.out, "summary.txt"), gc_report.summary(run.facts, run.results))
    _write(os.path.join(run.out, "results.json"), json.dumps(
        {"facts": {k: v for k, v in run.facts.items() if k != "probe"}, "probe": run.facts.get("probe"),
         "stages": run.results}, indent=1, default=str))
    shutil.copy(os.path.join(run.out, "report.md"), os.path.join(run.logs, "report.md"))
    tmp = os.path.join(run.out, ".logs.tar.gz.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(run.logs, arcname="logs")
    os.replace(tmp, os.path.join(run.out, "logs.tar.gz"))


def _write(path: str, text: str) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _commit() -> str:
    if os.environ.get("PYDL_COMMIT"):
        return os.environ["PYDL_COMMIT"]
    h = probe_text(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], 10)
    if not re.fullmatch(r"[0-9a-f]{4,40}", h):
        return "unknown"
    dirty = probe_text(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"], 10)
    return h + (" (uncommitted changes present)" if dirty and not dirty.startswith("(") else "")


DIGEST_PATHS = ("csrc", "pydl", "tests", "scripts", "setup.py", "CMakeLists.txt", "pyproject.toml")


def source_digest() -> str:
    """sha256 (12 hex) over the sources' paths and bytes: ties a report to a tree even where the
    copy has no .git (`driver.py --digest` prints it for a checkout)."""
    import hashlib

    h = hashlib.sha256()
    files = []
    for top in DIGEST_PATHS:
        full = os.path.join(ROOT, top)
        if os.path.isfile(full):
            files.append(top)
        for d, dirs, names in os.walk(full):
            dirs[:] = sorted(x for x in dirs if x != "__pycache__" and not x.startswith("."))
            files += [os.path.relpath(os.path.join(d, n), ROOT) for n in names
                      if n.endswith((".py", ".cu", ".cuh", ".cpp", ".h", ".txt", ".sh", ".md", ".toml"))]
    for rel in sorted(files):
        h.update(rel.encode() + b"\0")
        with open(os.path.join(ROOT, rel), "rb") as f:
            h.update(f.read() + b"\0")
    return h.hexdigest()[:12]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", nargs="?")
    ap.add_argument("--dry-run", action="store_true", default=os.environ.get("GPU_CHECK_DRY_RUN", "") not in ("", "0"))
    ap.add_argument("--stages", default=os.environ.get("GPU_CHECK_STAGES") or os.path.join(HERE, "stages.txt"))
    ap.add_argument("--only", default=os.environ.get("GPU_CHECK_ONLY"), help="regex: run only matching stages")
    ap.add_argument("--digest", action="store_true", help="print the source digest and exit")
    args = ap.parse_args(argv)
    if args.digest:
        print(source_digest())
        return 0
    if not args.outdir:
        ap.error("OUTDIR is required")
    budget = float(os.environ.get("GPU_CHECK_BUDGET_S") or (240 if args.dry_run else 450))
    try:
        stages = gc_stages.expand(gc_stages.parse(args.stages))
    except (OSError, ValueError) as exc:
        print(f"gpu_check: bad stage list: {exc}", file=sys.stderr)
        return 2
    os.makedirs(args.outdir, exist_ok=True)
    run = Run(os.path.abspath(args.outdir), args.dry_run, budget)
    run.facts.update(outdir=run.out, commit=_commit(), source_digest=source_digest(), date=time.strftime("%Y-%m-%d", time.gmtime()), stage_file=args.stages)
    stages = [Stage("env", "env", 75), Stage("build", "build", float(os.environ.get("GPU_CHECK_BUILD_S", 180)))] + [
        s for s in stages if not args.only or re.search(args.only, s.name)]

    def on_signal(signum, _frame):
        if run.child is not None:
            killpg(run.child.pid, signal.SIGKILL)
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"[gpu_check] {run.facts['mode']}, budget {budget:.0f} s, {len(stages)} stages, logs in {run.work}", flush=True)
    try:
        for i, st in enumerate(stages):
            limit = limit_for(run, stages, i)
            if run.abort:
                r = res(st, "NOT RUN", "aborted: not a GPU run")
            elif run.dry and st.optional:
                r = res(st, "SKIP", "optional stage: not run in a dry run")
            elif limit < min(st.budget, MIN_STAGE_S):
                r = res(st, "SKIP" if st.optional else "NOT RUN",
                         f"no time left in the overall budget ({limit:.0f} s for a {st.budget:.0f} s stage)")
            else:
                t = time.monotonic()
                r = STAGE_FUNCS[st.kind](run, st, limit)
                r["limit"], r["secs"] = round(limit), round(time.monotonic() - t, 1)
            run.results.append(r)
            print(f"[gpu_check] {st.name:22s} {r['status']:10s} {r['secs'] or 0:6.1f}s  {r['detail'][:110]}"
                  f"   (elapsed {run.elapsed():.0f}s)", flush=True)
            publish(run)
    except KeyboardInterrupt as exc:
        run.facts["interrupted"] = str(exc) or "interrupted"
    publish(run, final=True)
    text = gc_report.summary(run.facts, run.results)
    if run.abort:
        print(f"\n{'!' * 78}\ngpu_check ABORTED: NOT A GPU RUN: {run.abort}\n{'!' * 78}", file=sys.stderr)
    print("\n" + text, flush=True)
    if os.environ.get("GPU_CHECK_KEEP_WORK") != "1":
        shutil.rmtree(run.work, ignore_errors=True)
    if run.abort:
        return 3
    return 0 if all(r["ok"] for r in run.results) and "interrupted" not in run.facts else 1


if __name__ == "__main__":
    sys.exit(main())

