"""The ``generate`` suite (end-to-end beam search, pydl vs Hugging Face generate) on CPU: shapes, a
smoke run of both providers whose outputs the gate compares (identical sequences), the report."""

from __future__ import annotations

import pytest
import torch

from pydl.bench import core, report, timing
from pydl.bench.suites import OK, SuiteConfig
from pydl.bench.suites import generate as gen

TINY = timing.TimingPolicy(budget_s=0.005, min_reps=1, max_reps=2, warmup_s=0.0, min_warmup=1, flush_l2=False)


def test_shapes():
    assert gen.dims(core.shape_str(gen.shape(1, 4, 16, 16, 4, 256))) == (1, 4, 16, 16, 4, 256)
    cuda = [gen.dims(s) for s in gen.default_shapes(torch.device("cuda"), quick=False)]
    assert all(s[4:] == (12, 768) for s in cuda) and {s[0] for s in cuda} == {1, 8}
    with pytest.raises(ValueError):
        gen.dims((1, 2))


def test_smoke_both_providers_agree():
    try:
        from pydl.models._timm import import_transformers

        import_transformers()
    except ImportError as exc:
        pytest.skip(str(exc))
    cfg = SuiteConfig(device=torch.device("cpu"), dtypes=[torch.float32], modes=["fwd"], quick=True, policy=TINY,
                      smoke=True)
    recs = gen.SUITE.run(cfg)
    assert {r.provider for r in recs} == {"pydl", core.EAGER}
    for r in recs:
        assert r.status == OK and r.measurement is not None, (r.provider, r.note)
    lines = gen.report(report.finalize(recs, None, {"device": "cpu"}))
    assert lines[0].startswith("## End-to-end beam search") and any("tokens" not in ln and "cpu" in ln for ln in lines)
