"""The harness core (pydl.bench.core): a suite declared through ``Suite``, interleaved A/B
timing, re-measuring and flagging implausible cells, ``--repeat``, the commit / dirty columns,
the progress fallback, and a smoke run of the ``overhead`` suite. CPU only, a few seconds."""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pydl.bench.__main__ as cli
from pydl.bench import core, progress, report, timing
from pydl.bench import ceilings as ceil_mod
from pydl.bench.core import (ABOVE_CEILING, BANDWIDTH, EAGER, ERROR, LATENCY, MISMATCH, MODES, NOISY,
                             OK, PYDL, REFERENCE, SKIPPED, THROUGHPUT, Provider, Suite, SuiteConfig)
from pydl.bench.suites import overhead

ROOT = Path(__file__).resolve().parents[2]
TINY = timing.TimingPolicy(budget_s=0.002, min_reps=3, max_reps=6, warmup_s=0.0, min_warmup=1,
                           flush_l2=False, rounds=3)


# ------------------------------------------------------------------- a virtual clock

class Clock:
    """Stands in for ``time`` inside pydl.bench.timing: a call "takes" what its fn says."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def monotonic(self):
        return self.now

    def spend(self, seconds: float):
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(timing, "time", c)
    return c


# ---------------------------------------------------------------- a tiny fake suite

def _dims(shape):
    return tuple(shape.values()) if isinstance(shape, dict) else tuple(shape)


def _make_inputs(op, shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    dims = _dims(shape)
    return (torch.randn(*dims, generator=g).to(dtype),), (torch.randn(*dims[:-1] if op == "rowsum" else dims,
                                                                       generator=g).to(dtype),)


def _eager(op):
    if op == "double":
        return lambda x: (x * 2,)
    if op == "rowsum":
        return lambda x: (x.sum(-1),)
    return lambda x: (x * 3,)


def _raising(op):
    def f(x):
        if x.numel() > 4:          # the probe (2x2) passes; the real shapes raise
            raise RuntimeError("boom at the real shape")
        return _eager(op)(x)
    return f


def fake_suite(**kw) -> Suite:
    base = dict(
        name="fake", ops=("double", "rowsum", "scale"),
        providers=(Provider("pydl-good", _eager, PYDL),
                   Provider("pydl-raises", _raising, PYDL),
                   Provider("pydl-wrong", lambda op: lambda x: tuple(o * 1.1 for o in _eager(op)(x)), PYDL),
                   Provider(EAGER, _eager, REFERENCE)),
        make_inputs=_make_inputs,
        shapes=lambda device, quick: {"double": [(4, 8)], "rowsum": [(2, 3, 5)], "scale": [{"rows": 3, "cols": 4}]},
        smoke_shapes={"double": [(4, 8)], "rowsum": [(2, 3, 5)], "scale": [{"rows": 3, "cols": 4}]},
        probe_shape=(2, 2),
        work=lambda op, mode, shape, dtype: 2 * torch.Size(_dims(shape)).numel(),
        metric=THROUGHPUT,
        modes={"double": MODES, "rowsum": ("fwd",), "scale": ("fwd",)},
        out_names=("y",), grad_names=("dx",),
    )
    base.update(kw)
    return Suite(**base)


class Ticks:
    def __init__(self):
        self.descs, self.lines = [], []

    def update(self, desc=""):
        self.descs.append(desc)

    def write(self, msg):
        self.lines.append(msg)


def _cfg(**kw):
    base = dict(device=torch.device("cpu"), dtypes=None, modes=list(MODES), quick=True, policy=TINY)
    base.update(kw)
    return SuiteConfig(**base)


def _by(records, **match):
    return [r for r in records if all(getattr(r, k) == v for k, v in match.items())]


def test_fake_suite_runs_through_the_core():
    suite, ticks = fake_suite(), Ticks()
    cfg = _cfg(progress=ticks)
    assert core.count_cells(suite, cfg) == 3 + 1 + 1
    recs = suite.run(cfg)
    assert len(recs) == 4 * 3 + 4 + 4                          # providers x cells
    assert ticks.descs == [f"fake double 4x8 float32 {m}" for m in MODES] + [
        "fake rowsum 2x3x5 float32 fwd", "fake scale rows=3,cols=4 float32 fwd"]
    assert {r.shape for r in recs} == {"4x8", "2x3x5", "rows=3,cols=4"}
    for r in _by(recs, provider="pydl-good") + _by(recs, provider=EAGER):
        assert r.status == OK and r.measurement is not None, (r.provider, r.op, r.mode, r.note)
    for r in _by(recs, provider="pydl-raises"):
        assert r.status == ERROR and r.measurement is None and "boom at the real shape" in r.note
    for r in _by(recs, provider="pydl-wrong"):
        assert r.status == MISMATCH and r.measurement is not None and "rel=" in r.note
    # records of a cell come in the suite's provider order
    assert [r.provider for r in recs[:4]] == ["pydl-good", "pydl-raises", "pydl-wrong", EAGER]
    assert any("boom" in line for line in ticks.lines)         # errors are said, not swallowed
    rows = report.finalize(recs, None, {"device": "cpu"})
    good = next(r for r in rows if r["provider"] == "pydl-good" and r["op"] == "rowsum")
    assert good["metric"] == THROUGHPUT and good["unit"] == "TFLOP/s" and good["flops"] == 60
    assert good["value"] == pytest.approx(60 / (good["p50_ms"] * 1e-3) / 1e12)
    assert good["bytes"] == "" and good["suite"] == "fake" and good["spread"] >= 0
    assert good["speedup_vs_eager"] > 0


def test_provider_restricted_to_a_device_is_skipped():
    suite = fake_suite(providers=(Provider("pydl-gpu", _eager, PYDL, devices=("cuda",)),
                                  Provider(EAGER, _eager, REFERENCE)))
    recs = suite.run(_cfg(ops=["rowsum"]))
    gpu = _by(recs, provider="pydl-gpu")[0]
    assert gpu.status == SKIPPED and "cuda only" in gpu.note


def test_module_call_binds_parameters_to_inputs():
    fn = core.ModuleCall(lambda x, w, b: torch.nn.LayerNorm(x.shape[-1]))
    x, w, b = torch.randn(3, 8), torch.randn(8), torch.randn(8)
    args, leaves = core.gate.make_leaves((x, w, b), (0, 1, 2))
    got = torch.autograd.grad(fn(*args)[0].sum(), leaves)
    ref = torch.autograd.grad(torch.nn.functional.layer_norm(*args[:1], (8,), *args[1:]).sum(), leaves)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r)


# ------------------------------------------------------------------------ interleaving

def test_providers_are_timed_in_rotating_rounds():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "ABC"}
    policy = dataclasses.replace(TINY, min_reps=3, max_reps=3, rounds=3, min_sample_s=0.0)
    res = timing.time_interleaved(fns, "cpu", policy)
    assert all(m.reps == 3 for m in res.values())
    assert calls[:3] == ["A", "B", "C"]                             # warm-up, once each
    assert calls[3:] == list("ABC" "BCA" "CAB")                     # round r: rotated by r


def test_each_provider_gets_a_slice_of_its_samples_per_round():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "AB"}
    policy = dataclasses.replace(TINY, min_reps=4, max_reps=4, rounds=2, calls_per_sample=3)
    res = timing.time_interleaved(fns, "cpu", policy)
    assert res["A"].calls_per_sample == 3 and res["A"].reps == 4
    assert "".join(calls[2:]) == "A" * 6 + "B" * 6 + "B" * 6 + "A" * 6   # 2 samples x 3 calls a slice


def test_a_provider_raising_while_timed_drops_out(clock):
    n = {"calls": 0}

    def flaky():
        n["calls"] += 1
        clock.spend(1e-3)
        if n["calls"] > 2:
            raise RuntimeError("died in round 2")

    res = timing.time_interleaved({"ok": lambda: clock.spend(1e-3), "flaky": flaky}, "cpu",
                                  dataclasses.replace(TINY, min_reps=4, max_reps=4, rounds=4))
    assert isinstance(res["flaky"], RuntimeError) and res["ok"].reps == 4


def test_inner_loop_amortizes_tiny_calls(clock):
    policy = dataclasses.replace(TINY, min_sample_s=1e-3, max_calls_per_sample=1000)
    m = timing.time_fn(lambda: clock.spend(5e-6), "cpu", policy)    # a 5 µs call
    assert m.calls_per_sample == 200
    assert m.p50_ms == pytest.approx(5e-3)                           # per call, not per sample
    assert timing.calls_for_sample(1.0, policy) == 1
    assert timing.split_evenly(5, 3) == [1, 2, 2] and sum(timing.split_evenly(7, 4)) == 7


# ------------------------------------------------------------------- plausibility

NOISY_POLICY = dataclasses.replace(TINY, min_reps=6, max_reps=6, rounds=2, max_spread=0.25, remeasure=2)


def _noisy(clock, quiet_after=None):
    n = {"calls": 0}

    def f():
        n["calls"] += 1
        if quiet_after is not None and n["calls"] > quiet_after:
            clock.spend(1e-3)
        else:
            clock.spend(1e-3 if n["calls"] % 2 else 4e-3)               # 1 ms, 4 ms, 1 ms, ...
    return f


def test_noisy_cell_is_remeasured_and_flagged(clock):
    cfg = _cfg(policy=NOISY_POLICY)
    res = core.measure_cell({"noisy": _noisy(clock), "steady": lambda: clock.spend(1e-3)}, cfg,
                            NOISY_POLICY, LATENCY, lambda name: None, "float32")
    m, flags, attempts, _ = res["noisy"]
    assert flags == [NOISY] and attempts == 3 and m.spread > 0.25
    steady = res["steady"]
    assert steady[1] == [] and steady[2] == 3                       # the whole cell was re-measured


def test_cell_that_settles_keeps_the_best_attempt(clock):
    cfg = _cfg(policy=NOISY_POLICY)
    res = core.measure_cell({"settles": _noisy(clock, quiet_after=8)}, cfg, NOISY_POLICY, LATENCY,
                            lambda name: None, "float32")
    m, flags, attempts, _ = res["settles"]
    assert flags == [] and attempts == 2 and m.p50_ms == pytest.approx(1.0)


def test_plausible_cell_is_measured_once(clock):
    res = core.measure_cell({"a": lambda: clock.spend(1e-3)}, _cfg(), NOISY_POLICY, LATENCY,
                            lambda name: None, "float32")
    assert res["a"][1:3] == ([], 1)


def test_cell_above_the_copy_ceiling_is_flagged(clock):
    ceil = ceil_mod.Ceilings(copy_gbps=10.0, copy_bytes=1, matmul_tflops=1.0, matmul_desc="float32 8x8x8")
    suite = fake_suite(metric=BANDWIDTH, ops=("rowsum",),
                       providers=(Provider(EAGER, lambda op: (lambda x, f=_eager(op): (clock.spend(1e-3), f(x))[1]),
                                           REFERENCE),),
                       work=lambda op, mode, shape, dtype: 10 ** 9)        # 1 GB in 1 ms: 1000 GB/s
    ticks = Ticks()
    recs = suite.run(_cfg(policy=NOISY_POLICY, ceilings=ceil, progress=ticks))
    (r,) = recs
    assert r.status == OK and r.flag == ABOVE_CEILING and r.attempts == 3
    rows = report.finalize(recs, ceil, {"device": "cpu"})
    row = rows[-1]
    assert row["flag"] == ABOVE_CEILING and row["pct_of_ceiling"] > 110
    md = report.markdown(rows, {"device": "cpu"})
    assert "⚠above ceiling" in md and "## Flagged cells" in md and "1 above ceiling" in md
    assert report.flag_counts(rows) == {ABOVE_CEILING: 1}
    assert "above-ceiling" in report.summary_table(rows)
    assert any("above ceiling" in line for line in ticks.lines)     # a warning was printed


def test_bandwidth_cells_are_held_against_the_higher_of_copy_and_read(clock):
    """A read-only kernel can beat the copy rate (write-allocate): 1000 GB/s against a copy
    ceiling of 10 and a read ceiling of 2000 is plausible, and its % stays of the copy rate."""
    ceil = ceil_mod.Ceilings(copy_gbps=10.0, copy_bytes=1, matmul_tflops=1.0, matmul_desc="float32 8x8x8",
                             read_gbps=2000.0)
    assert ceil.bandwidth_limit_gbps == 2000.0
    suite = fake_suite(metric=BANDWIDTH, ops=("rowsum",),
                       providers=(Provider(EAGER, lambda op: (lambda x, f=_eager(op): (clock.spend(1e-3), f(x))[1]),
                                           REFERENCE),),
                       work=lambda op, mode, shape, dtype: 10 ** 9)        # 1 GB in 1 ms: 1000 GB/s
    (r,) = suite.run(_cfg(policy=NOISY_POLICY, ceilings=ceil))
    assert r.status == OK and not r.flag and r.attempts == 1
    rows = report.finalize([r], ceil, {"device": "cpu"})
    assert [row["mode"] for row in rows[:3]] == ["copy", "read", "matmul"]
    assert rows[-1]["pct_of_ceiling"] == pytest.approx(1e4)
    assert ceil_mod.Ceilings(copy_gbps=10.0, copy_bytes=1, matmul_tflops=1.0,
                             matmul_desc="float32 8x8x8").bandwidth_limit_gbps == 10.0  # read not measured


# ------------------------------------------------------------------------ --repeat

def test_repeat_reports_the_median_of_the_medians(clock, monkeypatch):
    """--repeat 3: three full interleaved measurements (here taking 1, 3, 2 ms a call)."""
    state = {"d": 1e-3}
    suite = fake_suite(ops=("rowsum",), metric=LATENCY, work=None, providers=(
        Provider(EAGER, lambda op: (lambda x: (clock.spend(state["d"]), x.sum(-1))[1]), REFERENCE),))
    durations, real = iter([1e-3, 3e-3, 2e-3]), timing.time_interleaved

    def stepping(fns, device, policy):
        state["d"] = next(durations)
        return real(fns, device, policy)

    monkeypatch.setattr(core, "time_interleaved", stepping)
    (r,) = suite.run(_cfg(repeat=3))
    assert r.attempts == 3 and r.repeat_p50_ms == pytest.approx([1.0, 3.0, 2.0])
    assert r.measurement.p50_ms == pytest.approx(2.0)
    row = report.finalize([r], None, {"device": "cpu"})[0]
    assert row["repeats"] == 3 and row["p50_repeat_min"] == pytest.approx(1.0)
    assert row["p50_repeat_max"] == pytest.approx(3.0) and row["value"] == pytest.approx(2000.0)
    assert "2000 µs [1000–3000 µs]" in report.markdown([row], {})
    assert "2 ms [1–3 ms]" in report.markdown([dict(row, unit="GB/s")], {})


# ------------------------------------------------------------------- the CLI / commit

def test_cli_repeat_commit_and_quiet_stderr(tmp_path, capsys):
    out = tmp_path / "r"
    assert cli.main(["layer_norm", "--device", "cpu", "--smoke", "--no-plots", "--ops", "layer_norm",
                     "--modes", "fwd", "--providers", EAGER, "--repeat", "2", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    rows = [r for r in report.read_csv(str(out / "results.csv")) if r["op"] != report.CEILING_OP]
    assert len(rows) == 2
    for r in rows:
        assert r["repeats"] == "2" and r["suite"] == "layer_norm" and r["spread"] != ""
        assert float(r["p50_repeat_min"]) <= float(r["p50_ms"]) <= float(r["p50_repeat_max"])
        assert r["commit"] and r["commit"] != "unknown" or not (ROOT / ".git").exists()
        if (ROOT / ".git").exists() and not os.environ.get("PYDL_COMMIT"):
            assert r["dirty"] in ("true", "false")
    assert "ms  spread" not in err                                  # no per-cell lines ...
    assert "[2/2]" in err and "ETA" in err                          # ... but the counter


def test_cli_verbose_prints_a_line_per_cell(tmp_path, capsys):
    assert cli.main(["overhead", "--device", "cpu", "--smoke", "--no-plots", "--ops", "ops.layer_norm",
                     "--providers", "pydl", EAGER, "-v", "--out", str(tmp_path / "v")]) == 0
    err = capsys.readouterr().err
    assert sum("calls/sample" in line for line in err.splitlines()) >= 1


def test_commit_override_and_dirty_flag(monkeypatch):
    monkeypatch.setenv("PYDL_COMMIT", "abc1234-dirty")
    assert cli._git_commit() == ("abc1234", "true")
    monkeypatch.setenv("PYDL_COMMIT", "abc1234")
    monkeypatch.setenv("PYDL_COMMIT_DIRTY", "0")
    assert cli._git_commit() == ("abc1234", "false")


@pytest.mark.skipif(not (ROOT / ".git").exists() or shutil.which("git") is None, reason="not a git checkout")
def test_commit_in_this_checkout(monkeypatch):
    monkeypatch.delenv("PYDL_COMMIT", raising=False)
    commit, dirty = cli._git_commit()
    assert len(commit) >= 7 and commit != "unknown" and dirty in ("true", "false")


@pytest.mark.skipif(shutil.which("git") is None or not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="needs git and root (to hand a repository to another user)")
def test_commit_of_a_checkout_owned_by_another_user(tmp_path):
    """The cause of the empty commit column: git refuses a repository another user owns."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.email=a@b", "-c", "user.name=a", "-C", str(repo)]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["commit", "-q", "--allow-empty", "-m", "x"], check=True)
    head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    subprocess.run(["chown", "-R", "65534:65534", str(repo)], check=True)
    plain = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True)
    if plain.returncode == 0:
        pytest.skip("this git does not check ownership")
    assert (cli._git(str(repo), "rev-parse", "--short", "HEAD") or "").strip() == head
    assert cli._head_from_files(str(repo)) == head[:7]


# ------------------------------------------------------------------------- progress

def test_progress_without_tqdm_interactive(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)                  # import fails
    buf = io.StringIO()
    p = progress.Progress(4, stream=buf, interactive=True)
    assert p.bar is None
    p.update("layer_norm fwd")
    p.write("warning: something")
    p.update("layer_norm bwd")
    p.close()
    text = buf.getvalue()
    assert "\r" in text and "[1/4] layer_norm fwd" in text and "[2/4] layer_norm bwd" in text
    assert "ETA" in text and "warning: something\n" in text


def test_progress_non_interactive_is_a_few_lines():
    buf = io.StringIO()
    p = progress.Progress(40, stream=buf, interactive=False)
    for i in range(40):
        p.update(f"cell {i}")
    lines = buf.getvalue().splitlines()
    assert 1 < len(lines) <= 11 and lines[-1].startswith("[40/40] cell 39") and "ETA 0:00" in lines[-1]
    assert "\r" not in buf.getvalue()


# ------------------------------------------------------------------- overhead suite

def test_overhead_suite_smoke():
    recs = overhead.SUITE.run(_cfg(smoke=True, policy=dataclasses.replace(TINY, budget_s=0.01)))
    assert {r.op for r in recs} == set(overhead.OPS)
    assert {(r.op, r.mode) for r in recs} == {("ops.layer_norm", "fwd"), ("ops.layer_norm_gelu", "fwd"),
                                              ("ops.add_layer_norm", "fwd"), ("nn.LayerNorm", "fwd+bwd")}
    for r in recs:
        assert r.metric == LATENCY and r.dtype == "float32"
        if r.provider == EAGER:
            assert r.status == OK and r.measurement.calls_per_sample >= 1
        elif r.op == "nn.LayerNorm" and r.provider == "pydl-native":
            assert r.status == SKIPPED and "backend" in r.note
        else:
            assert r.status in (OK, SKIPPED), (r.provider, r.op, r.note)
    rows = report.finalize(recs, None, {"device": "cpu"})
    eager = next(r for r in rows if r["provider"] == EAGER and r["op"] == "ops.layer_norm")
    assert eager["unit"] == "us" and eager["value"] == pytest.approx(eager["p50_ms"] * 1e3)
    lines = overhead.report(rows)
    if any(r["provider"] == "pydl" and r["status"] == OK for r in rows):
        assert lines[0].startswith("## Call overhead") and any("(tiny)" in line for line in lines)
    md = report.markdown(rows, {"device": "cpu"}, extra=lines)
    assert "µs" in md and "pydl ÷ torch-eager (time)" in md


def test_overhead_shapes_and_targets():
    cpu = overhead.shapes(torch.device("cpu"), quick=True)
    assert cpu["ops.layer_norm"] == [(8, 64), (1, 64)]
    assert cpu["nn.LayerNorm"] == [(8, 64), (512, 768), (1576, 192)]
    assert (8192, 768) in overhead.shapes(torch.device("cuda"), quick=True)["nn.LayerNorm"]
    assert overhead.SUITE.dtypes(torch.device("cuda")) == [torch.float32, torch.bfloat16]
    assert overhead.target("nn.LayerNorm", "8x64") == ("tiny", 2.0)
    assert overhead.target("nn.LayerNorm", "512x768") == ("real", 1.0)


def test_progress_with_tqdm_on_a_terminal():
    pytest.importorskip("tqdm")
    buf = io.StringIO()
    p = progress.Progress(2, stream=buf, interactive=True)
    assert p.bar is not None
    p.update("a")
    p.write("error: shown above the bar")
    p.update("b")
    p.close()
    assert "2/2" in buf.getvalue() and "error: shown above the bar" in buf.getvalue()
