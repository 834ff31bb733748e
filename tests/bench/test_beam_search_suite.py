"""The ``beam_search`` suite of the harness on CPU: the byte count, shapes, inputs, providers against the
reference, a smoke run of every provider, the target table."""

from __future__ import annotations

import pytest
import torch

from pydl.bench import core, report, timing
from pydl.bench.suites import OK, SuiteConfig
from pydl.bench.suites import beam_search as bs

TINY = timing.TimingPolicy(budget_s=0.005, min_reps=3, max_reps=6, warmup_s=0.0, min_warmup=1, flush_l2=False)


def test_bytes_and_shapes():
    assert bs.work(bs.OP, "fwd", bs.shape(8, 4, 50257), torch.float32) == 8 * 4 * 50257 * 4
    assert bs.dims(bs.CPU_TARGET) in [bs.dims(s) for s in bs.default_shapes(torch.device("cpu"), quick=True)]
    cuda = [bs.dims(s) for s in bs.default_shapes(torch.device("cuda"), quick=False)]
    assert {v for *_, v in cuda} == {32000, 50257, 128256} and {b for b, *_ in cuda} == {1, 8, 32}
    with pytest.raises(ValueError):
        bs.dims((1, 2))


def test_providers_agree():
    (logits, scores), grads = bs.make_inputs(bs.OP, bs.shape(3, 4, 1000), torch.float32, torch.device("cpu"), 0)
    assert grads == () and logits.shape == (12, 1000)
    want = bs.pydl_fn(bs.OP, "torch")(logits, scores)
    for fn in (bs.torch_fn(bs.OP), bs.pydl_fn(bs.OP), bs.pydl_fn(bs.OP, "native")):
        got = fn(logits, scores)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


def test_suite_smoke_every_cpu_provider():
    cfg = SuiteConfig(device=torch.device("cpu"), dtypes=[torch.float32], modes=["fwd"], quick=True, policy=TINY,
                      smoke=True, providers=["pydl", "pydl-native", core.EAGER])
    recs = bs.SUITE.run(cfg)
    assert {r.provider for r in recs} == {"pydl", "pydl-native", core.EAGER}
    for r in recs:
        assert r.status == OK and r.measurement is not None, (r.provider, r.note)
    lines = bs.report(report.finalize(recs, None, {"device": "cpu"}))
    assert lines[0] == "## Beam search step targets"


def test_target_table():
    s = core.shape_str(bs.CPU_TARGET)
    rows = [dict(suite=bs.NAME, mode="fwd", device="cpu", shape=s, dtype="float32", provider=p, status=OK, p50_ms=v,
                 pct_of_ceiling=50.0) for p, v in (("pydl", 1.0), (core.EAGER, 3.0))]
    assert "| met" in next(line for line in bs.report(rows) if line.startswith("| CPU"))
    rows[1]["p50_ms"] = 1.5
    assert "MISSED" in next(line for line in bs.report(rows) if line.startswith("| CPU"))
