"""The ``conv2d`` suite of the harness (pydl.bench.suites.conv2d), on CPU: its FLOP count, shapes,
inputs, a smoke run of the CPU providers, the forced Triton provider (interpreter on CPU) and the
target table."""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("PYDL_CONV2D_AUTOTUNE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pydl.bench import core, report, timing  # noqa: E402
from pydl.bench.suites import COMPILE, EAGER, OK, SKIPPED, SuiteConfig  # noqa: E402
from pydl.bench.suites import conv2d as cs  # noqa: E402

TINY = timing.TimingPolicy(budget_s=0.005, min_reps=3, max_reps=6, warmup_s=0.0, min_warmup=1, flush_l2=False)


def _cfg(**kw):
    base = dict(device=torch.device("cpu"), dtypes=[torch.float32], modes=["fwd", "bwd"], quick=True, policy=TINY,
                shapes=None)
    base.update(kw)
    return SuiteConfig(**base)


def test_flops_and_dims():
    s = cs.shape(32, 64, 56, 56, 64, 3, 1, 1)
    assert cs.flops(s) == 2 * 32 * 56 * 56 * 64 * 64 * 9
    assert cs.out_hw(cs.shape(32, 128, 56, 56, 128, 3, 2, 1)) == (28, 28)
    assert cs.out_hw(cs.shape(2, 3, 224, 224, 96, 4, 4)) == (56, 56)
    assert all(cs.work(op, "fwd", s, None) == cs.flops(s) for op in cs.OPS)
    assert cs.dims(core.shape_str(s)) == cs.dims(s) == (32, 64, 56, 56, 64, 3, 1, 1)
    with pytest.raises(ValueError):
        cs.dims((1, 2))
    with pytest.raises(ValueError):
        cs.work("conv3d", "fwd", s, None)


def test_shapes_cover_resnet50_and_convnext():
    cuda = [cs.dims(s) for s in cs.default_shapes(torch.device("cuda"), quick=False)]
    assert {b for b, *_ in cuda} == {32, 64}
    for res, width in cs.RESNET_STAGES:                       # a 3×3 and a 1×1 at every stage
        assert (32, width, res, res, width, 3, 1, 1) in cuda and (32, width, res, res, 4 * width, 1, 1, 0) in cuda
    assert (32, 3, 224, 224, 96, 4, 4, 0) in cuda and (64, 96, 56, 56, 192, 2, 2, 0) in cuda
    quick = cs.default_shapes(torch.device("cuda"), quick=True)
    assert all(cs.dims(s)[0] == 32 for s in quick) and len(quick) == 6
    assert len(cs.default_shapes(torch.device("cpu"), quick=True)) == 3


def test_inputs_and_providers_agree():
    s = cs.shape(2, 8, 9, 9, 16, 3, 2, 1)
    (x, w), (dy,) = cs._make_inputs(cs.FWD, s, torch.float32, torch.device("cpu"), 0)
    assert x.is_contiguous(memory_format=torch.channels_last) and dy.shape == (2, 16, 5, 5)
    want = F.conv2d(x.double(), w.double(), None, 2, 1)
    for fn in (cs.torch_fn(cs.FWD), cs.nchw_fn(cs.FWD), cs.pydl_fn(cs.FWD)):
        torch.testing.assert_close(fn(x, w)[0].double(), want, atol=1e-5, rtol=1e-5)


def test_suite_smoke_cpu_providers():
    """--smoke on CPU: every op; the pydl providers are CUDA-only (pydl's CPU conv2d is F.conv2d)."""
    recs = cs.SUITE.run(_cfg(smoke=True, providers=[p.name for p in cs.SUITE.providers if p.name != COMPILE]))
    assert {r.op for r in recs} == set(cs.OPS) and {r.mode for r in recs} == {"fwd", "bwd"}
    for r in recs:
        assert r.metric == core.THROUGHPUT
        if r.provider.startswith("pydl"):
            assert r.status == SKIPPED and "cuda only" in r.note
        else:
            assert r.status == OK and r.measurement is not None, (r.op, r.provider, r.note)
    lines = cs.report(report.finalize(recs, None, {"device": "cpu"}))
    assert lines[0].startswith("## conv2d targets") and any("No CUDA cells" in line for line in lines)


@pytest.mark.triton
def test_pydl_triton_provider_passes_the_gate(triton_device):
    suite = dataclasses.replace(cs.SUITE, providers=tuple(
        dataclasses.replace(p, devices=("cpu", "cuda")) if p.name == "pydl-triton" else p for p in cs.SUITE.providers))
    dtype = torch.bfloat16 if triton_device.type == "cuda" else torch.float32
    recs = suite.run(_cfg(device=triton_device, dtypes=[dtype], providers=["pydl-triton"],
                          shapes=[cs.shape(1, 16, 5, 5, 16, 3, 1, 1)]))
    assert [(r.op, r.status) for r in recs] == [(op, OK) for op in cs.OPS], [r.note for r in recs]


def _row(provider, ms, op=cs.FWD, s=None, status=OK):
    s = core.shape_str(s or cs.shape(32, 64, 56, 56, 64, 3, 1, 1))
    return core.Record(op=op, provider=provider, mode="fwd" if op == cs.FWD else "bwd", shape=s, dtype="bfloat16",
                       device="cuda", bytes_moved=None, status=status, suite=cs.NAME, metric=core.THROUGHPUT,
                       flops=cs.flops(s), measurement=None if ms is None else timing.Measurement(ms, ms, ms, 10, 1))


def test_target_table_verdicts():
    one = cs.shape(32, 256, 56, 56, 64, 1)
    recs = [_row("pydl-triton", 1.0), _row(EAGER, 0.95), _row("torch-nchw", 1.2),          # fwd 0.95× ≥ 0.9: met
            _row("pydl-triton", 1.0, cs.DGRAD), _row(EAGER, 0.7, cs.DGRAD),                # 0.7× < 0.8: MISSED
            _row("pydl-triton", 1.0, cs.WGRAD, one), _row(EAGER, 0.99, cs.WGRAD, one),     # 1×1: 0.99 < 1.0
            _row("pydl-triton", None, cs.FWD, one, SKIPPED), _row(EAGER, 1.0, cs.FWD, one),
            _row("pydl-triton", 1.0, cs.FWD, cs.shape(32, 3, 224, 224, 96, 4, 4)),          # the stem: no target
            _row(EAGER, 1.0, cs.FWD, cs.shape(32, 3, 224, 224, 96, 4, 4))]
    lines = cs.report(report.finalize(recs, None, {"device": "cuda"}))
    text = "\n".join(lines)
    assert "| fwd | B=32 64→64 3×3 s1 @56 | bfloat16 |" in text and "0.95× | ≥ 0.9× | met |" in text
    assert "0.70× | ≥ 0.8× | **MISSED**" in text and "0.99× | ≥ 1.0× | **MISSED**" in text
    assert "| ≥ 1.0× | not measured |" in text and "| no target |" in text
    assert lines[-2] == "conv2d targets: 1 met, 2 missed, 1 not measured."
