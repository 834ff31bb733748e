"""Results: derived metrics, the long-format CSV, the markdown report, plots, --compare.

Every row of the CSV is one (op, provider, mode, shape, dtype, device) point. ``value`` is the
achieved bandwidth in GB/s (1e9 bytes/s) computed from the suite's minimal byte count and the
median time; ``pct_of_ceiling`` is that over the copy bandwidth measured in the same run;
``speedup_vs_eager`` / ``speedup_vs_compile`` are baseline p50 / this p50 for the same
op/mode/shape/dtype/device. The machine's ceilings are rows too (op = "ceiling").
"""

from __future__ import annotations

import csv
import math
import os
from collections import OrderedDict, defaultdict
from typing import Iterable, Optional

from .suites import COMPILE, EAGER, OK

CSV_COLUMNS = (
    "op", "provider", "mode", "shape", "dtype", "device",
    "p50_ms", "p20_ms", "p80_ms", "metric", "value", "unit", "pct_of_ceiling",
    "speedup_vs_eager", "speedup_vs_compile", "status", "version", "commit", "timestamp",
    "threads", "reps", "bytes", "note",
)
KEY = ("op", "provider", "mode", "shape", "dtype", "device")
CEILING_OP = "ceiling"
REGRESSION_THRESHOLD = 0.10


def _num(v) -> Optional[float]:
    """A float from a CSV cell or a number; None for blanks / NaN."""
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _fmt(v: Optional[float], digits: int = 4) -> str:
    return "" if v is None else f"{v:.{digits}g}"


# --------------------------------------------------------------------------------- rows

def finalize(records: Iterable, ceilings, meta: dict) -> list:
    """Suite records + ceilings -> CSV rows (dicts with CSV_COLUMNS as keys, strings/numbers)."""
    common = {"version": meta.get("version", ""), "commit": meta.get("commit", ""),
              "timestamp": meta.get("timestamp", ""), "threads": meta.get("threads", "")}
    device = meta.get("device", "")
    rows = []
    if ceilings is not None:
        rows.append(dict(common, op=CEILING_OP, provider="torch", mode="copy",
                         shape=f"{ceilings.copy_bytes}B", dtype="float32", device=device,
                         p50_ms=ceilings.copy_p50_ms, p20_ms="", p80_ms="", metric="bandwidth",
                         value=ceilings.copy_gbps, unit="GB/s", pct_of_ceiling=100.0,
                         speedup_vs_eager="", speedup_vs_compile="", status=OK, reps="",
                         bytes=ceilings.copy_bytes, note="read + write bytes"))
        rows.append(dict(common, op=CEILING_OP, provider="torch", mode="matmul",
                         shape=ceilings.matmul_desc.split()[-1], dtype=ceilings.matmul_desc.split()[0],
                         device=device, p50_ms=ceilings.matmul_p50_ms, p20_ms="", p80_ms="",
                         metric="throughput", value=ceilings.matmul_tflops, unit="TFLOP/s",
                         pct_of_ceiling=100.0, speedup_vs_eager="", speedup_vs_compile="",
                         status=OK, reps="", bytes="", note="random data"))
    copy_gbps = ceilings.copy_gbps if ceilings is not None else None

    recs = list(records)
    base = {}
    for r in recs:
        if r.provider in (EAGER, COMPILE) and r.measurement is not None and r.status == OK:
            base[(r.provider, r.op, r.mode, r.shape, r.dtype, r.device)] = r.measurement.p50_ms

    for r in recs:
        m = r.measurement
        row = dict(common, op=r.op, provider=r.provider, mode=r.mode, shape=r.shape,
                   dtype=r.dtype, device=r.device, status=r.status, note=r.note,
                   bytes=r.bytes_moved, metric="bandwidth", unit="GB/s",
                   p50_ms="", p20_ms="", p80_ms="", value="", pct_of_ceiling="",
                   speedup_vs_eager="", speedup_vs_compile="", reps="")
        if m is not None and m.p50_ms > 0:
            gbps = r.bytes_moved / (m.p50_ms * 1e-3) / 1e9
            row.update(p50_ms=m.p50_ms, p20_ms=m.p20_ms, p80_ms=m.p80_ms, value=gbps,
                       reps=m.reps, threads=m.threads)
            if copy_gbps:
                row["pct_of_ceiling"] = 100.0 * gbps / copy_gbps
            for col, prov in (("speedup_vs_eager", EAGER), ("speedup_vs_compile", COMPILE)):
                b = base.get((prov, r.op, r.mode, r.shape, r.dtype, r.device))
                if b is not None:
                    row[col] = b / m.p50_ms
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------- CSV

def _cell(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return "" if v is None else str(v)


def write_csv(rows: list, path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(r.get(k, "")) for k in CSV_COLUMNS})


def read_csv(path: str) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------ compare

def compare(old_rows: list, new_rows: list, threshold: float = REGRESSION_THRESHOLD) -> dict:
    """Join on KEY; flag rows whose p50 grew by more than ``threshold`` (and status changes).

    Returns {"regressions": [...], "improvements": [...], "status_changes": [...],
    "matched": int}; each entry has the key fields, old_ms, new_ms and ratio (new / old).
    Ceiling rows are not compared (they describe the machine, not the code).
    """
    old = {tuple(r.get(k, "") for k in KEY): r for r in old_rows if r.get("op") != CEILING_OP}
    out = {"regressions": [], "improvements": [], "status_changes": [], "matched": 0}
    for r in new_rows:
        if r.get("op") == CEILING_OP:
            continue
        key = tuple(str(r.get(k, "")) for k in KEY)
        o = old.get(key)
        if o is None:
            continue
        out["matched"] += 1
        entry = dict(zip(KEY, key))
        if o.get("status") != r.get("status"):
            out["status_changes"].append(dict(entry, old_status=o.get("status"),
                                              new_status=r.get("status")))
        old_ms, new_ms = _num(o.get("p50_ms")), _num(r.get("p50_ms"))
        if old_ms is None or new_ms is None or old_ms <= 0:
            continue
        ratio = new_ms / old_ms
        entry.update(old_ms=old_ms, new_ms=new_ms, ratio=ratio)
        if ratio > 1.0 + threshold:
            out["regressions"].append(entry)
        elif ratio < 1.0 / (1.0 + threshold):
            out["improvements"].append(entry)
    out["regressions"].sort(key=lambda e: -e["ratio"])
    out["improvements"].sort(key=lambda e: e["ratio"])
    return out


def compare_lines(result: dict, threshold: float = REGRESSION_THRESHOLD) -> list:
    """Plain-text lines for stdout."""
    lines = [f"compare: {result['matched']} rows matched; "
             f"{len(result['regressions'])} regression(s) > {threshold:.0%}, "
             f"{len(result['improvements'])} improvement(s), "
             f"{len(result['status_changes'])} status change(s)"]
    for e in result["regressions"]:
        lines.append(f"REGRESSION {e['op']} {e['provider']} {e['mode']} {e['shape']} {e['dtype']} "
                     f"{e['device']}: {e['old_ms']:.4g} -> {e['new_ms']:.4g} ms "
                     f"(+{(e['ratio'] - 1) * 100:.1f}%)")
    for e in result["status_changes"]:
        lines.append(f"STATUS {e['op']} {e['provider']} {e['mode']} {e['shape']} {e['dtype']} "
                     f"{e['device']}: {e['old_status']} -> {e['new_status']}")
    return lines


# ----------------------------------------------------------------------------- markdown

def _md_escape(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _shape_key(shape: str):
    try:
        return tuple(int(p) for p in shape.split("x"))
    except ValueError:
        return (math.inf,)


def _groups(rows: list):
    """OrderedDict (op, mode, dtype, device) -> {shape: {provider: row}} for non-ceiling rows."""
    g = OrderedDict()
    for r in rows:
        if r["op"] == CEILING_OP:
            continue
        g.setdefault((r["op"], r["mode"], r["dtype"], r["device"]), OrderedDict()) \
         .setdefault(r["shape"], OrderedDict())[r["provider"]] = r
    return g


def _providers(rows: list) -> list:
    seen = OrderedDict()
    for r in rows:
        if r["op"] != CEILING_OP:
            seen[r["provider"]] = None
    return list(seen)


def _md_cell(r: Optional[dict]) -> str:
    if r is None:
        return ""
    ms = _num(r.get("p50_ms"))
    st = r.get("status", "")
    if ms is None:
        return st or ""
    parts = [f"{ms:.4g} ms"]
    sp = []
    if r["provider"] != EAGER and _num(r.get("speedup_vs_eager")) is not None:
        sp.append(f"{_num(r['speedup_vs_eager']):.2f}× e")
    if r["provider"] not in (EAGER, COMPILE) and _num(r.get("speedup_vs_compile")) is not None:
        sp.append(f"{_num(r['speedup_vs_compile']):.2f}× c")
    if sp:
        parts.append("(" + ", ".join(sp) + ")")
    cell = " ".join(parts)
    return f"**{st.upper()}** {cell}" if st != OK else cell


def markdown(rows: list, meta: dict, compare_result: Optional[dict] = None,
             plots: Optional[list] = None, plot_note: str = "") -> str:
    out = ["# pydl benchmark report", ""]
    out.append(f"- device: {meta.get('device', '')} — {meta.get('device_name', '')}")
    for k in ("timestamp", "version", "commit", "torch", "triton", "native", "threads", "command"):
        if meta.get(k) not in (None, ""):
            out.append(f"- {k}: {_md_escape(meta[k])}")
    ceil = [r for r in rows if r["op"] == CEILING_OP]
    if ceil:
        out.append("- ceilings (measured in this run): " + "; ".join(
            f"{r['mode']} {_num(r['value']):.4g} {r['unit']} ({r['dtype']} {r['shape']})" for r in ceil))
    out += ["",
            "Cells: median ms over the reps; `(k× e, k× c)` = speed-up vs torch eager and vs "
            "torch.compile (baseline ms / this ms). GB/s counts the op's minimal traffic (each "
            "input read once, each output written once); % is of the copy bandwidth above. "
            "A status other than ok is shown in bold.", ""]

    providers = _providers(rows)
    for (op, mode, dtype, device), shapes in _groups(rows).items():
        out.append(f"## {op} — {mode} — {dtype} — {device}")
        out.append("")
        hdr = ["shape"] + providers + ["best pydl GB/s (% copy)"]
        out.append("| " + " | ".join(hdr) + " |")
        out.append("|" + "---|" * len(hdr))
        for shape in sorted(shapes, key=_shape_key):
            per = shapes[shape]
            best = None
            for p, r in per.items():
                if p.startswith("pydl") and r.get("status") == OK and _num(r.get("value")) is not None:
                    if best is None or _num(r["value"]) > _num(best["value"]):
                        best = r
            bcell = ""
            if best is not None:
                pct = _num(best.get("pct_of_ceiling"))
                v = _num(best["value"])
                bcell = (f"{v:.0f}" if v >= 100 else f"{v:.3g}") + (f" ({pct:.0f}%)" if pct is not None else "") \
                    + f" {best['provider'].replace('pydl-', '')}"
            cells = [shape] + [_md_escape(_md_cell(per.get(p))) for p in providers] + [bcell]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")

    notes = OrderedDict()
    for r in rows:
        if r["op"] != CEILING_OP and r.get("status") != OK and r.get("note"):
            k = (r["provider"], r["status"], r["note"])
            notes[k] = notes.get(k, 0) + 1
    if notes:
        out += ["## Not ok", ""]
        for (p, st, note), n in notes.items():
            out.append(f"- {p} {st} ×{n}: {_md_escape(note)}")
        out.append("")

    if compare_result is not None:
        out += ["## Compared with " + _md_escape(meta.get("compare", "previous run")), ""]
        out += [f"- {line}" for line in compare_lines(compare_result)]
        out.append("")

    if plots:
        out += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots] + [""]
    elif plot_note:
        out += [f"_Plots: {plot_note}_", ""]
    return "\n".join(out)


# -------------------------------------------------------------------------------- plots

def plots(rows: list, outdir: str) -> tuple:
    """One PNG per (op, dtype, device): GB/s vs N per provider, a panel per mode.

    Returns (files, note); with no matplotlib, ([], reason).
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # optional dependency
        return [], f"skipped, matplotlib unavailable ({type(exc).__name__})"
    copy = {r["device"]: _num(r["value"]) for r in rows if r["op"] == CEILING_OP and r["mode"] == "copy"}
    by = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))  # (op,dtype,dev)->mode->prov->[(N,GB/s)]
    for r in rows:
        v = _num(r.get("value"))
        if r["op"] == CEILING_OP or v is None:
            continue
        n = _shape_key(r["shape"])[-1]
        by[(r["op"], r["dtype"], r["device"])][r["mode"]][r["provider"]].append((n, v))
    files = []
    for (op, dtype, dev), modes in by.items():
        fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
        for ax, (mode, provs) in zip(axes[0], modes.items()):
            for prov, pts in provs.items():
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
            if copy.get(dev):
                ax.axhline(copy[dev], color="gray", linestyle="--", label="copy ceiling")
            ax.set_xscale("log", base=2)
            ns = sorted({p[0] for pts in provs.values() for p in pts})
            ax.set_xticks(ns)
            ax.set_xticklabels([str(n) for n in ns], rotation=45, fontsize=7)
            ax.minorticks_off()
            ax.set_xlabel("N (normalized size)")
            ax.set_ylabel("GB/s")
            ax.set_title(f"{op} {mode} ({dtype}, {dev})")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(outdir, f"plot_{op}_{dtype}_{dev}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        files.append(path)
    return files, ""


# ------------------------------------------------------------------------------ summary

def summary_table(rows: list) -> str:
    """Concise text table: one line per op/mode/dtype/shape, p50 ms per provider, pydl speed-ups."""
    providers = _providers(rows)
    hdr = ["op", "mode", "dtype", "shape"] + providers + ["best pydl ×eager", "×compile"]
    body = []
    for (op, mode, dtype, _dev), shapes in _groups(rows).items():
        for shape in sorted(shapes, key=_shape_key):
            per = shapes[shape]
            cells = [op, mode, dtype, shape]
            for p in providers:
                r = per.get(p)
                ms = _num(r.get("p50_ms")) if r else None
                st = r.get("status") if r else ""
                if ms is None:
                    cells.append(st or "-")
                else:
                    cells.append(f"{ms:.4g}" + ("" if st == OK else f"!{st}"))
            best = [r for p, r in per.items() if p.startswith("pydl") and r.get("status") == OK
                    and _num(r.get("p50_ms")) is not None]
            if best:
                b = min(best, key=lambda r: _num(r["p50_ms"]))
                cells.append(_fmt(_num(b.get("speedup_vs_eager")), 3))
                cells.append(_fmt(_num(b.get("speedup_vs_compile")), 3))
            else:
                cells += ["-", "-"]
            body.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(hdr, *body)] if body else [len(h) for h in hdr]
    line = lambda cs: "  ".join(str(c).ljust(w) for c, w in zip(cs, widths)).rstrip()
    return "\n".join([line(hdr), line(["-" * w for w in widths])] + [line(b) for b in body])
