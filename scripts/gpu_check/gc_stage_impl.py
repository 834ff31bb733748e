"""The stages of scripts/gpu_check.sh: env, build, pytest, check (the workload), sanitizer, bench.
Each takes (run, stage, limit in seconds) and returns a result dict (gc_proc.res)."""

from __future__ import annotations

import concurrent.futures
import glob
import importlib.util
import json
import os
import re
import shlex
import subprocess
import time

import gc_results
from gc_proc import HERE, PY, ROOT, Run, base_env, find_tool, json_in, probe_text, read_text, res, run_cmd, tail
from gc_stages import Stage

# ---- stages --------------------------------------------------------------------------------------

def stage_env(run: Run, st: Stage, limit: float) -> dict:
    log = run.log("env.txt")
    probe_json = os.path.join(run.work, "probe.json")
    env = dict(os.environ)
    if not run.dry:
        env.pop("TRITON_INTERPRET", None)
    else:
        env["GPU_CHECK_PROBE_PYDL"] = "1"
        env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    with open(probe_json, "wb") as f:
        try:
            subprocess.run([PY, os.path.join(HERE, "probe_env.py")], stdout=f, stderr=subprocess.STDOUT,
                           timeout=max(10, limit - 25), env=env, cwd=ROOT)
        except subprocess.TimeoutExpired:
            f.write(b'\n{"probe_error": "the torch / CUDA probe timed out (a hung driver?)"}\n')
    probe = {}
    with open(probe_json, encoding="utf-8", errors="replace") as f:
        text = f.read()
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                probe.update(json.loads(line))
            except ValueError:
                pass
    run.facts["probe"] = probe
    for tool in ("nvcc", "cmake", "ninja", "compute-sanitizer", "nvidia-smi"):
        run.tools[tool], searched = find_tool(tool, probe)
    run.facts["searched"] = searched
    lines = [f"$ {PY} probe_env.py", text.strip()]
    smi = run.tools.get("nvidia-smi") or "nvidia-smi"
    probes = [[smi, "-L"], [smi, "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,"
                             "power.limit,compute_cap", "--format=csv"]]
    for tool in ("nvcc", "cmake", "ninja", "compute-sanitizer"):
        probes.append([run.tools.get(tool) or tool, "--version"])
    probes += [["uname", "-a"], ["git", "-C", ROOT, "log", "-1", "--format=%h %s"]]
    with concurrent.futures.ThreadPoolExecutor(len(probes)) as pool:  # each probe under 15 s
        for argv, text_ in zip(probes, pool.map(lambda a: probe_text(a, 15), probes)):
            lines += [f"$ {shlex.join(argv)}", text_]
    lines.append("tools: " + ", ".join(f"{k}={v or 'NOT FOUND'}" for k, v in run.tools.items()))
    with open(log, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    smi_name = probe_text([smi, "--query-gpu=name", "--format=csv,noheader"], 15)
    ok = smi_name and not smi_name.startswith("(") and not re.search(r"fail|error|not found|no devices", smi_name, re.I)
    run.facts["smi_gpu"] = smi_name.splitlines()[0].strip() if ok else ""
    devs = probe.get("devices") or []
    run.facts["gpu"] = (devs[0].get("name") if devs else "") or run.facts["smi_gpu"] or "no GPU"
    problems = gpu_problems(probe, run.facts["smi_gpu"])
    if run.dry:
        return res(st, "PASS", "dry run: GPU visibility not required" +
                    (f" (here: {problems[0]})" if problems else ""), notes=problems)
    if problems:
        run.abort = "; ".join(problems)
        return res(st, "FAIL", "NOT A GPU RUN: " + run.abort)
    d = devs[0]
    return res(st, "PASS", f"{d['name']} cc {d['cc']}, {d['sms']} SMs, {d['mem_gib']} GiB; torch "
                f"{probe.get('torch')} (CUDA {probe.get('torch_cuda')}), triton {probe.get('triton')}")


def gpu_problems(probe: dict, smi_gpu: str) -> list:
    """Why this is not a run on the expected GPU (empty when it is)."""
    if probe.get("probe_error") or probe.get("torch_error"):
        return [probe.get("probe_error") or f"torch does not import: {probe['torch_error']}"]
    if "torch" not in probe:
        return ["the torch probe printed nothing (see env.txt)"]
    out = []
    if not probe.get("torch_cuda"):
        out.append(f"torch {probe['torch']} is a CPU-only build (torch.version.cuda is None)")
    if not probe.get("cuda_available") or not probe.get("device_count"):
        out.append(f"torch.cuda.is_available() is {probe.get('cuda_available')}, device count "
                   f"{probe.get('device_count')}{' (' + probe['cuda_error'] + ')' if probe.get('cuda_error') else ''}"
                   f"{'; nvidia-smi sees ' + smi_gpu + ': a driver / CUDA runtime mismatch?' if smi_gpu else ''}")
        return out
    expect = os.environ.get("GPU_CHECK_EXPECT_GPU", "H200|H100")
    name = (probe.get("devices") or [{}])[0].get("name", "")
    if expect != "any" and not re.search(expect, name or ""):
        out.append(f"device {name!r} is not the expected kind (GPU_CHECK_EXPECT_GPU={expect!r})")
    if probe.get("kernel_test") != "ok":
        out.append(f"a test kernel did not run correctly: {probe.get('kernel_test')}")
    return out


def stage_build(run: Run, st: Stage, limit: float) -> dict:
    log = run.log("build.log")
    env = base_env(run)
    probe = run.facts.get("probe", {})
    arch = os.environ.get("PYDL_CUDA_ARCHS", "")
    devs = probe.get("devices") or []
    if not arch and devs and "major" in devs[0]:
        arch = f"{devs[0]['major']}{devs[0]['minor']}" + ("a" if devs[0]["major"] >= 9 else "")
    arch = arch or "90a"
    run.facts["arch"] = arch
    cmd = [PY, "setup.py", "build_ext", "--inplace"]
    env.update(PYDL_CUDA="ON", PYDL_CUDA_ARCHS=arch, PYDL_BUILD_JOBS=str(os.cpu_count() or 16),
               CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 16))
    if run.tools.get("nvcc"):
        env["CUDACXX"] = run.tools["nvcc"]
    info_t = 45
    if run.dry:
        with open(log, "w") as f:
            f.write(f"dry run: would run PYDL_CUDA=ON PYDL_CUDA_ARCHS={arch} {shlex.join(cmd)}\n"
                    f"tools: {run.tools}\n")
        status, detail = "SKIP", "dry run: the existing in-place build is used"
    else:
        missing = [t for t in ("nvcc", "cmake", "ninja") if not run.tools.get(t)]
        if missing:
            return res(st, "FAIL", f"{', '.join(missing)} not found (searched {', '.join(run.facts['searched'])})")
        rc, secs, to = run_cmd(run, cmd, log, limit - info_t, env)
        status = "TIMEOUT" if to else ("PASS" if rc == 0 else "FAIL")
        detail = f"sm_{arch}, {secs:.0f} s" + ("" if rc == 0 else f", rc {rc}: " + tail(log, 4))
    if run.dry:  # the probe read it (one torch import less)
        info = probe.get("pydl_info") or {}
        info = {k: (v == "True" if v in ("True", "False") else v) for k, v in info.items()}
    else:
        run_cmd(run, [PY, "-m", "pydl", "info", "--json"], log + ".info", info_t, env)
        info = json_in(log + ".info")
    run.facts["pydl_info"] = info or tail(log + ".info", 20)
    built = info.get("cuda_kernels_built") if info else None
    archs = str(info.get("cuda_archs", "")) if info else ""
    if not run.dry and status == "PASS" and not built:
        status, detail = "FAIL", detail + "; `python -m pydl info`: CUDA kernels NOT built"
    elif not run.dry and status == "PASS" and arch.rstrip("a") not in archs.replace("sm_", ""):
        detail += f"; note: pydl info lists archs {archs!r}"
    return res(st, status, detail + (f"; pydl info: cuda_kernels_built={built}" if run.dry else ""),
                log="build.log")


def stage_pytest(run: Run, st: Stage, limit: float) -> dict:
    spec, env = st.spec, base_env(run)
    name = st.name.replace(":", "-")
    xml, ev, log = run.log(f"{name}.xml"), run.log(f"{name}.events.jsonl"), run.log(f"{name}.log")
    probe = run.facts.get("probe", {})
    mods = probe.get("modules", {})
    grace = max(10.0, 0.15 * limit)
    want = [m for m in os.environ.get("GPU_CHECK_IGNORE_MISSING", "hypothesis").split(",") if m]
    missing = [m for m in want if importlib.util.find_spec(m) is None]
    paths, ignored = [], []
    found = _expand(spec["paths"])
    if not found:
        return res(st, "FAIL", f"tests={','.join(spec['paths'])} matches no file")
    for p in found:  # a test file that imports a missing module would abort collection
        mod = gc_results.missing_module_of(os.path.join(ROOT, p), missing) if p.endswith(".py") else None
        if mod:
            ignored.append((p, f"needs {mod}, which is not installed"))
        else:
            paths.append(p)
    if not paths:
        return res(st, "SKIP", "every test file needs a missing module",
                    notes=[f"not collected: {p} ({why})" for p, why in ignored])
    cmd = [PY, "-m", "pytest", *paths, "-p", "pytest_gpu_check", "--rootdir", ROOT,
           "--gpu-select", spec["select"], "--gpu-deadline", f"{time.time() + limit - grace:.0f}",
           "--gpu-events", ev, "--gpu-ignore-missing", ",".join(want), "--junitxml", xml,
           "-o", "junit_family=xunit2", "-p", "no:cacheprovider", "--continue-on-collection-errors",
           "-v", "-rfEs", "--durations=15", "--durations-min=0.5"]
    for p in _expand(spec.get("ignore", [])):
        cmd += ["--ignore", p]
    if spec.get("first"):
        cmd += ["--gpu-first", spec["first"]]
    if run.dry:
        cmd += ["--gpu-sample", "2"]
    else:
        cmd += ["--gpu-require-cuda"]
        if spec.get("workers", 1) > 1 and mods.get("xdist"):
            cmd += ["-n", str(spec["workers"])]
    if mods.get("pytest_timeout"):
        cmd += ["--timeout", str(int(max(30, min(180, limit * 0.6))))]
    rc, secs, to = run_cmd(run, cmd, log, limit, env)
    r = gc_results.pytest_result(xml, ev)
    c = r["counts"]
    detail = (f"{c['passed']} passed, {c['failed']} failed, {c['errors']} errors, {c['skipped']} skipped"
              + (f", {c['xfailed']} xfailed" if c["xfailed"] else "")
              + (f", {c['cut']} not run (stage budget)" if c["cut"] else "")
              + f" of {r['selected'] if r['selected'] is not None else '?'} selected ({r['source']})")
    notes = [f"not collected: {os.path.relpath(os.path.join(ROOT, p), ROOT)} ({why})"
             for p, why in ignored + [tuple(x) for x in r["ignored"]]]
    if spec.get("workers", 1) > 1 and not run.dry and not mods.get("xdist"):
        notes.append("pytest-xdist is not installed: Triton tests ran in one process")
    failures = list(r["failures"])
    if r["running"]:
        failures.append((r["running"], f"still running when the stage was stopped after {secs:.0f} s "
                                       f"(timeout {limit:.0f} s): a hang, or a very slow test"))
    if r["abort"]:
        status, detail = "FAIL", "NOT A GPU RUN: " + r["abort"]
    elif to:
        status = "TIMEOUT"
    elif c["failed"] or c["errors"]:
        status = "FAIL"
    elif c["cut"]:
        status = "INCOMPLETE"
    elif not run.dry and r["bad_skips"]:
        status, detail = "FAIL", detail + f"; {r['bad_skips']} skipped as if there were no GPU"
    elif r["selected"] is None and rc != 5:
        status, detail = "FAIL", f"pytest stopped before selecting tests (rc {rc}): " + tail(log, 3)
    elif rc == 5 or not r["selected"]:
        status = "PASS" if spec.get("empty_ok") else "FAIL"
        detail = "no tests selected" + ("" if spec.get("empty_ok") else " (a stage must test something)")
    elif rc not in (0, 1):
        status, detail = "FAIL", detail + f"; pytest rc {rc}: " + tail(log, 3)
    else:
        status = "PASS" if rc == 0 else "FAIL"
    return res(st, status, detail, counts=c, failures=failures, notes=notes, skips=r["skips"],
                slowest=r["slowest"], log=os.path.basename(log), secs=secs)


def _expand(patterns: list) -> list:
    """Test paths with shell wildcards expanded (relative to the checkout), in order, once each."""
    out = []
    for p in patterns:
        hits = sorted(glob.glob(os.path.join(ROOT, p))) if any(c in p for c in "*?[") else [p]
        for h in hits:
            rel = os.path.relpath(h, ROOT) if os.path.isabs(h) and h.startswith(ROOT + os.sep) else h
            if rel not in out:
                out.append(rel)
    return out


def stage_check(run: Run, st: Stage, limit: float) -> dict:
    log = run.log(st.name.replace(":", "-") + ".log")
    tl = str(int(max(5, limit - max(10, 0.2 * limit))))
    dev = ["--device", "cpu", "--quick"] if run.dry else ["--device", "cuda", "--coverage"]
    rc, secs, to = run_cmd(run, [PY, st.spec["script"], *dev, "--time-limit-s", tl], log, limit, base_env(run))
    return _workload_result(run, st, log, rc, to, secs)


def _workload_result(run, st, log, rc, to, secs, extra: str = "") -> dict:
    text = read_text(log)
    fails = [ln.strip() for ln in text.splitlines() if " FAIL " in ln or ln.startswith(("FAIL", "coverage: MISSING"))]
    summary = [ln.strip() for ln in text.splitlines()
               if re.match(r"(\w+: \d+ failing case|coverage:|kernels with >)", ln.strip())]
    detail = "; ".join(summary[-3:]) or tail(log, 2)
    notes = [ln.strip()[:1500] for ln in text.splitlines() if ln.startswith(("kernels seen", "coverage note", "note:"))]
    meaning = {1: "results differ from the float64 reference", 2: "nothing to run here",
               3: "kernel coverage incomplete", 4: "stopped by its time limit before every kernel configuration ran"}
    if to:
        status = "TIMEOUT"
    elif rc == 0:
        status = "PASS"
    elif rc == 2 and run.dry:
        status = "SKIP"
    else:
        status = "FAIL"
        detail = f"{meaning.get(rc, f'rc {rc}')}; {detail}"
    return res(st, status, extra + detail, failures=[(f.split(" FAIL")[0][:80], f) for f in fails[:10]],
                notes=notes, log=os.path.basename(log), secs=secs)


def stage_sanitizer(run: Run, st: Stage, limit: float) -> dict:
    tool, cs = st.spec["tool"], run.tools.get("compute-sanitizer")
    log = run.log(st.name.replace(":", "-") + ".log")
    if run.dry:
        return res(st, "SKIP", "unavailable: dry run" + ("" if cs else " (compute-sanitizer not found here)"))
    if not cs:
        return res(st, "FAIL", "compute-sanitizer not found (searched " + ", ".join(run.facts["searched"]) + ")")
    env = base_env(run)
    env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"  # every tensor its own allocation: OOB is visible
    tl = str(int(max(5, limit - max(12, 0.25 * limit))))
    cmd = [cs, "--tool", tool, "--error-exitcode", "99", "--print-limit", "20",
           PY, st.spec["script"], "--device", "cuda", "--time-limit-s", tl]
    rc, secs, to = run_cmd(run, cmd, log, limit, env)
    san = gc_results.parse_sanitizer(log)
    summ = "; ".join(san["summary"]) or "no sanitizer summary line"
    if san["unsupported"] and rc != 0:
        return res(st, "WARN", "unavailable: compute-sanitizer does not support this device / runtime "
                    "(a gVisor machine?)", log=os.path.basename(log), secs=secs)
    if rc == 99 or san["errors"]:
        return res(st, "FAIL", f"{san['errors']} sanitizer error(s): {summ}",
                    failures=[(f"{tool} report {i + 1}", b) for i, b in enumerate(san["first"])],
                    log=os.path.basename(log), secs=secs)
    r = _workload_result(run, st, log, rc, to, secs, extra=summ + "; ")
    if r["status"] == "PASS" and not san["summary"]:
        r.update(status="FAIL", ok=False, detail="no sanitizer summary in the log; " + r["detail"])
    return r


def stage_bench(run: Run, st: Stage, limit: float) -> dict:
    suite = st.spec["suite"]
    log, out = run.log(st.name.replace(":", "-") + ".log"), os.path.join(run.work, f"bench-{suite}")
    tl = max(5, int(limit - max(15, 0.3 * limit)))
    if run.dry:
        args = ["--device", "cpu", "--smoke", "--no-plots", "--providers", "pydl-native", "torch-eager",
                "--modes", "fwd"]
    else:
        args = ["--device", "cuda", "--quick"]
    cmd = [PY, "-m", "pydl.bench", suite, *args, "--out", out, "--time-limit-s", str(tl)]
    rc, secs, to = run_cmd(run, cmd, log, limit, base_env(run))
    if run.dry and rc == 2 and "unrecognized arguments" in read_text(log):  # --smoke is a hidden option
        cmd[cmd.index("--smoke")] = "--quick"
        rc, s2, to = run_cmd(run, cmd, log, max(10, limit - secs), base_env(run))
        secs += s2
    csv_path = os.path.join(out, "results.csv")
    rows = gc_results.read_bench_csv(csv_path)
    run.facts.setdefault("bench_csvs", []).append(csv_path)
    b = gc_results.bench_status(rows)
    detail = f"{sum(b['statuses'].values())} cells: " + ", ".join(f"{n} {s}" for s, n in sorted(b["statuses"].items()))
    notes = [f"{b['cut']} points not measured: --time-limit-s reached"] if b["cut"] else []
    if to:
        status = "TIMEOUT"
    elif rc != 0:
        status, detail = "FAIL", f"rc {rc}: " + tail(log, 3)
    elif not rows:
        status, detail = "FAIL", "no results.csv written"
    elif b["bad"]:
        status = "FAIL"
    else:
        status = "WARN" if b["cut"] else "PASS"
    fails = [(f"{r.get('op')} {r.get('provider')} {r.get('mode')} {r.get('shape')} {r.get('dtype')}",
              f"{r.get('status')}: {r.get('note', '')}") for r in b["bad"][:10]]
    return res(st, status, detail, notes=notes, failures=fails, log=os.path.basename(log), secs=secs,
                bench=gc_results.bench_table(rows), bench_md=read_text(os.path.join(out, "report.md")))


STAGE_FUNCS = {"env": stage_env, "build": stage_build, "pytest": stage_pytest, "check": stage_check,
               "sanitizer": stage_sanitizer, "bench": stage_bench}


