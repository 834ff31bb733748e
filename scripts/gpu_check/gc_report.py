"""report.md and the short summary table of scripts/gpu_check.sh."""

from __future__ import annotations

import re
import subprocess


def verdict(facts: dict, stages: list) -> str:
    if facts.get("interrupted"):
        return "INTERRUPTED"
    if any(r["name"] == "env" and not r["ok"] for r in stages):
        return "ABORTED (not a GPU run)" if facts.get("mode") == "gpu" else "FAIL"
    return "PASS" if stages and all(r["ok"] for r in stages) else "FAIL"


def _cell(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _counts(r: dict) -> str:
    c = r.get("counts")
    if not c:
        return ""
    s = f"{c['passed']}/{c['failed']}/{c['errors']}/{c['skipped']}"
    return s + (f" (+{c['cut']} cut)" if c.get("cut") else "")


def summary(facts: dict, stages: list) -> str:
    """The short table printed LAST on stdout (and OUTDIR/summary.txt)."""
    v = verdict(facts, stages)
    lines = [f"== gpu_check {v} — {facts.get('gpu', '?')} — commit {facts.get('commit', '?')} — "
             f"{facts.get('elapsed_s', '?')} s of {facts.get('budget_s', 0):.0f} s — {facts.get('mode')} ==",
             f"{'stage':22s} {'status':10s} {'p/f/e/s':>16s} {'secs':>6s}  detail"]
    for r in stages:
        lines.append(f"{r['name']:22s} {r['status']:10s} {_counts(r):>16s} {r['secs'] or 0:6.0f}  "
                     f"{r['detail'][:90]}")
    problems = [r["name"] for r in stages if not r["ok"] and r["status"] != "NOT RUN"]
    not_run = [r["name"] for r in stages if r["status"] == "NOT RUN"]
    lines.append(f"problems: {', '.join(problems) or 'none'}"
                 + (f"; {len(not_run)} stage(s) not run" if not_run else ""))
    lines.append(f"report: {facts.get('outdir', 'OUTDIR')}/report.md (commit it as {suggested(facts)}.md, "
                 f"bench.csv as .csv)")
    return "\n".join(lines) + "\n"


def suggested(facts: dict) -> str:
    gpu = (facts.get("gpu") or "gpu").lower()
    m = re.search(r"gh200|h200|h100|a100|l40s|b200", gpu)
    slug = m.group(0) if m else re.sub(r"[^a-z0-9]+", "-", gpu).strip("-")
    commit = (facts.get("commit") or "unknown").split()[0]
    return f"benchmarks/results/{facts.get('date', 'DATE')}-{slug}-{commit}"


def markdown(facts: dict, stages: list, final: bool) -> str:
    v = verdict(facts, stages)
    out = [f"# pydl GPU check — {facts.get('date')} — {facts.get('gpu')} — {facts.get('commit')}", "",
           f"**Result: {v}**" + ("" if final else " (run in progress: this report is rewritten after every stage)"),
           "", f"Mode: {facts.get('mode')}. Produced by `scripts/gpu_check.sh` in {facts.get('elapsed_s')} s "
           f"(budget {facts.get('budget_s', 0):.0f} s); stage list `{facts.get('stage_file')}`; source "
           f"digest `{facts.get('source_digest')}` (`python scripts/gpu_check/driver.py --digest`).",
           f"Commit this file as `{suggested(facts)}.md` and bench.csv as `{suggested(facts)}.csv`.", ""]
    if facts.get("interrupted"):
        out += [f"**The run was interrupted ({facts['interrupted']}); later stages did not run.**", ""]
    envr = next((r for r in stages if r["name"] == "env"), None)
    if envr and not envr["ok"] and facts.get("mode") == "gpu":
        out += ["## ABORTED: torch cannot use the expected GPU", "", f"> {envr['detail']}", "",
                "Nothing else ran: on this machine every result would have been a CPU / interpreter "
                "result. See Environment below.", ""]
    out += ["## Stages", "",
            "Tests: passed/failed/errors/skipped (+ cut: not started before the stage's budget ran out).",
            "", "| stage | status | tests | seconds | limit | detail |", "|---|---|---|---|---|---|"]
    for r in stages:
        out.append(f"| {r['name']} | {r['status']}{' (optional)' if r['optional'] else ''} | {_counts(r)} | "
                   f"{r['secs'] if r['secs'] is not None else ''} | {r['limit'] or ''} | {_cell(r['detail'])} |")
    out.append("")
    bad = [r for r in stages if r["failures"] or (not r["ok"] and r["status"] != "NOT RUN")]
    if bad:
        out += ["## Failures", ""]
        for r in bad:
            out.append(f"### {r['name']}: {r['status']}" + (f" (log: logs/{r['log']})" if r.get("log") else ""))
            out.append("")
            if not r["failures"]:
                out.append(f"- {r['detail']}")
            for tid, text in r["failures"][:25]:
                out += [f"- `{tid}`", "", "  ```", *("  " + ln for ln in (text or "").splitlines()[:8]), "  ```"]
            if len(r["failures"]) > 25:
                out.append(f"- … {len(r['failures']) - 25} more in the junit XML / log")
            out.append("")
    san = [r for r in stages if r["kind"] in ("check", "sanitizer")]
    if san:
        out += ["## Sanitizers and kernel coverage", ""]
        for r in san:
            out.append(f"- **{r['name']}**: {r['status']} — {r['detail']}")
            out += [f"  - {n}" for n in r["notes"]]
        out.append("")
    notes = [(r["name"], n) for r in stages if r not in san for n in r["notes"]]
    skips = [(r["name"], reason, n) for r in stages for reason, n in sorted(r["skips"].items(), key=lambda x: -x[1])]
    if notes or skips:
        out += ["## Notes and skips", ""]
        out += [f"- {name}: {n}" for name, n in notes]
        out += [f"- {name}: {n} skipped — {reason}" for name, reason, n in skips]
        out.append("")
    slow = [(r["name"], tid, s) for r in stages for tid, s in r["slowest"][:5] if s >= 0.5]
    if slow:
        out += ["## Slowest tests", "", "| stage | test | s |", "|---|---|---|"]
        out += [f"| {n} | `{_cell(t)}` | {s:.1f} |" for n, t, s in slow]
        out.append("")
    benches = [r for r in stages if r["kind"] == "bench" and (r.get("bench") or r.get("bench_md"))]
    if benches:
        out += ["## Benchmarks", ""]
        for r in benches:
            table = r.get("bench") or []
            if len(table) > 1:
                out += [f"### {r['name']} (p50 ms; from bench.csv)", "",
                        "| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
                out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in table[1:]]
                out.append("")
            md = r.get("bench_md") or ""
            if md and final:
                out += [f"<details><summary>{r['name']}: the harness report</summary>", "",
                        re.sub(r"(?m)^#{1,2} ", "#### ", re.sub(r"(?m)^!\[.*$", "", md)), "", "</details>", ""]
    info = facts.get("pydl_info")
    out += ["## Build", "", f"- arch: sm_{facts.get('arch', '?')}; log: logs/build.log", "", "```",
            _fmt_info(info), "```", "", "## Environment", ""]
    p = facts.get("probe") or {}
    if p:
        pk = p.get("packages", {})
        out.append(f"- python {p.get('python')} ({p.get('executable')}); torch {p.get('torch')} (CUDA "
                   f"{p.get('torch_cuda')}), cuda available {p.get('cuda_available')}, devices "
                   f"{p.get('device_count')}; triton {p.get('triton')}; TRITON_INTERPRET in the caller's "
                   f"environment: {p.get('TRITON_INTERPRET')!r}")
        out.append("- packages: " + ", ".join(f"{k} {v or 'missing'}" for k, v in pk.items()))
        for d in p.get("devices", []):
            out.append(f"- device: {d}")
    out += ["- full probe output: logs/env.txt", "",
            "Files: report.md, summary.txt, results.json, bench.csv, bench-plots.png (when plots were "
            "made), logs.tar.gz (every stage's log, junit XML and event log: `tar xzf logs.tar.gz`).", ""]
    return "\n".join(out)


def _fmt_info(info) -> str:
    if isinstance(info, dict):
        w = max((len(k) for k in info), default=0)
        return "\n".join(f"{k:<{w}}  {v}" for k, v in info.items())
    return str(info or "(no `python -m pydl info` output)")


def combine_pngs(paths: list, dest: str, python: str) -> None:
    """One PNG of the benchmark plots stacked (OUTDIR must stay a handful of files)."""
    code = ("import sys, matplotlib; matplotlib.use('Agg'); import matplotlib.image as m, numpy as np\n"
            "imgs=[m.imread(p)[..., :3] for p in sys.argv[2:]]; w=max(i.shape[1] for i in imgs)\n"
            "imgs=[np.pad(i, ((0,0),(0,w-i.shape[1]),(0,0)), constant_values=1.0) for i in imgs]\n"
            "m.imsave(sys.argv[1], np.concatenate(imgs, axis=0))\n")
    try:
        subprocess.run([python, "-c", code, dest, *paths], timeout=60, capture_output=True)
    except (OSError, subprocess.TimeoutExpired):
        pass
