"""The ``decode_attention`` suite of the harness (pydl.bench.suites.decode_attention), on CPU: its byte
count, shapes, inputs, a smoke run of every provider, and the target table."""

from __future__ import annotations

import pytest
import torch

from pydl.bench import core, report, timing
from pydl.bench.suites import OK, SuiteConfig
from pydl.bench.suites import decode_attention as da

TINY = timing.TimingPolicy(budget_s=0.005, min_reps=3, max_reps=6, warmup_s=0.0, min_warmup=1,
                           flush_l2=False)


def _cfg(**kw):
    base = dict(device=torch.device("cpu"), dtypes=[torch.float32], modes=["fwd"], quick=True, policy=TINY,
                shapes=None)
    base.update(kw)
    return SuiteConfig(**base)


def test_bytes_are_the_valid_cache_once_plus_q_and_out():
    b, h, hkv, length, e = 2, 8, 2, 100, 64
    assert da.bytes_moved(b, h, hkv, length, e, e, 4) == 4 * (b * hkv * length * 2 * e + 2 * b * h * e)
    assert da.work(da.OP, "fwd", da.shape(b, h, hkv, length, e), torch.bfloat16) == \
        da.bytes_moved(b, h, hkv, length, e, e, 2)


def test_shapes():
    cpu = [da.dims(s) for s in da.default_shapes(torch.device("cpu"), quick=True)]
    assert da.dims(da.CPU_TARGET) in cpu and {h // hkv for _, h, hkv, _, _ in cpu} == {1, 8}
    full = [da.dims(s) for s in da.default_shapes(torch.device("cpu"), quick=False)]
    assert max(length for *_, length, _ in full) <= 4096 and da.dims(da.CPU_TARGET) in full
    cuda = [da.dims(s) for s in da.default_shapes(torch.device("cuda"), quick=False)]
    assert {length for *_, length, _ in cuda} == {1024, 4096, 16384, 32768} and {b for b, *_ in cuda} == {1, 16, 64}
    assert {h // hkv for _, h, hkv, _, _ in cuda} == {1, 8}
    assert da.dims(core.shape_str(da.CPU_TARGET)) == da.dims(da.CPU_TARGET)
    with pytest.raises(ValueError):
        da.dims((1, 2))


def test_providers_agree_with_the_float64_reference():
    from pydl.ops import decode_attention_ref

    (q, k, v, lens), grads = da.make_inputs(da.OP, da.shape(2, 8, 2, 50, 16), torch.float32, torch.device("cpu"), 0)
    assert grads == () and lens.tolist() == [50, 50]
    ref = decode_attention_ref(q, k, v, lens)
    for fn in (da.sdpa_fn(da.OP), da.naive_fn(da.OP), da.pydl_fn(da.OP), da.pydl_fn(da.OP, "native")):
        torch.testing.assert_close(fn(q, k, v, lens)[0].double(), ref, atol=1e-5, rtol=1e-5)


def test_suite_smoke_every_cpu_provider():
    recs = da.SUITE.run(_cfg(smoke=True))
    assert {r.provider for r in recs} == {p.name for p in da.SUITE.providers}
    for r in recs:
        assert r.status == OK and r.measurement is not None, (r.provider, r.note)
        assert r.metric == core.BANDWIDTH
    rows = report.finalize(recs, None, {"device": "cpu"})
    lines = da.report(rows)
    assert lines[0] == "## Decode attention targets"
    assert any("no such cell in this run" in line for line in lines)
    assert any("not measured (no CUDA cells" in line for line in lines)


def test_target_table_reads_the_cpu_cell():
    s = core.shape_str(da.CPU_TARGET)
    rows = [dict(suite=da.NAME, mode="fwd", device="cpu", shape=s, dtype="float32", provider=p, status=OK,
                 p50_ms=ms, pct_of_ceiling=50.0) for p, ms in (("pydl", 4.0), (core.EAGER, 8.0))]
    line = next(line for line in da.report(rows) if line.startswith("| CPU"))
    assert "2.00×" in line and "| met" in line
    rows[1]["p50_ms"] = 5.0
    assert "MISSED" in next(line for line in da.report(rows) if line.startswith("| CPU"))
