"""The ``depthwise_conv2d`` suite of the harness on CPU: byte counts, shapes, inputs (layout, stride),
providers against the float64 reference, a smoke run of every provider, the target table."""

from __future__ import annotations

import pytest
import torch

from pydl.bench import core, report, timing
from pydl.bench.suites import OK, SuiteConfig
from pydl.bench.suites import depthwise_conv2d as dw

TINY = timing.TimingPolicy(budget_s=0.005, min_reps=3, max_reps=6, warmup_s=0.0, min_warmup=1, flush_l2=False)


def test_bytes_and_shapes():
    n, c, h, k = 2, 8, 10, 3
    assert dw.bytes_moved("fwd", n, c, h, k, 1, 4) == 4 * (2 * n * c * h * h + c * (k * k + 1))
    assert dw.bytes_moved("fwd+bwd", n, c, h, k, 2, 2) == (dw.bytes_moved("fwd", n, c, h, k, 2, 2)
                                                         + dw.bytes_moved("bwd", n, c, h, k, 2, 2))
    cpu = [dw.dims(s) for s in dw.default_shapes(torch.device("cpu"), quick=True)]
    assert {cl for *_, cl in cpu} == {0, 1} and all(s[:5] == (8, 96, 56, 7, 1) for s in cpu)
    cuda = [dw.dims(s) for s in dw.default_shapes(torch.device("cuda"), quick=False)]
    assert {k for _, _, _, k, _, _ in cuda} == {3, 7, 13, 31} and {n for n, *_ in cuda} == {1, 4, 64}
    assert dw.dims(core.shape_str(dw.shape(2, 3, 4, 5, 2, 0))) == (2, 3, 4, 5, 2, 0)
    with pytest.raises(ValueError):
        dw.dims((1, 2))


@pytest.mark.parametrize("cl,s", [(1, 1), (0, 2)])
def test_providers_agree_with_the_float64_reference(cl, s):
    from pydl.ops import depthwise_conv2d_ref

    (x, w, b, stride), (dy,) = dw.make_inputs(dw.OP, dw.shape(2, 6, 11, 5, s, cl), torch.float32,
                                              torch.device("cpu"), 0)
    assert x.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    ref = depthwise_conv2d_ref(x, w, b, s, 2)
    assert dy.shape == ref.shape
    for fn in (dw.torch_fn(dw.OP), dw.pydl_fn(dw.OP), dw.pydl_fn(dw.OP, "native")):
        torch.testing.assert_close(fn(x, w, b, stride)[0].double(), ref, atol=1e-5, rtol=1e-5)


def test_suite_smoke_every_cpu_provider():
    cfg = SuiteConfig(device=torch.device("cpu"), dtypes=[torch.float32], modes=["fwd", "fwd+bwd"], quick=True,
                      policy=TINY, smoke=True, providers=["pydl", "pydl-native", core.EAGER])
    recs = dw.SUITE.run(cfg)
    assert {r.provider for r in recs} == {"pydl", "pydl-native", core.EAGER}
    for r in recs:
        assert r.status == OK and r.measurement is not None, (r.provider, r.note)
    lines = dw.report(report.finalize(recs, None, {"device": "cpu"}))
    assert lines[0] == "## Depthwise conv2d targets"
    assert any("not measured (no CUDA cells" in line for line in lines)


def test_target_table_reads_both_cpu_cells():
    rows = []
    for cl, ms in ((0, 9.0), (1, 11.0)):
        s = core.shape_str(dict(dw.CPU_TARGET, cl=cl))
        rows += [dict(suite=dw.NAME, mode="fwd+bwd", device="cpu", shape=s, dtype="float32", provider=p, status=OK,
                      p50_ms=v, pct_of_ceiling=40.0) for p, v in (("pydl", ms), (core.EAGER, 10.0))]
    lines = [line for line in dw.report(rows) if line.startswith("| CPU")]
    assert "NCHW" in lines[0] and "| met" in lines[0] and "channels_last" in lines[1] and "MISSED" in lines[1]
