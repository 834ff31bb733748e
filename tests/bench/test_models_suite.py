"""The ``models`` suite of the harness (pydl.bench.suites.models), on CPU: shapes, FLOPs, the
providers' agreement, a smoke run of every CPU provider, the target table."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pydl.bench import core, report, timing
from pydl.bench.suites import OK, SKIPPED, SuiteConfig

from pydl.bench.suites import models as ms  # noqa: E402
from pydl.models._timm import import_timm  # noqa: E402

try:  # timm imported through pydl's torchvision shim (a bare importorskip would die in torchvision)
    import_timm()
except ImportError as exc:  # pragma: no cover - timm is a test dependency
    pytest.skip(f"timm is not importable: {exc}", allow_module_level=True)

TINY = timing.TimingPolicy(budget_s=0.005, min_reps=2, max_reps=3, warmup_s=0.0, min_warmup=1, flush_l2=False)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # small inputs on big models: see tests/models/conftest.py
    yield
    torch.set_num_threads(before)


def test_shapes_and_ops():
    cpu = ms.default_shapes(torch.device("cpu"), quick=True)
    assert set(cpu) == set(ms.OPS)
    assert ms.CPU_TARGET in cpu["convnext_tiny"] and all(not cpu[op] for op in ms.OPS if ms.is_train(op))
    cuda = ms.default_shapes(torch.device("cuda"), quick=True)
    assert ms.GPU_TARGET in cuda["convnext_tiny.train"] and ms.GPU_TARGET in cuda["resnet50"]
    assert ms.modes("resnet50.train") == ("fwd+bwd",) and ms.modes("resnet50") == ("fwd",)
    assert ms.dims("B=8,S=224,cl=0") == (8, 224, 0) == ms.dims(core.shape_str(ms.CPU_TARGET))
    with pytest.raises(ValueError):
        ms.dims((1, 2))


def test_flops_are_the_published_ones():
    # ConvNeXt-T 4.47 GMACs, ResNet-50 4.09 GMACs per 224² image (2 FLOPs per MAC)
    assert ms.work("convnext_tiny", "fwd", ms.shape(8), torch.float32) == pytest.approx(8 * 8.91e9, rel=0.01)
    assert ms.work("resnet50", "fwd", ms.shape(1), torch.float32) == pytest.approx(8.18e9, rel=0.01)
    assert ms.work("resnet50.train", "fwd+bwd", ms.shape(2), torch.float32) == \
        3 * ms.work("resnet50", "fwd", ms.shape(2), torch.float32)


@pytest.mark.parametrize("op", ["convnext_tiny.train", "resnet50"])
def test_pydl_and_timm_providers_agree(op):
    inputs, grads = ms.make_inputs(op, ms.shape(2, 32, 1), torch.float32, torch.device("cpu"), 0)
    assert len(inputs) == 1 + len(ms.param_names(ms.base(op)))
    p, t = ms.model_fn(op, "pydl"), ms.model_fn(op, "timm")
    from pydl.bench import gate

    if ms.is_train(op):
        idx = gate.diff_indices(inputs)
        gp, gt = gate.run_grads(p, inputs, grads, idx), gate.run_grads(t, inputs, grads, idx)
        for a, b in zip(gp, gt):
            assert (a - b).norm() <= 2e-3 * b.norm() + 1e-6
    else:
        yp, yt = p(*inputs)[0], t(*inputs)[0]
        assert yp.shape == (2, ms.NUM_CLASSES) and (yp - yt).norm() <= 1e-4 * yt.norm()


def test_suite_smoke_every_cpu_provider():
    suite = dataclasses.replace(ms.SUITE, timing={})  # the test's tiny timing policy
    cfg = SuiteConfig(device=torch.device("cpu"), dtypes=[torch.float32], modes=list(core.MODES), quick=True,
                      policy=TINY, shapes=None, smoke=True, ops=["resnet50", "convnext_tiny.train"])
    recs = suite.run(cfg)
    assert {(r.op, r.mode) for r in recs} == {("resnet50", "fwd"), ("convnext_tiny.train", "fwd+bwd")}
    for r in recs:
        if r.provider in ("pydl", core.EAGER):
            assert r.status == OK and r.measurement is not None, (r.op, r.provider, r.note)
            assert r.metric == core.THROUGHPUT and r.flops > 0
        else:
            assert r.status == SKIPPED and "cuda" in r.note  # compile providers: CUDA rows
    rows = report.finalize(recs, None, {"device": "cpu"})
    lines = ms.report(rows)
    assert lines[0] == "## Models (images/s)" and any("resnet50" in line for line in lines)
    assert any("no such cell in this run" in line for line in lines)


def test_target_table_reads_the_cpu_cell():
    s = core.shape_str(ms.CPU_TARGET)
    rows = [dict(suite=ms.NAME, op="convnext_tiny", mode="fwd", device="cpu", shape=s, dtype="float32",
                 provider=p, status=OK, p50_ms=ms_) for p, ms_ in (("pydl", 400.0), (core.EAGER, 500.0))]
    line = next(line for line in ms.report(rows) if line.startswith("| CPU"))
    assert "1.25×" in line and "| met" in line
    assert any("| 20.0 | 16.0 |" in line for line in ms.report(rows))  # images/s
    rows[1]["p50_ms"] = 300.0
    assert "MISSED" in next(line for line in ms.report(rows) if line.startswith("| CPU"))
