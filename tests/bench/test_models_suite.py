"""The ``models`` suite of the harness (pydl.bench.suites.models), on CPU: shapes, FLOPs, the
providers' agreement (pydl.models and the pydl.patch'ed timm / Hugging Face model against the
unpatched one), a smoke run of every CPU provider, the report and target tables."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pydl.bench import core, gate, report, timing
from pydl.bench.suites import OK, SKIPPED, SuiteConfig
from pydl.bench.suites import _models_lm as lm
from pydl.bench.suites import _models_vision as vision
from pydl.bench.suites import models as ms
from pydl.models._timm import import_timm, import_transformers

try:  # timm imported through pydl's torchvision shim (a bare importorskip would die in torchvision)
    import_timm()
    import_transformers().logging.set_verbosity_error()
except ImportError as exc:  # pragma: no cover - timm and transformers are test dependencies
    pytest.skip(f"timm / transformers are not importable: {exc}", allow_module_level=True)

TINY = timing.TimingPolicy(budget_s=0.005, min_reps=2, max_reps=3, warmup_s=0.0, min_warmup=1, flush_l2=False)
CPU = torch.device("cpu")
VIT = "vit_small_patch16_224"


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # small inputs on big models: see tests/models/conftest.py
    yield
    torch.set_num_threads(before)


def test_shapes_and_ops():
    assert set(ms.OPS) == {m + t for m in ("convnext_tiny", "resnet50", VIT, "gpt2") for t in ("", ".train")}
    cpu = ms.default_shapes(CPU, quick=True)
    assert set(cpu) == set(ms.OPS)
    assert all(cpu[op] == [ms.CPU_TARGET] for op in ("convnext_tiny", "resnet50", VIT))
    assert all(not cpu[op] for op in ms.OPS if ms.is_train(op) and ms.family(op) is vision)
    assert cpu["gpt2"] == cpu["gpt2.train"] == [lm.shape(1, 64)]
    full = ms.default_shapes(CPU, quick=False)
    assert vision.shape(8, 224, 1) in full["resnet50"] and full[VIT] == [ms.CPU_TARGET]
    assert lm.shape(1, 128) in full["gpt2.train"]
    cuda = ms.default_shapes(torch.device("cuda"), quick=True)
    assert ms.GPU_TARGET in cuda["convnext_tiny.train"] and ms.GPU_TARGET in cuda[VIT + ".train"]
    assert cuda["gpt2.train"] == [ms.LM_GPU_TARGET] == [lm.shape(8, 1024)]
    assert ms.modes("resnet50.train") == ("fwd+bwd",) and ms.modes("gpt2") == ("fwd",)


def test_shape_forms():
    assert vision.dims("B=8,S=224,cl=0") == (8, 224, 0) == vision.dims(core.shape_str(ms.CPU_TARGET))
    assert lm.dims("B=1,T=128") == (1, 128, 12, 768) == lm.dims((1, 128, 12, 768))
    for sh, fam in (("B=8,S=224,cl=0", vision), ((8, 224, 1), vision), ("B=8,T=1024,L=12,D=768", lm),
                    ((1, 128, 2, 64), lm), (ms.LM_GPU_TARGET, lm)):
        assert ms.shape_family(sh) is fam
    assert ms.SUITE.plot_x(ms.LM_GPU_TARGET) == 8 and ms.SUITE.plot_series(ms.LM_GPU_TARGET) == "T=1024,L=12,D=768"
    assert ms.SUITE.plot_series(ms.CPU_TARGET) == "S=224,cl=0"
    for bad, fam in (((1, 2), vision), ("B=1,T=2048", lm), ("B=1,T=8,L=49", lm)):
        with pytest.raises(ValueError):
            fam.dims(bad)


def test_flops_are_the_published_ones():
    # ConvNeXt-T 4.47, ResNet-50 4.09, ViT-S/16 4.6 GMACs per 224² image (2 FLOPs per MAC)
    assert ms.work("convnext_tiny", "fwd", vision.shape(8), torch.float32) == pytest.approx(8 * 8.91e9, rel=0.01)
    assert ms.work("resnet50", "fwd", vision.shape(1), torch.float32) == pytest.approx(8.18e9, rel=0.01)
    assert ms.work(VIT, "fwd", vision.shape(1), torch.float32) == pytest.approx(9.2e9, rel=0.01)
    assert ms.work("resnet50.train", "fwd+bwd", vision.shape(2), torch.float32) == \
        3 * ms.work("resnet50", "fwd", vision.shape(2), torch.float32)
    # GPT-2 small: 85M matmul weights in the layers + the 38.6M LM head, 2 FLOPs each per token, + attention
    b, t = 8, 1024
    assert ms.work("gpt2", "fwd", ms.LM_GPU_TARGET, torch.float32) == \
        b * t * (2 * (12 * 12 * 768**2 + 50257 * 768) + 4 * 12 * t * 768)
    assert ms.work("gpt2.train", "fwd+bwd", ms.LM_GPU_TARGET, torch.float32) == \
        3 * ms.work("gpt2", "fwd", ms.LM_GPU_TARGET, torch.float32)


def test_gpt2_flops_match_the_flop_counter():
    """The formula is what torch's FLOP counter finds in the Hugging Face model (math SDPA: its T×T
    products are counted like the formula's, in full)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    sh = lm.shape(2, 8, 2, 64)
    fn = ms.model_fn("gpt2", "ref")
    inputs, _ = ms.make_inputs("gpt2", sh, torch.float32, CPU, 0)
    with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):
        fn(*inputs)
    assert fc.get_total_flops() == ms.work("gpt2", "fwd", sh, torch.float32)


@pytest.mark.parametrize("op", ["convnext_tiny.train", "resnet50", VIT, "gpt2", "gpt2.train"])
def test_providers_agree_with_the_reference(op):
    sh = ms.smoke_shapes()[op][0]
    inputs, grads = ms.make_inputs(op, sh, torch.float32, CPU, 0)
    ref = ms.model_fn(op, "ref")
    providers = {"patched": ms.model_fn(op, "ref", patched=True)}
    if ms.base(op) in ms.PYDL_MODELS:
        providers["pydl"] = ms.model_fn(op, "pydl")
    else:
        with pytest.raises(ValueError, match="no pydl.models model"):
            ms.model_fn(op, "pydl")
    idx = gate.diff_indices(inputs)
    want = gate.run_grads(ref, inputs, grads, idx) if ms.is_train(op) else ref(*inputs)
    assert len(want) == (len(idx) if ms.is_train(op) else len(ms.family(op).OUT_NAMES))
    for name, fn in providers.items():
        got = gate.run_grads(fn, inputs, grads, idx) if ms.is_train(op) else fn(*inputs)
        for a, b in zip(got, want):
            assert a.shape == b.shape and (a - b).norm() <= 2e-3 * b.norm() + 1e-6, name
    (model, _), = providers["patched"].built.values()  # the patch took pydl's ops into the model
    assert sum("_pydl_patch" in m.__dict__ for m in model.modules()) > 0


def test_gpt2_inputs_are_hugging_face_layout():
    """One parameter set for both models: HF's Conv1D (in, out) weights, bound transposed into pydl's GPT."""
    sh = lm.shape(1, 4, 2, 64)
    inputs, grads = ms.make_inputs("gpt2.train", sh, torch.bfloat16, CPU, 0)
    ids, amp, *params = inputs
    names = lm.param_names("gpt2", (2, 64))
    assert ids.dtype == torch.int64 and amp.dtype == torch.bfloat16 and amp.shape == (1,)
    assert dict(zip(names, params))["transformer.h.1.mlp.c_fc.weight"].shape == (64, 256)
    assert all(p.dtype == torch.float32 for p in params) and grads[0].shape == (1, 4, lm.VOCAB)
    assert lm.grad_names("gpt2")[1:len(names) + 1] == tuple("d" + n.removeprefix("transformer.") for n in names)
    transposed = dict(lm.binding("pydl", names))  # pydl's name -> bound transposed
    assert transposed["h.0.attn.c_attn.weight"] is True and transposed["h.0.attn.c_attn.bias"] is False


def test_suite_smoke_every_cpu_provider():
    suite = dataclasses.replace(ms.SUITE, timing={})  # the test's tiny timing policy
    ops = ["resnet50", "convnext_tiny.train", VIT, "gpt2.train"]
    cfg = SuiteConfig(device=CPU, dtypes=[torch.float32], modes=list(core.MODES), quick=True,
                      policy=TINY, shapes=None, smoke=True, ops=ops)
    recs = suite.run(cfg)
    assert {(r.op, r.mode) for r in recs} == {(op, ms.modes(op)[0]) for op in ops}
    for r in recs:
        if r.provider in (core.COMPILE, "pydl-compile"):
            assert r.status == SKIPPED and "cuda" in r.note  # compile providers: CUDA rows
        elif r.provider == "pydl" and r.op == VIT:
            assert r.status == SKIPPED and "no pydl.models model" in r.note
        else:
            assert r.status == OK and r.measurement is not None, (r.op, r.provider, r.note)
            assert r.metric == core.THROUGHPUT and r.flops == ms.work(r.op, r.mode, ms.smoke_shapes()[r.op][0], None)
    lines = ms.report(report.finalize(recs, None, {"device": "cpu"}))
    assert lines[0] == "## Models (images/s; gpt2: tokens/s)"
    assert {op for op in ops if any(f"| cpu | {op} |" in line for line in lines)} == set(ops)
    assert sum("(no such cell in this run)" in line for line in lines) == 2
    assert sum("not measured (no CUDA cell in this run)" in line for line in lines) == 5


def test_low_precision_gate_passes_gpt2():
    """bfloat16 (the CUDA dtype), run on CPU: autocast from the amp input, the float32 reference of the
    gate (amp upcast), every provider's gradients within the low-precision tolerances."""
    suite = dataclasses.replace(ms.SUITE, timing={})
    cfg = SuiteConfig(device=CPU, dtypes=[torch.bfloat16], modes=list(core.MODES), quick=True, policy=TINY,
                      shapes=None, smoke=True, ops=["gpt2.train"], providers=["pydl", core.EAGER, ms.PATCHED])
    recs = suite.run(cfg)
    assert [(r.provider, r.status) for r in recs] == [("pydl", OK), (core.EAGER, OK), (ms.PATCHED, OK)], \
        [r.note for r in recs]


def _rows(device, op, sh, dtype, **p50):
    return [dict(suite=ms.NAME, op=op, mode=ms.modes(op)[0], device=device, shape=core.shape_str(sh), dtype=dtype,
                 provider=p.replace("_", "-"), status=OK, p50_ms=t) for p, t in p50.items()]


def _target(lines, start):
    return next(line for line in lines if line.startswith("| " + start))


def test_target_table_reads_the_cells():
    rows = _rows("cpu", "convnext_tiny", ms.CPU_TARGET, "float32", pydl=400.0, torch_eager=500.0, patched=450.0)
    rows += _rows("cuda", "gpt2.train", ms.LM_GPU_TARGET, "bfloat16", pydl=100.0, torch_eager=120.0, patched=112.0)
    lines = ms.report(rows)
    assert "1.25×" in _target(lines, "CPU ConvNeXt-T inference: pydl") and \
        "| met" in _target(lines, "CPU ConvNeXt-T inference: pydl")
    assert "1.11×" in _target(lines, "CPU ConvNeXt-T inference: patched")
    assert "| met" in _target(lines, "GPU GPT-2-small training step: pydl")  # 1.2× >= 1.1×
    assert "**MISSED**" in _target(lines, "GPU GPT-2-small training step: patched")  # 1.07× < 1.1×
    assert "no CUDA cell" in _target(lines, "GPU ConvNeXt-T training step: patched")
    # images/s (B=8: pydl, eager, —, —, patched) and tokens/s (B·T = 8192), the two ratios
    assert any("| 20.0 | 16.0 | — | — | 17.8 | 1.25× | 1.11× |" in line for line in lines)
    assert any("| 81920.0 | 68266.7 | — | — | 73142.9 | 1.20× | 1.07× |" in line for line in lines)
    rows[1]["p50_ms"] = 300.0
    assert "MISSED" in _target(ms.report(rows), "CPU ConvNeXt-T inference: pydl")
