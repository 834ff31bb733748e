"""Processes, tools and bookkeeping shared by the stages of scripts/gpu_check.sh."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from gc_stages import Stage

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PY = os.environ.get("PYTHON") or sys.executable


class Run:
    """State of one gpu_check run: clock, paths, environment facts, stage results."""

    def __init__(self, out: str, dry: bool, budget: float):
        self.out, self.dry, self.budget = out, dry, budget
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget
        self.work = tempfile.mkdtemp(prefix="gpu_check.")
        self.logs = os.path.join(self.work, "logs")
        os.makedirs(self.logs)
        self.facts: dict = {"mode": "dry run (no GPU needed)" if dry else "gpu", "budget_s": budget}
        self.tools: dict = {}
        self.results: list = []
        self.abort: str | None = None
        self.child: subprocess.Popen | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def log(self, name: str) -> str:
        return os.path.join(self.logs, re.sub(r"[^A-Za-z0-9_.-]", "-", name))


# ---- processes -----------------------------------------------------------------------------------

def run_cmd(run: Run, argv: list, log: str, timeout: float, env: dict | None = None) -> tuple:
    """(rc, seconds, timed_out): argv in its own process group; on timeout SIGINT (pytest then
    writes its junit XML), SIGTERM, SIGKILL, a few seconds apart."""
    with open(log, "ab") as f:
        f.write(f"### {shlex.join(argv)}   (timeout {timeout:.0f} s)\n".encode())
        f.flush()
        t = time.monotonic()
        try:
            p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 cwd=ROOT, env=env, start_new_session=True, preexec_fn=_default_sigint)
        except OSError as exc:
            f.write(f"### cannot start: {exc}\n".encode())
            return 127, 0.0, False
        run.child = p
        timed_out = False
        try:
            rc = p.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, grace in ((signal.SIGINT, 8), (signal.SIGTERM, 4), (signal.SIGKILL, 5)):
                killpg(p.pid, sig)
                try:
                    p.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = p.returncode if p.returncode is not None else -9
        finally:
            run.child = None
        killpg(p.pid, signal.SIGKILL)  # leftovers of the group (compile workers, xdist nodes)
        secs = time.monotonic() - t
        f.write(f"\n### rc {rc} after {secs:.1f} s{'  TIMEOUT' if timed_out else ''}\n".encode())
    return rc, secs, timed_out


def _default_sigint() -> None:
    """A job started in the background inherits SIGINT ignored, and Python then installs no
    KeyboardInterrupt handler: restore the default, so SIGINT lets pytest write its junit XML."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def killpg(pid: int, sig) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def probe_text(argv: list, timeout: float = 20) -> str:
    """Output of a short probe command, or why there is none."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        return (p.stdout + p.stderr).strip() or f"(no output, rc {p.returncode})"
    except FileNotFoundError:
        return f"({argv[0]} not found)"
    except subprocess.TimeoutExpired:
        return f"({argv[0]} timed out after {timeout:.0f} s)"


def find_tool(name: str, probe: dict) -> tuple:
    """(path or None, places searched): PATH, this Python's bin, CUDA_HOME / CUDA_PATH,
    /usr/local/cuda*, and the bin dirs of the cmake / ninja Python packages."""
    dirs = [os.path.dirname(PY)]
    for var in ("CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"):
        if os.environ.get(var):
            dirs += [os.path.join(os.environ[var], "bin"), os.path.join(os.environ[var], "compute-sanitizer")]
    cudas = ["/usr/local/cuda"] + sorted((os.path.join("/usr/local", d) for d in listdir("/usr/local")
                                          if d.startswith("cuda-")), reverse=True)
    for c in cudas:
        dirs += [os.path.join(c, "bin"), os.path.join(c, "compute-sanitizer")]
    dirs += [d for d in (probe.get("cmake_bin_dir"), probe.get("ninja_bin_dir")) if d]
    dirs += ["/opt/nvidia/compute-sanitizer", "/usr/bin", "/usr/local/bin"]
    found = shutil.which(name)
    if found is None:
        for d in dirs:
            c = os.path.join(d, name)
            if os.path.isfile(c) and os.access(c, os.X_OK):
                found = c
                break
    return found, ["PATH"] + dirs


def listdir(d: str) -> list:
    try:
        return os.listdir(d)
    except OSError:
        return []


def base_env(run: Run) -> dict:
    env = dict(os.environ)
    extra = [os.path.dirname(p) for p in run.tools.values() if p]
    env["PATH"] = os.pathsep.join(dict.fromkeys(extra + env.get("PATH", "").split(os.pathsep)))
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    env["PYDL_COMMIT"] = run.facts.get("commit", "unknown").split()[0]
    if run.dry:
        env["PYDL_TEST_DEVICE"] = "cpu"
    else:  # a GPU run: Triton must compile, the device tests must use the GPU
        env.pop("TRITON_INTERPRET", None)
        env["PYDL_TEST_DEVICE"] = "cuda"
    return env


# ---- bookkeeping ---------------------------------------------------------------------------------

PASSING = ("PASS", "WARN", "SKIP")


def res(st: Stage, status: str, detail: str, **kw) -> dict:
    r = {"name": st.name, "kind": st.kind, "status": status, "detail": detail, "optional": st.optional,
         "budget": st.budget, "limit": None, "secs": None, "counts": None, "failures": [], "notes": [],
         "skips": {}, "slowest": [], "log": None}
    r.update(kw)
    r["skips"] = dict(r["skips"])
    r["ok"] = status in PASSING
    return r


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def tail(path: str, n: int) -> str:
    lines = [ln for ln in read_text(path).splitlines() if ln.strip() and not ln.startswith("###")]
    return " | ".join(ln.strip()[:200] for ln in lines[-n:])


def json_in(path: str) -> dict:
    text = read_text(path)
    start, end = text.find("{"), text.rfind("}")
    try:
        return json.loads(text[start:end + 1]) if start >= 0 else {}
    except ValueError:
        return {}


