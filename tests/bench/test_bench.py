"""Fast CPU tests of the benchmark harness (pydl.bench): timing, rows, CSV / markdown,
--compare, the correctness gate, and one end-to-end smoke run of the CLI.
The core (suite spec, interleaving, re-measuring, --repeat, commit, progress, overhead suite) is
tested in test_core.py."""

from __future__ import annotations

import csv
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pydl.bench import INSTALL_EXTRAS_HINT, core, gate, report, timing
from pydl.bench import ceilings as ceil_mod
from pydl.bench.__main__ import main as bench_main
from pydl.bench.__main__ import parse_shapes
from pydl.bench.suites import COMPILE, EAGER, ERROR, MISMATCH, OK, SKIPPED, Record, SuiteConfig
from pydl.bench.suites import layer_norm as ln_suite

ROOT = Path(__file__).resolve().parents[2]
TINY = timing.TimingPolicy(budget_s=0.005, min_reps=3, max_reps=10, warmup_s=0.0, min_warmup=1,
                           flush_l2=False)


# ------------------------------------------------------------------------------- timing

def test_quantile_matches_linear_interpolation():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert timing.quantile(xs, 0.5) == 3.0
    assert timing.quantile(xs, 0.0) == 1.0
    assert timing.quantile(xs, 1.0) == 5.0
    assert timing.quantile(xs, 0.2) == pytest.approx(1.8)   # pos 0.8 between 1 and 2
    assert timing.quantile(xs, 0.8) == pytest.approx(4.2)
    assert timing.quantile([7.0], 0.2) == 7.0
    with pytest.raises(ValueError):
        timing.quantile([], 0.5)
    with pytest.raises(ValueError):
        timing.quantile([1.0], 1.5)


def test_summarize_and_spread():
    m = timing.summarize([1.0, 2.0, 3.0, 4.0, 100.0], threads=3)
    assert (m.p50_ms, m.reps, m.threads) == (3.0, 5, 3)
    assert m.p20_ms <= m.p50_ms <= m.p80_ms
    assert m.spread == pytest.approx((m.p80_ms - m.p20_ms) / 3.0)


def test_reps_for_budget_is_time_boxed():
    p = timing.TimingPolicy(budget_s=1.0, min_reps=50, max_reps=2000)
    assert timing.reps_for_budget(1e-3, p) == 1000
    assert timing.reps_for_budget(1.0, p) == 50           # slow op: the floor
    assert timing.reps_for_budget(1e-9, p) == 2000        # fast op: the cap
    assert timing.reps_for_budget(0.0, p) == 2000


def test_time_fn_cpu_measures_wall_clock():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002)

    policy = timing.TimingPolicy(budget_s=0.02, min_reps=5, max_reps=8, warmup_s=0.0, min_warmup=2,
                                 flush_l2=False)
    m = timing.time_fn(fn, "cpu", policy)
    assert 5 <= m.reps <= 8
    assert len(calls) == m.reps + 2                      # warm-up calls are not samples
    assert 1.9 <= m.p20_ms <= m.p50_ms <= m.p80_ms < 1000
    assert m.threads == torch.get_num_threads()
    assert len(m.samples_ms) == m.reps


def test_time_fn_rejects_other_devices():
    with pytest.raises(ValueError, match="cpu or cuda"):
        timing.time_fn(lambda: None, "meta", TINY)


def test_default_policies():
    cpu = timing.default_policy("cpu", quick=False)
    assert cpu.budget_s <= 1.0 and not cpu.flush_l2
    assert timing.default_policy("cpu", quick=True).budget_s <= 0.3
    cuda = timing.default_policy("cuda", quick=False)
    assert cuda.min_reps >= 50 and cuda.flush_l2 and cuda.budget_s <= 1.0
    assert timing.default_policy("cuda", quick=True).budget_s <= 0.3


def test_cpu_ceilings_small():
    c = ceil_mod.measure("cpu", quick=True, small=True)
    assert c.copy_gbps > 0 and c.matmul_tflops > 0 and c.read_gbps > 0
    assert c.copy_bytes == 2 * (4 << 20)                 # read + write of a 4 MB buffer
    assert c.bandwidth_limit_gbps == max(c.copy_gbps, c.read_gbps)
    assert c.matmul_desc == "float32 128x128x128"


# ------------------------------------------------------------------------ suite pieces

def test_byte_formulas():
    M, N, e, s = 3, 5, 2, 4
    assert ln_suite.bytes_moved("layer_norm", "fwd", M, N, e) == 2 * M * N * e + 2 * N * e
    assert ln_suite.bytes_moved("add_layer_norm", "fwd", M, N, e) == 4 * M * N * e + 2 * N * e
    assert ln_suite.bytes_moved("layer_norm", "bwd", M, N, e) == 3 * M * N * e + 2 * M * s + 3 * N * e
    assert ln_suite.bytes_moved("layer_norm_gelu", "bwd", M, N, e) == 3 * M * N * e + 2 * M * s + 4 * N * e
    assert ln_suite.bytes_moved("add_layer_norm", "bwd", M, N, e) == 4 * M * N * e + 2 * M * s + 3 * N * e
    assert ln_suite.bytes_moved("rms_norm", "fwd", M, N, e) == 2 * M * N * e + N * e
    assert ln_suite.bytes_moved("add_rms_norm", "fwd", M, N, e) == 4 * M * N * e + N * e
    assert ln_suite.bytes_moved("rms_norm", "bwd", M, N, e) == 3 * M * N * e + 2 * M * s + 2 * N * e
    assert ln_suite.bytes_moved("add_rms_norm", "bwd", M, N, e) == 4 * M * N * e + 2 * M * s + 2 * N * e
    for op in ln_suite.OPS:
        fb = ln_suite.bytes_moved(op, "fwd+bwd", M, N, e)
        assert fb == (ln_suite.bytes_moved(op, "fwd", M, N, e) + ln_suite.bytes_moved(op, "bwd", M, N, e)
                      + 2 * M * s)
    with pytest.raises(ValueError):
        ln_suite.bytes_moved("softmax", "fwd", M, N, e)
    with pytest.raises(ValueError):
        ln_suite.bytes_moved("layer_norm", "sideways", M, N, e)


def test_default_shapes():
    cuda = ln_suite.default_shapes(torch.device("cuda"), quick=False)
    assert [n for _, n in cuda] == list(ln_suite.N_ALL) and {m for m, _ in cuda} == {16384}
    assert [n for _, n in ln_suite.default_shapes(torch.device("cuda"), quick=True)] == [768, 1024, 4096, 16384]
    cpu = ln_suite.default_shapes(torch.device("cpu"), quick=True)
    assert cpu == [(8192, 768), (8192, 1024)]
    assert {m for m, _ in ln_suite.default_shapes(torch.device("cpu"), quick=False)} == {8192}


def test_compare_tolerances():
    x = torch.randn(16, 64)
    assert gate.compare("y", x.clone(), x, torch.float32) is None
    bad = x.clone()
    bad[:, -3:] += 1.0                                   # a wrong tail: few elements, caught
    assert "elements off" in gate.compare("y", bad, x, torch.float32)
    assert "non-finite" in gate.compare("y", torch.full_like(x, float("nan")), x, torch.float32)
    assert "shape" in gate.compare("y", x[:, :8], x, torch.float32)
    assert "dtype" in gate.compare("y", x.double(), x, torch.float32)
    xb = x.bfloat16()
    one_ulp = (xb.float() * (1 + 2 ** -8)).bfloat16()
    assert gate.compare("y", one_ulp, xb, torch.bfloat16) is None
    idx = torch.arange(5)
    assert gate.compare("i", idx.clone(), idx, torch.int64) is None     # integers: exact
    assert "1 elements differ" in gate.compare("i", idx + (idx == 4), idx, torch.int64)


def _cfg(**kw):
    base = dict(device=torch.device("cpu"), dtypes=[torch.float32], modes=["fwd", "bwd", "fwd+bwd"],
                quick=True, policy=TINY, shapes=[(8, 64)], providers=None, ops=["layer_norm"])
    base.update(kw)
    return SuiteConfig(**base)


def _everywhere(suite):
    """The suite with every provider allowed on every device (so pydl-triton's fakes run on CPU)."""
    return dataclasses.replace(suite, providers=tuple(dataclasses.replace(p, devices=("cpu", "cuda"))
                                                      for p in suite.providers))


def _by(records, **match):
    return [r for r in records if all(getattr(r, k) == v for k, v in match.items())]


def test_gate_records_mismatch_error_and_skip(monkeypatch):
    """A wrong provider is timed but marked mismatch; a raising one is error; a failing probe skipped."""
    def fake_pydl_fn(op, backend):
        eager = ln_suite.eager_fn(op)
        if backend == "native":       # wrong by 10%
            return lambda *a: tuple(o * 1.1 for o in eager(*a))
        if backend == "triton":       # raises on the real shape only (the probe is (4, 64))
            def f(x, w, b):
                if x.shape[0] != 4:
                    raise RuntimeError("kernel exploded")
                return eager(x, w, b)
            return f
        raise AssertionError(backend)

    monkeypatch.setattr(ln_suite, "pydl_fn", fake_pydl_fn)
    monkeypatch.setattr(core.Availability, "_probe", staticmethod(
        lambda suite, provider, op, dtype, device: None))
    recs = _everywhere(ln_suite.SUITE).run(_cfg(providers=["pydl-native", "pydl-triton", EAGER]))
    assert len(recs) == 3 * 3
    for r in _by(recs, provider="pydl-native"):
        assert r.status == MISMATCH and r.measurement is not None and "rel=" in r.note
    for r in _by(recs, provider="pydl-triton"):
        assert r.status == ERROR and r.measurement is None and "kernel exploded" in r.note
    for r in _by(recs, provider=EAGER):
        assert r.status == OK and r.measurement is not None and r.bytes_moved > 0


def test_gate_bf16_uses_float32_reference_and_still_catches_errors(monkeypatch):
    """bf16: a float32-accurate provider passes even where torch's bf16 reductions are off;
    a provider with a wrong weight gradient (a few elements) or a 5% error is caught."""
    def fake_pydl_fn(op, backend):
        eager = ln_suite.eager_fn(op)
        if backend == "native":   # computes in float32 and rounds once: the accurate kind
            return lambda *a: tuple(o.to(a[0].dtype) for o in eager(*(t.float() for t in a)))
        def wrong(x, w, b):       # triton: forward 5% off
            return tuple(o * 1.05 for o in eager(x, w, b))
        return wrong

    monkeypatch.setattr(ln_suite, "pydl_fn", fake_pydl_fn)
    monkeypatch.setattr(core.Availability, "_probe", staticmethod(lambda *a: None))
    recs = _everywhere(ln_suite.SUITE).run(_cfg(providers=["pydl-native", "pydl-triton", EAGER], dtypes=[torch.bfloat16],
                                   shapes=[(2000, 256)], modes=["fwd", "bwd"]))
    for r in _by(recs, provider="pydl-native") + _by(recs, provider=EAGER):
        assert r.status == OK, (r.provider, r.mode, r.note)
    assert _by(recs, provider="pydl-triton", mode="fwd")[0].status == MISMATCH

    ref_in, grads = ln_suite.make_inputs("layer_norm", (2000, 256), torch.bfloat16, torch.device("cpu"), 0)
    ref = gate.Reference(ln_suite.eager_fn("layer_norm"), ref_in, grads, torch.bfloat16, want_grad=True,
                         out_names=("y",), grad_names=ln_suite.grad_names("layer_norm"),
                         reduction=("dw", "db"))
    leaves = tuple(t.detach().float().requires_grad_() for t in ref_in)
    good = [g.to(torch.bfloat16) for g in torch.autograd.grad(
        ln_suite.eager_fn("layer_norm")(*leaves), leaves, tuple(g.float() for g in grads))]
    assert ref.check_grads(good) == []
    bad = [g.clone() for g in good]
    bad[1][-3:] = 0                                     # dweight: a lost tail
    assert any(r.startswith("dw:") for r in ref.check_grads(bad))


def test_gate_skips_unavailable_provider(monkeypatch):
    def broken(op, backend):
        raise ImportError("no pydl.ops here")

    monkeypatch.setattr(ln_suite, "pydl_fn", broken)
    recs = ln_suite.SUITE.run(_cfg(providers=["pydl-native", "pydl-triton", EAGER], modes=["fwd"]))
    native = _by(recs, provider="pydl-native")[0]
    assert native.status == SKIPPED and "import failed" in native.note and "no pydl.ops here" in native.note
    triton = _by(recs, provider="pydl-triton")[0]
    assert triton.status == SKIPPED and "cuda only" in triton.note
    assert _by(recs, provider=EAGER)[0].status == OK


def test_compile_failure_is_skipped(monkeypatch):
    def failing_compile(fn):
        def f(*args):
            raise RuntimeError("inductor says no")
        return f

    monkeypatch.setattr(core, "compile_fn", failing_compile)
    recs = ln_suite.SUITE.run(_cfg(providers=[EAGER, COMPILE], modes=["fwd", "bwd"]))
    for r in _by(recs, provider=COMPILE):
        assert r.status == SKIPPED and "compile failed" in r.note and "inductor says no" in r.note


def test_pydl_providers_pass_the_gate_when_available():
    """With the real pydl.ops: the native CPU backend must match torch eager (or be skipped)."""
    recs = ln_suite.SUITE.run(_cfg(providers=["pydl-native", EAGER], ops=list(ln_suite.OPS),
                                   shapes=[(6, 97)], modes=["fwd", "bwd"]))
    for r in _by(recs, provider="pydl-native"):
        assert r.status in (OK, SKIPPED), (r.op, r.mode, r.status, r.note)


# ------------------------------------------------------------------------ rows / report

def _rec(provider, ms, op="layer_norm", mode="fwd", shape="4x8", status=OK, note=""):
    meas = None if ms is None else timing.Measurement(ms, ms * 0.9, ms * 1.1, 10, 2)
    return Record(op=op, provider=provider, mode=mode, shape=shape, dtype="float32", device="cpu",
                  bytes_moved=1_000_000, status=status, note=note, measurement=meas)


CEIL = ceil_mod.Ceilings(copy_gbps=10.0, copy_bytes=2 << 20, matmul_tflops=1.5,
                         matmul_desc="float32 2048x2048x2048", copy_p50_ms=0.2, matmul_p50_ms=11.0)
META = {"device": "cpu", "device_name": "test cpu", "version": "9.9", "commit": "abc1234",
        "timestamp": "2026-01-01T00:00:00+00:00", "threads": 2}


def _rows():
    recs = [_rec(EAGER, 2.0), _rec(COMPILE, 1.0), _rec("pydl-native", 0.5),
            _rec("pydl-triton", None, status=SKIPPED, note="cuda only"),
            _rec("pydl-native", 0.4, shape="8x8", status=MISMATCH, note="y: rel=1e-1"),
            _rec(EAGER, 0.8, shape="8x8")]
    return report.finalize(recs, CEIL, META)


def test_finalize_metrics():
    rows = _rows()
    ceil = [r for r in rows if r["op"] == report.CEILING_OP]
    assert {r["mode"] for r in ceil} == {"copy", "matmul"}
    native = next(r for r in rows if r["provider"] == "pydl-native" and r["shape"] == "4x8")
    assert native["value"] == pytest.approx(1e6 / 0.5e-3 / 1e9)        # 2 GB/s
    assert native["unit"] == "GB/s" and native["metric"] == "bandwidth"
    assert native["pct_of_ceiling"] == pytest.approx(20.0)
    assert native["speedup_vs_eager"] == pytest.approx(4.0)
    assert native["speedup_vs_compile"] == pytest.approx(2.0)
    eager = next(r for r in rows if r["provider"] == EAGER and r["shape"] == "4x8")
    assert eager["speedup_vs_eager"] == pytest.approx(1.0)
    skipped = next(r for r in rows if r["provider"] == "pydl-triton")
    assert skipped["p50_ms"] == "" and skipped["value"] == "" and skipped["status"] == SKIPPED
    mism = next(r for r in rows if r["shape"] == "8x8" and r["provider"] == "pydl-native")
    assert mism["status"] == MISMATCH and mism["speedup_vs_eager"] == pytest.approx(2.0)
    assert mism["speedup_vs_compile"] == ""                             # no compile baseline


def test_csv_roundtrip(tmp_path):
    rows = _rows()
    path = tmp_path / "r.csv"
    report.write_csv(rows, str(path))
    with open(path, newline="") as f:
        header = next(csv.reader(f))
    assert tuple(header) == report.CSV_COLUMNS
    back = report.read_csv(str(path))
    assert len(back) == len(rows)
    native = next(r for r in back if r["provider"] == "pydl-native" and r["shape"] == "4x8")
    assert float(native["p50_ms"]) == pytest.approx(0.5)
    assert native["version"] == "9.9" and native["commit"] == "abc1234"
    assert native["dtype"] == "float32" and native["device"] == "cpu"


def test_markdown_report():
    md = report.markdown(_rows(), dict(META, torch="2.x"))
    assert "| shape | torch-eager | torch-compile | pydl-native | pydl-triton |" in md
    assert "## layer_norm — fwd — float32 — cpu" in md
    assert "0.5 ms (4.00× e, 2.00× c)" in md
    assert "**MISMATCH**" in md and "skipped" in md
    assert "copy 10 GB/s" in md and "1.5 TFLOP/s" in md
    assert "2 (20%) native" in md                                     # best pydl GB/s (% copy)
    assert "- pydl-native mismatch ×1: y: rel=1e-1" in md


def test_compare_flags_regressions():
    old = _rows()
    new = [dict(r) for r in old]
    for r in new:
        if r["provider"] == "pydl-native" and r["shape"] == "4x8":
            r["p50_ms"] = 0.5 * 1.25                                    # 25% slower: flagged
        if r["provider"] == EAGER and r["shape"] == "4x8":
            r["p50_ms"] = 2.0 * 1.05                                    # 5% slower: noise
        if r["provider"] == COMPILE:
            r["p50_ms"] = 0.5                                           # 2x faster
        if r["shape"] == "8x8" and r["provider"] == "pydl-native":
            r["status"] = OK
        if r["op"] == report.CEILING_OP:
            r["p50_ms"] = 100.0                                         # machines are not compared
    res = report.compare(old, new)
    assert [(e["provider"], e["shape"]) for e in res["regressions"]] == [("pydl-native", "4x8")]
    assert res["regressions"][0]["ratio"] == pytest.approx(1.25)
    assert [e["provider"] for e in res["improvements"]] == [COMPILE]
    assert res["status_changes"][0]["old_status"] == MISMATCH
    lines = report.compare_lines(res)
    assert any(line.startswith("REGRESSION layer_norm pydl-native fwd 4x8") for line in lines)
    md = report.markdown(new, dict(META, compare="old.csv"), res)
    assert "## Compared with old.csv" in md and "REGRESSION" in md


def test_compare_joins_on_all_key_columns():
    old = [{"op": "layer_norm", "provider": "p", "mode": "fwd", "shape": "1x2", "dtype": "float32",
            "device": "cpu", "p50_ms": "1.0", "status": OK}]
    new = [dict(old[0], dtype="bfloat16", p50_ms="5.0")]
    res = report.compare(old, new)
    assert res["matched"] == 0 and not res["regressions"]


def test_plots_optional(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)               # import fails
    files, note = report.plots(_rows(), str(tmp_path))
    assert files == [] and note.startswith("plots skipped") and INSTALL_EXTRAS_HINT in note
    assert "matplotlib" in note
    md = report.markdown(_rows(), META, plot_note=note)
    assert f"plots skipped: {INSTALL_EXTRAS_HINT}" in md


def test_plots_written(tmp_path):
    pytest.importorskip("matplotlib")
    files, note = report.plots(_rows(), str(tmp_path))
    assert note == "" and len(files) == 1 and os.path.getsize(files[0]) > 0


def test_summary_table():
    text = report.summary_table(_rows())
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["op", "mode", "dtype", "shape"]
    assert any("4x8" in line and "4" in line for line in lines[2:])
    assert "!mismatch" in text


def test_parse_shapes():
    assert parse_shapes("16384x1024, 64x97") == [(16384, 1024), (64, 97)]
    assert parse_shapes("2x8x1024x64") == [(2, 8, 1024, 64)]
    import argparse
    for bad in ("16384", "0x5", "axb", ","):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_shapes(bad)


# ----------------------------------------------------------------------------- the CLI

def test_cli_compare_in_process(tmp_path, capsys):
    args = ["layer_norm", "--device", "cpu", "--smoke", "--no-plots", "--ops", "layer_norm",
            "--modes", "fwd", "--providers", EAGER, "--shapes", "16x64"]
    assert bench_main(args + ["--out", str(tmp_path / "a")]) == 0
    old = report.read_csv(str(tmp_path / "a" / "results.csv"))
    for r in old:
        if r["provider"] == EAGER:
            r["p50_ms"] = "1e-06"                # the "old run" was impossibly fast: not timing-dependent
    report.write_csv(old, str(tmp_path / "old.csv"))
    capsys.readouterr()
    assert bench_main(args + ["--out", str(tmp_path / "b"), "--compare", str(tmp_path / "old.csv")]) == 0
    out = capsys.readouterr().out
    assert "REGRESSION layer_norm torch-eager fwd 16x64 float32 cpu" in out
    assert "REGRESSION" in (tmp_path / "b" / "report.md").read_text()


def test_cli_rejects_unknown_suite(capsys):
    with pytest.raises(SystemExit) as exc:
        bench_main(["no_such_suite", "--device", "cpu"])
    assert exc.value.code == 2


def test_cli_smoke_end_to_end(tmp_path):
    """`python -m pydl.bench layer_norm --quick --device cpu --out DIR` with tiny shapes."""
    out = tmp_path / "bench"
    # One torch thread: on a loaded 2-core box a 2-thread parallel region can wait a whole
    # scheduler slice for its second thread (ms per tiny call); this test checks the pipeline.
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pydl.bench", "layer_norm", "--quick", "--device", "cpu", "--out", str(out),
         "--smoke", "--providers", "pydl-native", "pydl-triton", EAGER],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = report.read_csv(str(out / "results.csv"))
    ceil = [r for r in rows if r["op"] == report.CEILING_OP]
    body = [r for r in rows if r["op"] != report.CEILING_OP]
    assert [r["mode"] for r in ceil] == ["copy", "read", "matmul"]
    assert len(body) == len(ln_suite.OPS) * 2 * 3 * 3         # ops x shapes x modes x providers
    assert {r["op"] for r in body} == set(ln_suite.OPS)
    assert {r["mode"] for r in body} == {"fwd", "bwd", "fwd+bwd"}
    for r in body:
        assert r["device"] == "cpu" and r["dtype"] == "float32"
        if r["provider"] == EAGER:
            assert r["status"] == OK and float(r["p50_ms"]) > 0 and float(r["value"]) > 0
            assert float(r["speedup_vs_eager"]) == pytest.approx(1.0)
        else:
            assert r["status"] in (OK, SKIPPED), (r["provider"], r["op"], r["mode"], r["note"])
    md = (out / "report.md").read_text()
    assert md.startswith("# pydl benchmark report")
    if sys.platform.startswith("linux"):  # glibc: the run keeps freed host memory (allocator.py)
        assert "- host allocator: steady (glibc mallopt" in md
    assert "op" in proc.stdout and "layer_norm_gelu" in proc.stdout and "wrote" in proc.stdout


def test_cli_time_limit_skips_the_rest(tmp_path, capsys):
    out = tmp_path / "t"
    assert bench_main(["layer_norm", "--device", "cpu", "--smoke", "--no-plots", "--providers", EAGER,
                       "--time-limit-s", "0", "--out", str(out)]) == 0
    rows = [r for r in report.read_csv(str(out / "results.csv")) if r["op"] != report.CEILING_OP]
    assert rows and all(r["status"] == SKIPPED and "time-limit" in r["note"] for r in rows)
    assert (out / "report.md").exists()


def test_real_torch_compile_provider_all_modes():
    """The real torch.compile path (the slowest test here: one inference + one training compile).

    Guards what only a real compile shows, e.g. a backward that refuses retain_graph=True.
    """
    recs = ln_suite.SUITE.run(_cfg(providers=[COMPILE], shapes=[(8, 64)]))
    assert [(r.mode, r.status) for r in recs] == [("fwd", OK), ("bwd", OK), ("fwd+bwd", OK)], \
        [r.note for r in recs]


def test_a_failing_point_is_recorded_and_the_run_goes_on(monkeypatch):
    real = ln_suite.make_inputs

    def flaky(op, shape, *a, **kw):
        if shape[1] == 97:
            raise MemoryError("pretend OOM")
        return real(op, shape, *a, **kw)

    monkeypatch.setattr(ln_suite, "make_inputs", flaky)
    recs = ln_suite.SUITE.run(_cfg(providers=[EAGER], shapes=[(4, 97), (4, 64)], modes=["fwd", "bwd"]))
    assert [(r.shape, r.mode, r.status) for r in recs] == [
        ("4x97", "fwd", ERROR), ("4x97", "bwd", ERROR), ("4x64", "fwd", OK), ("4x64", "bwd", OK)]
    assert "pretend OOM" in recs[0].note
