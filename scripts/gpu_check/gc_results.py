"""Reading what the stages leave behind: junit XML (or, when pytest was killed before writing it,
the plugin's JSON-lines events), compute-sanitizer logs, and the benchmark CSV."""

from __future__ import annotations

import csv
import json
import os
import re
import xml.etree.ElementTree as ET
from collections import Counter

DEADLINE_REASON = "gpu_check: the stage's time budget ran out before this test started"
_IMPORT_RE = r"^\s*(?:import|from)\s+{mod}\b"

# Skip reasons that mean "this was not a GPU run" (tests/conftest.py's wording): never acceptable
# on the GPU machine.
NOT_GPU_SKIP = re.compile(r"needs a CUDA GPU|no CUDA GPU|PYDL_TEST_DEVICE=cuda but|TRITON_INTERPRET|"
                          r"triton is not installed|kernels? (are |is )?not built|cuda_built", re.I)


def missing_module_of(path, missing) -> str | None:
    """The first of the `missing` modules that test file `path` imports, or None."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    return next((m for m in missing if re.search(_IMPORT_RE.format(mod=re.escape(m)), text, re.M)), None)


def _first_lines(text: str, n: int = 6, width: int = 220) -> str:
    lines = [ln.rstrip()[:width] for ln in (text or "").strip().splitlines() if ln.strip()]
    # The assertion / exception lines (pytest prefixes them with "E ") say most; else the head.
    errs = [ln for ln in lines if ln.lstrip().startswith("E ")]
    return "\n".join((errs or lines)[:n])


def empty_counts() -> dict:
    return {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "xfailed": 0, "cut": 0}


def parse_junit(path: str) -> dict | None:
    """{counts, failures [(id, text)], skips Counter, slowest [(id, s)]} or None if unreadable."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts, failures, skips, times = empty_counts(), [], Counter(), []
    for tc in root.iter("testcase"):
        cls, name = tc.get("classname", ""), tc.get("name", "")
        tid = f"{cls}::{name}" if cls else name
        times.append((tid, float(tc.get("time") or 0.0)))
        kinds = {child.tag: child for child in tc}
        if "failure" in kinds or "error" in kinds:
            el = kinds.get("failure", kinds.get("error"))
            is_err = "error" in kinds and "failure" not in kinds
            counts["errors" if is_err else "failed"] += 1
            failures.append((tid, _first_lines((el.get("message") or "") + "\n" + (el.text or ""))))
        elif "skipped" in kinds:
            el = kinds["skipped"]
            msg = (el.get("message") or el.text or "").strip()
            if (el.get("type") or "").endswith("xfail"):
                counts["xfailed"] += 1
            elif DEADLINE_REASON in msg:
                counts["cut"] += 1
            else:
                counts["skipped"] += 1
                skips[_skip_reason(msg)] += 1
        else:
            counts["passed"] += 1
    times.sort(key=lambda t: -t[1])
    return {"counts": counts, "failures": failures, "skips": skips, "slowest": times[:8], "source": "junit"}


def _skip_reason(msg: str) -> str:
    msg = re.sub(r"^Skipped:\s*", "", msg.strip())
    msg = re.sub(r"^\S+\.py:\d+: ", "", msg)
    return " ".join(msg.split())[:160] or "(no reason given)"


def parse_events(path: str) -> dict:
    """The plugin's events: selection facts always; results too when there is no junit XML."""
    out = {"selected": None, "ignored": [], "abort": None, "finished": False, "running": None,
           "counts": empty_counts(), "failures": [], "skips": Counter(), "slowest": [], "source": "events"}
    started, reported, times = [], set(), []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError:
        return out
    for line in lines:
        try:
            ev = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        kind = ev.get("event")
        if kind == "selected":
            out["selected"] = ev.get("selected")
            out["ignored"] = ev.get("ignored") or []
        elif kind == "abort":
            out["abort"] = ev.get("reason")
        elif kind == "finish":
            out["finished"] = True
        elif kind == "start":
            started.append(ev["nodeid"])
        elif kind == "report":
            nid, outcome = ev["nodeid"], ev["outcome"]
            c = out["counts"]
            if outcome == "failed":
                c["failed" if ev["when"] == "call" else "errors"] += 1
                out["failures"].append((nid, _first_lines(ev.get("message", ""))))
            elif outcome == "skipped":
                msg = ev.get("message", "")
                if ev.get("xfail"):
                    c["xfailed"] += 1
                elif DEADLINE_REASON in msg:
                    c["cut"] += 1
                else:
                    c["skipped"] += 1
                    out["skips"][_skip_reason(msg)] += 1
            elif ev["when"] == "call":
                c["passed"] += 1
            reported.add(nid)
            times.append((nid, ev.get("duration", 0.0)))
    unfinished = [n for n in started if n not in reported]
    out["running"] = unfinished[-1] if unfinished else None
    out["slowest"] = sorted(times, key=lambda t: -t[1])[:8]
    return out


def pytest_result(junit: str, events: str) -> dict:
    ev = parse_events(events)
    res = parse_junit(junit) if os.path.exists(junit) else None
    if res is None:
        res = ev
    res["selected"], res["ignored"] = ev["selected"], ev["ignored"]
    res["abort"], res["running"] = ev["abort"], ev["running"]
    c = res["counts"]
    if res["running"] and res is not ev:
        # pytest was interrupted inside this test; junit lists it as if it had passed.
        name = res["running"].split("::")[-1]
        if any(t.split("::")[-1] == name for t, _ in res["failures"]):
            pass
        elif c["passed"]:
            c["passed"] -= 1
            c["errors"] += 1
    if res["running"] and res is ev:
        c["errors"] += 1
    if res["selected"]:  # tests that never started (a killed run) count as cut
        c["cut"] += max(0, res["selected"] - sum(c.values()))
    res["bad_skips"] = sum(n for reason, n in res["skips"].items() if NOT_GPU_SKIP.search(reason))
    return res


# ---- compute-sanitizer ---------------------------------------------------------------------------

SAN_UNSUPPORTED = re.compile(r"Device not supported|error 999|CUDA_ERROR_UNKNOWN|cudaErrorUnknown|"
                             r"CUDA error: unknown error|Target application .* not supported", re.I)


def parse_sanitizer(log: str) -> dict:
    try:
        with open(log, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        text = ""
    summary = [ln.replace("========= ", "").strip() for ln in text.splitlines()
               if re.search(r"(ERROR|RACECHECK|SYNCCHECK|INITCHECK) SUMMARY", ln)]
    errors = 0
    for ln in summary:
        m = re.search(r"(\d+) errors?", ln)
        errors += int(m.group(1)) if m else 0
    # The first reports: "========= Invalid __global__ read ..." and the kernel it names.
    first = []
    for block in re.split(r"\n=========\s*\n", text):
        lines = [ln.replace("=========", "").strip() for ln in block.splitlines() if ln.startswith("=========")]
        lines = [ln for ln in lines if ln and "SUMMARY" not in ln and not ln.startswith("COMPUTE-SANITIZER")]
        if lines and re.search(r"Invalid|Race|Hazard|Uninitialized|Barrier|error|Error", lines[0]):
            first.append("\n".join(lines[:5]))
        if len(first) >= 3:
            break
    workload = [ln.strip() for ln in text.splitlines() if ln.startswith(("sanitize_", "FAIL", "MISMATCH"))]
    return {"summary": summary, "errors": errors, "first": first, "workload": workload[-3:],
            "unsupported": bool(SAN_UNSUPPORTED.search(text))}


# ---- benchmark CSV -------------------------------------------------------------------------------

def read_bench_csv(path: str) -> list:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def merge_csv(paths: list, dest: str) -> int:
    """Concatenate CSVs (the union of their columns, in first-seen order) into dest; rows written."""
    rows, cols = [], []
    for p in paths:
        for r in read_bench_csv(p):
            rows.append(r)
            cols += [c for c in r if c not in cols]
    if not rows:
        return 0
    with open(dest, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return len(rows)


def bench_status(rows: list) -> dict:
    st = Counter(r.get("status", "") for r in rows if r.get("op") != "ceiling")
    cut = sum(1 for r in rows if "time-limit" in (r.get("note") or ""))
    bad = [r for r in rows if r.get("status") in ("mismatch", "error")]
    return {"statuses": dict(st), "cut": cut, "bad": bad}


def bench_table(rows: list, limit: int = 40) -> list:
    """Compact rows: op, mode, dtype, shape, p50 ms per provider, best pydl speed-up vs eager."""
    groups: dict = {}
    providers: list = []
    for r in rows:
        if r.get("op") == "ceiling":
            continue
        key = (r.get("op", ""), r.get("mode", ""), r.get("dtype", ""), r.get("shape", ""))
        groups.setdefault(key, {})[r.get("provider", "")] = r
        if r.get("provider") not in providers:
            providers.append(r.get("provider", ""))
    header = ["op", "mode", "dtype", "shape"] + providers + ["pydl ×eager"]
    body = []
    for key, per in list(groups.items())[:limit]:
        cells = list(key)
        for p in providers:
            r = per.get(p)
            v = _num(r.get("p50_ms")) if r else None
            cells.append("-" if r is None else (f"{v:.4g}" if v is not None and r.get("status") == "ok"
                                                else (r.get("status") or "-")))
        sp = [_num(r.get("speedup_vs_eager")) for p, r in per.items() if p.startswith("pydl")
              and r.get("status") == "ok"]
        sp = [s for s in sp if s is not None]
        cells.append(f"{max(sp):.2f}" if sp else "-")
        body.append(cells)
    return [header] + body


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None
