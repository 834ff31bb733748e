"""pytest plugin of scripts/gpu_check.sh: test selection, ordering, a stage deadline, a crash-proof
event log. Loaded with ``-p pytest_gpu_check`` (scripts/gpu_check on PYTHONPATH); inert unless one
of its options is given, so it never changes an ordinary pytest run.

  --gpu-select EXPR      keep the tests for which EXPR is true. EXPR is a boolean expression
                         (and / or / not / parentheses) over names; a name is true when the test
                         carries that marker OR requests that fixture, e.g.
                         "(cuda and not triton) or device": the native-CUDA tests plus every
                         device-generic test (the `device` fixture of tests/conftest.py, which
                         PYDL_TEST_DEVICE=cuda points at the GPU). `-m` cannot express the
                         second half: the device-generic tests carry no marker.
  --gpu-first REGEX      run first the tests whose node id matches REGEX, and the `slow`-marked
                         ones (long rows, big shapes): a stage cut by its time budget then loses
                         the cheap tests, not the valuable ones. Otherwise collection order.
  --gpu-sample N         keep N tests spread evenly over the ordered selection (dry runs).
  --gpu-deadline T       absolute time (time.time()) after which tests that have not started are
                         skipped with a stated reason, so pytest ends on its own and writes its
                         junit XML inside the stage's timeout.
  --gpu-events FILE      append one JSON line per event (selection, test start, test report),
                         flushed at once: it survives a killed pytest, when no junit XML does.
  --gpu-ignore-missing M comma-separated modules (e.g. hypothesis): when one is not importable,
                         test files importing it are not collected (and listed in the events)
                         instead of aborting the whole collection.
  --gpu-require-cuda     abort (exit 3) unless torch sees a CUDA device and TRITON_INTERPRET is
                         off after tests/conftest.py was loaded: a GPU run must not silently
                         become a CPU / interpreter run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import time

import pytest

from gc_results import DEADLINE_REASON, missing_module_of  # scripts/gpu_check is on PYTHONPATH


def pytest_addoption(parser):
    g = parser.getgroup("gpu_check", "scripts/gpu_check.sh")
    g.addoption("--gpu-select", default=None)
    g.addoption("--gpu-first", default=None)
    g.addoption("--gpu-sample", type=int, default=0)
    g.addoption("--gpu-deadline", type=float, default=0.0)
    g.addoption("--gpu-events", default=None)
    g.addoption("--gpu-ignore-missing", default="")
    g.addoption("--gpu-require-cuda", action="store_true", default=False)


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")  # a pytest-xdist worker


def _emit(config, record: dict, *, from_worker_ok: bool = False) -> None:
    path = config.getoption("--gpu-events")
    if not path or (_is_worker(config) and not from_worker_ok):
        return
    record = dict(record, t=round(time.time(), 3))
    with open(path, "a", encoding="utf-8") as f:  # one short write per line, flushed on close
        f.write(json.dumps(record) + "\n")


def _first_worker_or_main(config) -> bool:
    return not _is_worker(config) or config.workerinput.get("workerid") == "gw0"


# ---- files that need a missing module ------------------------------------------------------------

def _missing(config) -> list:
    mods = [m.strip() for m in config.getoption("--gpu-ignore-missing").split(",") if m.strip()]
    return [m for m in mods if importlib.util.find_spec(m) is None]


def pytest_ignore_collect(collection_path, config):
    """Files found inside a folder argument (files named on the command line are filtered by
    the driver: pytest does not ask this hook about them)."""
    missing = getattr(config, "_gpu_missing", None)
    if missing is None:
        missing = config._gpu_missing = _missing(config)
        config._gpu_ignored = []
    if not missing or collection_path.suffix != ".py" or not collection_path.name.startswith("test"):
        return None
    mod = missing_module_of(collection_path, missing)
    if mod is None:
        return None
    config._gpu_ignored.append((str(collection_path), f"needs {mod}, which is not installed"))
    return True


# ---- selection and order -------------------------------------------------------------------------

class _Names(dict):
    """eval() namespace: a name is true when the item has that marker or requests that fixture."""

    def __init__(self, item):
        super().__init__()
        self.markers = {m.name for m in item.iter_markers()}
        self.fixtures = set(getattr(item, "fixturenames", ()))

    def __missing__(self, name):
        return name in self.markers or name in self.fixtures


def _compile(expr: str):
    if re.search(r"[^\w\s()]", expr):
        raise pytest.UsageError(f"--gpu-select {expr!r}: only names, and/or/not and parentheses")
    return compile(expr, "<gpu-select>", "eval")


@pytest.hookimpl(trylast=True)  # after tests/conftest.py added its skip markers
def pytest_collection_modifyitems(config, items):
    expr = config.getoption("--gpu-select")
    first = config.getoption("--gpu-first")
    sample = config.getoption("--gpu-sample")
    if not (expr or first or sample or config.getoption("--gpu-events")):
        return
    total = len(items)
    keep = list(items)
    if expr:
        code = _compile(expr)
        keep = [it for it in items if eval(code, {"__builtins__": {}}, _Names(it))]  # noqa: S307
    rx = re.compile(first) if first else None

    def rank(it):
        slow = it.get_closest_marker("slow") is not None
        return 0 if (slow or (rx is not None and rx.search(it.nodeid))) else 1

    order = {id(it): i for i, it in enumerate(keep)}
    keep.sort(key=lambda it: (rank(it), order[id(it)]))
    if sample and len(keep) > sample:  # dry runs: mostly tests that run here, one that skips
        runnable = [it for it in keep if it.get_closest_marker("skip") is None]
        skipping = [it for it in keep if it.get_closest_marker("skip") is not None]
        pool = runnable if sample >= 2 and len(runnable) >= sample - 1 and skipping else keep
        n = sample - 1 if pool is runnable else sample
        step = len(pool) / n
        picked = [pool[int(i * step)] for i in range(n)] + (skipping[:1] if pool is runnable else [])
        keep = [it for it in keep if any(it is p for p in picked)]
    chosen = {id(it) for it in keep}
    dropped = [it for it in items if id(it) not in chosen]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep
    if _first_worker_or_main(config):
        _emit(config, {"event": "selected", "selected": len(keep), "collected": total,
                       "deselected": len(dropped), "select": expr, "first": first,
                       "sample": sample or None,
                       "ignored": getattr(config, "_gpu_ignored", [])}, from_worker_ok=True)


# ---- the GPU must be real ------------------------------------------------------------------------

def pytest_sessionstart(session):  # after tests/conftest.py set (or not) TRITON_INTERPRET
    config = session.config
    if not config.getoption("--gpu-require-cuda"):
        return
    import torch

    problems = []
    interp = os.environ.get("TRITON_INTERPRET", "")
    if interp not in ("", "0"):
        problems.append(f"TRITON_INTERPRET={interp!r}: Triton kernels would run in the interpreter")
    try:
        ok = torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception as exc:  # a broken driver raises here
        ok, problems = False, problems + [f"torch.cuda raised {type(exc).__name__}: {exc}"]
    if not ok:
        problems.append(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device")
    if problems:
        _emit(config, {"event": "abort", "reason": "; ".join(problems)}, from_worker_ok=True)
        pytest.exit("gpu_check: NOT A GPU RUN: " + "; ".join(problems), returncode=3)


# ---- deadline and events -------------------------------------------------------------------------

@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    deadline = item.config.getoption("--gpu-deadline")
    if deadline and time.time() > deadline:
        pytest.skip(DEADLINE_REASON)


def pytest_runtest_logstart(nodeid, location):
    config = _CONFIG.get("config")
    if config is not None:
        _emit(config, {"event": "start", "nodeid": nodeid})


def pytest_runtest_logreport(report):
    config = _CONFIG.get("config")
    if config is None:
        return
    if report.when != "call" and not (report.failed or report.skipped):
        return
    rec = {"event": "report", "nodeid": report.nodeid, "when": report.when,
           "outcome": report.outcome, "duration": round(getattr(report, "duration", 0.0), 3)}
    if hasattr(report, "wasxfail"):
        rec["xfail"] = True
    if report.failed:
        rec["message"] = report.longreprtext[-1500:]
    elif report.skipped:
        lr = report.longrepr
        rec["message"] = str(lr[2] if isinstance(lr, tuple) and len(lr) == 3 else lr)[:300]
    _emit(config, rec)


_CONFIG: dict = {}


def pytest_configure(config):
    _CONFIG["config"] = config
    path = config.getoption("--gpu-events")
    if path and not _is_worker(config):
        _emit(config, {"event": "session", "pid": os.getpid(), "args": list(config.invocation_params.args)})


def pytest_sessionfinish(session, exitstatus):
    _emit(session.config, {"event": "finish", "exitstatus": int(exitstatus)})
