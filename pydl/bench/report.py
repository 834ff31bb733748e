"""Results: derived metrics, the long-format CSV, the markdown report, plots, --compare.

Every row of the CSV is one (op, provider, mode, shape, dtype, device) point. ``value`` is the
suite's metric: achieved GB/s (1e9 bytes/s) from its minimal byte count and the median time,
TFLOP/s from its FLOP count, or µs per call (latency suites); ``pct_of_ceiling`` is that over
the copy bandwidth (or the matmul rate, same dtype) measured in the same run;
``speedup_vs_eager`` / ``speedup_vs_compile`` are baseline p50 / this p50 for the same
op/mode/shape/dtype/device; ``spread`` = (p80 - p20) / p50; ``flag`` says a cell stayed
implausible after re-measuring ("noisy", "above ceiling"). The machine's ceilings are rows too
(op = "ceiling"). Columns are only ever appended (see CSV_COLUMNS).
"""

from __future__ import annotations

import csv
import math
import os
from collections import Counter, OrderedDict, defaultdict
from typing import Iterable, Optional

from . import INSTALL_EXTRAS_HINT
from .core import COMPILE, EAGER, OK, UNITS, achieved, ceiling_for

CSV_COLUMNS = (
    "op", "provider", "mode", "shape", "dtype", "device",
    "p50_ms", "p20_ms", "p80_ms", "metric", "value", "unit", "pct_of_ceiling",
    "speedup_vs_eager", "speedup_vs_compile", "status", "version", "commit", "timestamp",
    "threads", "reps", "bytes", "note",
    # added in v2 (older CSVs lack them; readers treat them as blank)
    "suite", "dirty", "spread", "flag", "attempts", "repeats", "p50_repeat_min", "p50_repeat_max",
    "calls_per_sample", "flops",
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
    """Suite records + ceilings -> CSV rows (dicts with CSV_COLUMNS as keys, strings/numbers).

    Rows also carry ``_x`` / ``_xlabel`` / ``_series`` (plot axis, figure label) that the CSV
    does not hold.
    """
    common = {"version": meta.get("version", ""), "commit": meta.get("commit", ""),
              "dirty": meta.get("dirty", ""), "timestamp": meta.get("timestamp", ""),
              "threads": meta.get("threads", "")}
    device = meta.get("device", "")
    rows = []
    if ceilings is not None:
        rows.append(dict(common, op=CEILING_OP, provider="torch", mode="copy",
                         shape=f"{ceilings.copy_bytes}B", dtype="float32", device=device,
                         p50_ms=ceilings.copy_p50_ms, p20_ms="", p80_ms="", metric="bandwidth",
                         value=ceilings.copy_gbps, unit="GB/s", pct_of_ceiling=100.0,
                         speedup_vs_eager="", speedup_vs_compile="", status=OK, reps="",
                         bytes=ceilings.copy_bytes, note="read + write bytes"))
        if ceilings.has_read:
            rows.append(dict(common, op=CEILING_OP, provider="torch", mode="read",
                             shape=f"{ceilings.copy_bytes // 2}B", dtype="float32", device=device,
                             p50_ms=ceilings.read_p50_ms, p20_ms="", p80_ms="", metric="bandwidth",
                             value=ceilings.read_gbps, unit="GB/s",
                             pct_of_ceiling=100.0 * ceilings.read_gbps / ceilings.copy_gbps,
                             speedup_vs_eager="", speedup_vs_compile="", status=OK, reps="",
                             bytes=ceilings.copy_bytes // 2, note="bytes read (sum)"))
        rows.append(dict(common, op=CEILING_OP, provider="torch", mode="matmul",
                         shape=ceilings.matmul_desc.split()[-1], dtype=ceilings.matmul_desc.split()[0],
                         device=device, p50_ms=ceilings.matmul_p50_ms, p20_ms="", p80_ms="",
                         metric="throughput", value=ceilings.matmul_tflops, unit="TFLOP/s",
                         pct_of_ceiling=100.0, speedup_vs_eager="", speedup_vs_compile="",
                         status=OK, reps="", bytes="", note="random data"))

    recs = list(records)
    base = {}
    for r in recs:
        if r.provider in (EAGER, COMPILE) and r.measurement is not None and r.status == OK:
            base[(r.provider, r.op, r.mode, r.shape, r.dtype, r.device)] = r.measurement.p50_ms

    for r in recs:
        m = r.measurement
        metric = getattr(r, "metric", "bandwidth")
        row = dict(common, op=r.op, provider=r.provider, mode=r.mode, shape=r.shape,
                   dtype=r.dtype, device=r.device, status=r.status, note=r.note,
                   bytes="" if r.bytes_moved is None else r.bytes_moved,
                   flops="" if getattr(r, "flops", None) is None else r.flops,
                   metric=metric, unit=UNITS.get(metric, ""), suite=getattr(r, "suite", ""),
                   p50_ms="", p20_ms="", p80_ms="", value="", pct_of_ceiling="",
                   speedup_vs_eager="", speedup_vs_compile="", reps="", spread="",
                   flag=getattr(r, "flag", ""), attempts="", repeats="", p50_repeat_min="",
                   p50_repeat_max="", calls_per_sample="",
                   _x=getattr(r, "plot_x", None), _xlabel=getattr(r, "x_label", ""),
                   _series=getattr(r, "plot_series", ""))
        if m is not None and m.p50_ms > 0:
            work = r.bytes_moved if metric == "bandwidth" else getattr(r, "flops", None)
            value = achieved(metric, work, m.p50_ms)
            p50s = list(getattr(r, "repeat_p50_ms", []) or [])
            row.update(p50_ms=m.p50_ms, p20_ms=m.p20_ms, p80_ms=m.p80_ms, reps=m.reps,
                       threads=m.threads, spread=m.spread, calls_per_sample=m.calls_per_sample,
                       attempts=getattr(r, "attempts", "") or "", repeats=max(1, len(p50s)),
                       value="" if value is None else value)
            if p50s:
                row.update(p50_repeat_min=min(p50s), p50_repeat_max=max(p50s))
            ceil = ceiling_for(metric, r.dtype, ceilings)
            if ceil and value is not None:
                row["pct_of_ceiling"] = 100.0 * value / ceil
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


def _group_providers(shapes: dict) -> list:
    seen = OrderedDict()
    for per in shapes.values():
        for p in per:
            seen[p] = None
    return list(seen)


def fmt_us(us: float) -> str:
    """µs without exponents: 4.21, 37.5, 636, 19065."""
    return f"{us:.3g}" if us < 1000 else f"{us:.0f}"


def _time(ms: float, unit: str) -> str:
    return f"{fmt_us(ms * 1e3)} µs" if unit == "us" else f"{ms:.4g} ms"


def _flags(r: dict) -> list:
    return [f for f in str(r.get("flag") or "").split(";") if f]


# ---- helpers of the suites' target tables (``Suite.report``) -------------------------------------

def measured(r: Optional[dict]) -> bool:
    """Whether a finalized row holds a measured time."""
    return r is not None and r.get("status") == OK and r.get("p50_ms") not in ("", None)


def cell_time(r: Optional[dict], unit: str = "ms") -> str:
    """A row's median as "12.3 ms" / "456 µs", or "—" when it was not measured."""
    if not measured(r):
        return "—"
    ms = float(r["p50_ms"])
    return f"{1000 * ms:.0f} µs" if unit == "us" else f"{ms:.3g} ms"


def pct_of_ceiling(r: Optional[dict]) -> Optional[float]:
    return float(r["pct_of_ceiling"]) if measured(r) and r.get("pct_of_ceiling") not in ("", None) else None


def cell_pct(r: Optional[dict]) -> str:
    pct = pct_of_ceiling(r)
    return "—" if pct is None else f"{pct:.0f}%"


def speedup(r: Optional[dict], base: Optional[dict]) -> Optional[float]:
    """base time / r time, None unless both were measured."""
    return float(base["p50_ms"]) / float(r["p50_ms"]) if measured(r) and measured(base) else None


def verdict(ok: Optional[bool]) -> str:
    return "not measured" if ok is None else ("met" if ok else "**MISSED**")


def cells_by(rows: list, suite: str, keys: tuple, mode: Optional[str] = None) -> dict:
    """``suite``'s rows (of ``mode`` when given) grouped by the row fields ``keys``:
    {(row[k] for k in keys): {provider: row}} (the lookup the suites' target tables make)."""
    by: dict = {}
    for r in rows:
        if r.get("suite") == suite and (mode is None or r.get("mode") == mode):
            by.setdefault(tuple(r[k] for k in keys), {})[r["provider"]] = r
    return by


def target_row(cells: list, p: Optional[dict], base: Optional[dict], ok_fn, unit: str = "ms", note: str = "") -> str:
    """One target-table line: | *cells | pydl | baseline | speed-up | pydl % of ceiling | verdict |.
    ok_fn(speed-up, pydl row) -> bool decides the verdict when both rows were measured; ``note``
    follows the verdict, then the cells' flags."""
    speed = speedup(p, base)
    ok = None if speed is None else ok_fn(speed, p)
    cols = [*cells, cell_time(p, unit), cell_time(base, unit), f"{speed:.2f}×" if speed else "—", cell_pct(p),
            verdict(ok) + note + flag_note([r for r in (p, base) if r])]
    return "| " + " | ".join(cols) + " |"


def flag_note(rows) -> str:
    """" (⚠noisy: do not trust)" when any of ``rows`` is flagged, else "" (target tables)."""
    flagged = ", ".join(sorted({f for r in rows for f in _flags(r)}))
    return f" (⚠{flagged}: do not trust)" if flagged else ""


def _md_cell(r: Optional[dict]) -> str:
    if r is None:
        return ""
    ms = _num(r.get("p50_ms"))
    st = r.get("status", "")
    if ms is None:
        return st or ""
    unit = r.get("unit", "")
    parts = [_time(ms, unit)]
    lo, hi = _num(r.get("p50_repeat_min")), _num(r.get("p50_repeat_max"))
    if lo is not None and hi is not None:
        parts.append(f"[{_time(lo, unit).split()[0]}–{_time(hi, unit)}]")
    sp = []
    if r["provider"] != EAGER and _num(r.get("speedup_vs_eager")) is not None:
        sp.append(f"{_num(r['speedup_vs_eager']):.2f}× e")
    if r["provider"] not in (EAGER, COMPILE) and _num(r.get("speedup_vs_compile")) is not None:
        sp.append(f"{_num(r['speedup_vs_compile']):.2f}× c")
    if sp:
        parts.append("(" + ", ".join(sp) + ")")
    parts += [f"⚠{f}" for f in _flags(r)]
    cell = " ".join(parts)
    return f"**{st.upper()}** {cell}" if st != OK else cell


def _best_cell(per: dict) -> str:
    """The last column: best pydl GB/s or TFLOP/s (% of ceiling); for latency, pydl ÷ eager time."""
    ok = [r for p, r in per.items() if p.startswith("pydl") and r.get("status") == OK
          and _num(r.get("value")) is not None]
    if not ok:
        return ""
    if ok[0].get("unit") == "us":
        best = min(ok, key=lambda r: _num(r["p50_ms"]))
        sp = _num(best.get("speedup_vs_eager"))
        return "" if not sp else f"{1 / sp:.3g} {best['provider']}"
    best = max(ok, key=lambda r: _num(r["value"]))
    pct, v = _num(best.get("pct_of_ceiling")), _num(best["value"])
    return (f"{v:.0f}" if v >= 100 else f"{v:.3g}") + (f" ({pct:.0f}%)" if pct is not None else "") \
        + f" {best['provider'].replace('pydl-', '')}"


def _best_header(unit: str) -> str:
    return {"GB/s": "best pydl GB/s (% copy)", "TFLOP/s": "best pydl TFLOP/s (% matmul)",
            "us": "pydl ÷ torch-eager (time)"}.get(unit, "best pydl")


def flag_counts(rows: list) -> Counter:
    """{"noisy": n, "above ceiling": m} over the measured (non-ceiling) rows."""
    return Counter(f for r in rows if r["op"] != CEILING_OP for f in _flags(r))


def markdown(rows: list, meta: dict, compare_result: Optional[dict] = None,
             plots: Optional[list] = None, plot_note: str = "", extra: Optional[list] = None) -> str:
    out = ["# pydl benchmark report", ""]
    out.append(f"- device: {meta.get('device', '')} — {meta.get('device_name', '')}")
    for k in ("timestamp", "version", "commit", "torch", "triton", "native", "threads", "host allocator",
              "measurement", "command"):
        v = meta.get(k)
        if k == "commit" and v and meta.get("dirty") == "true":
            v = f"{v} (uncommitted changes present)"
        if v not in (None, ""):
            out.append(f"- {k}: {_md_escape(v)}")
    ceil = [r for r in rows if r["op"] == CEILING_OP]
    if ceil:
        out.append("- ceilings (measured in this run): " + "; ".join(
            f"{r['mode']} {_num(r['value']):.4g} {r['unit']} ({r['dtype']} {r['shape']})" for r in ceil))
    flags = flag_counts(rows)
    if flags:
        out.append("- flagged cells (still implausible after re-measuring): "
                   + ", ".join(f"{n} {f}" for f, n in flags.items()))
    out += ["",
            "Cells: median time per call; `(k× e, k× c)` = speed-up vs torch eager and vs "
            "torch.compile (baseline time / this time); `[lo–hi]` = the range of the medians of "
            "`--repeat` runs. GB/s counts the op's minimal traffic (each input read once, each "
            "output written once); % is of the copy bandwidth above. A status other than ok is "
            "shown in bold; ⚠noisy = spread (p80 − p20) / p50 above the limit, ⚠above ceiling = "
            "faster than the machine's measured ceiling allows (bandwidth: the higher of the copy "
            "and read rates; e.g. a cache-resident working set), "
            "both after re-measuring. `spread` is the widest spread of the row's providers.", ""]

    for (op, mode, dtype, device), shapes in _groups(rows).items():
        providers = _group_providers(shapes)
        unit = next((r.get("unit", "") for per in shapes.values() for r in per.values()), "")
        out.append(f"## {op} — {mode} — {dtype} — {device}")
        out.append("")
        hdr = ["shape"] + providers + [_best_header(unit), "spread"]
        out.append("| " + " | ".join(hdr) + " |")
        out.append("|" + "---|" * len(hdr))
        for shape in sorted(shapes, key=_shape_key):
            per = shapes[shape]
            spreads = [_num(r.get("spread")) for r in per.values() if _num(r.get("spread")) is not None]
            cells = [shape] + [_md_escape(_md_cell(per.get(p))) for p in providers] + [
                _best_cell(per), f"{max(spreads):.0%}" if spreads else ""]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")

    if extra:
        out += list(extra) + [""]

    flagged = [r for r in rows if r["op"] != CEILING_OP and _flags(r)]
    if flagged:
        out += ["## Flagged cells", ""]
        for r in flagged:
            pct = _num(r.get("pct_of_ceiling"))
            out.append(f"- {r['op']} {r['mode']} {r['shape']} {r['dtype']} {r['device']} {r['provider']}: "
                       f"{' and '.join(_flags(r))}; spread {_num(r.get('spread')) or 0:.0%}"
                       + (f", {pct:.0f}% of the ceiling" if pct is not None else "")
                       + f"; {r.get('attempts') or 1} measurement(s)")
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

def _save_figure(plt, fig, outdir: str, name: str) -> str:
    """Lay out, write (90 dpi) and close one figure; returns its path."""
    fig.tight_layout()
    path = os.path.join(outdir, name)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plots(rows: list, outdir: str) -> tuple:
    """PNG plots; returns (files, note) and, with no matplotlib, ([], the install hint).

    Bandwidth / throughput rows: one PNG per (op, dtype, device) (and plot series, e.g. "D=64",
    when the suite names one), value vs the suite's plot x (N for LayerNorm), a panel per mode,
    the copy (or same-dtype matmul) ceiling dashed. Latency rows: one PNG per (suite, dtype,
    device), a bar per provider and cell, µs on a log axis.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # optional dependency
        return [], f"plots skipped: {INSTALL_EXTRAS_HINT} (matplotlib is not importable: {type(exc).__name__})"
    copy = {r["device"]: _num(r["value"]) for r in rows if r["op"] == CEILING_OP and r["mode"] == "copy"}
    matmul = {(r["device"], r["dtype"]): _num(r["value"]) for r in rows
              if r["op"] == CEILING_OP and r["mode"] == "matmul"}
    lines = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))  # (op,series,dtype,dev)->mode->prov->[(x,v)]
    bars = defaultdict(lambda: defaultdict(dict))                        # (suite,dtype,dev)->cell->prov->µs
    units, xlabels = {}, {}
    for r in rows:
        v = _num(r.get("value"))
        if r["op"] == CEILING_OP or v is None:
            continue
        if r.get("unit") == "us":
            bars[(r.get("suite") or "latency", r["dtype"], r["device"])][f"{r['op']} {r['mode']} {r['shape']}"][r["provider"]] = v
            continue
        x = r.get("_x")
        x = _num(x) if x is not None else _shape_key(r["shape"])[-1]
        if x is None or x == math.inf:
            continue
        key = (r["op"], r.get("_series") or "", r["dtype"], r["device"])
        lines[key][r["mode"]][r["provider"]].append((x, v))
        units[key], xlabels[key] = r.get("unit") or "GB/s", r.get("_xlabel") or "N (normalized size)"
    files = []
    for (op, series, dtype, dev), modes in lines.items():
        key, label = (op, series, dtype, dev), f"{op} {series}" if series else op
        unit = units[key]
        fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
        for ax, (mode, provs) in zip(axes[0], modes.items()):
            for prov, pts in provs.items():
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
            if unit == "GB/s" and copy.get(dev):
                ax.axhline(copy[dev], color="gray", linestyle="--", label="copy ceiling")
            if unit == "TFLOP/s" and matmul.get((dev, dtype)):
                ax.axhline(matmul[(dev, dtype)], color="gray", linestyle="--", label="matmul ceiling")
            ax.set_xscale("log", base=2)
            xs = sorted({p[0] for pts in provs.values() for p in pts})
            ax.set_xticks(xs)
            ax.set_xticklabels([f"{x:g}" for x in xs], rotation=45, fontsize=7)
            ax.minorticks_off()
            ax.set_xlabel(xlabels[key])
            ax.set_ylabel(unit)
            ax.set_title(f"{label} {mode} ({dtype}, {dev})")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        tag = op + ("_" + "".join(c if c.isalnum() else "" for c in series) if series else "")
        files.append(_save_figure(plt, fig, outdir, f"plot_{tag}_{dtype}_{dev}.png"))
    for (suite, dtype, dev), cells in bars.items():
        provs = list(OrderedDict.fromkeys(p for per in cells.values() for p in per))
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cells) * max(1, len(provs)) / 2), 4.5))
        width = 0.8 / max(1, len(provs))
        for i, prov in enumerate(provs):
            xs = [j + i * width for j, c in enumerate(cells) if prov in cells[c]]
            ax.bar(xs, [cells[c][prov] for c in cells if prov in cells[c]], width, label=prov)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cells))])
        ax.set_xticklabels(list(cells), rotation=30, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("µs per call")
        ax.set_title(f"{suite} ({dtype}, {dev})")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
        files.append(_save_figure(plt, fig, outdir, f"plot_{suite}_{dtype}_{dev}.png"))
    return files, ""


# ------------------------------------------------------------------------------ summary

def summary_table(rows: list) -> str:
    """Concise text table: one line per op/mode/dtype/shape, p50 per provider (ms; µs for latency
    suites, one table per suite), the best pydl speed-ups, and a flag marker."""
    suites = list(OrderedDict.fromkeys(r.get("suite", "") for r in rows if r["op"] != CEILING_OP))
    if len(suites) > 1:
        parts = []
        for s in suites:
            sub = [r for r in rows if r.get("suite", "") == s]
            unit = "µs per call" if any(r.get("unit") == "us" for r in sub) else "ms"
            parts.append(f"[{s}] p50 {unit}\n" + summary_table(sub))
        return "\n\n".join(parts)
    providers = _providers(rows)
    latency = any(r.get("unit") == "us" for r in rows if r["op"] != CEILING_OP)
    hdr = ["op", "mode", "dtype", "shape"] + providers + ["best pydl ×eager", "×compile", "flag"]
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
                    cells.append((fmt_us(ms * 1e3) if latency else f"{ms:.4g}") + ("" if st == OK else f"!{st}"))
            best = [r for p, r in per.items() if p.startswith("pydl") and r.get("status") == OK
                    and _num(r.get("p50_ms")) is not None]
            if best:
                b = min(best, key=lambda r: _num(r["p50_ms"]))
                cells.append(_fmt(_num(b.get("speedup_vs_eager")), 3))
                cells.append(_fmt(_num(b.get("speedup_vs_compile")), 3))
            else:
                cells += ["-", "-"]
            fl = sorted({f for r in per.values() for f in _flags(r)})
            cells.append(",".join("above-ceiling" if f == "above ceiling" else f for f in fl))
            body.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(hdr, *body)] if body else [len(h) for h in hdr]
    line = lambda cs: "  ".join(str(c).ljust(w) for c, w in zip(cs, widths)).rstrip()
    return "\n".join([line(hdr), line(["-" * w for w in widths])] + [line(b) for b in body])
