"""The ``attention`` suite of the harness (pydl.bench.suites.attention), on CPU: its FLOP count,
shapes, inputs, the chunked reference, SDPA refusals, the score cap, a smoke run of every
provider that runs here, FlexAttention's forward, the forced Triton backend (interpreter on CPU)
and the target table."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pydl.bench import core, report, timing
from pydl.bench.ceilings import Ceilings
from pydl.bench.suites import COMPILE, EAGER, MISMATCH, OK, SKIPPED, SuiteConfig
from pydl.bench.suites import attention as att

TINY = timing.TimingPolicy(budget_s=0.005, min_reps=3, max_reps=6, warmup_s=0.0, min_warmup=1,
                           flush_l2=False)
SMALL = att.shape(2, 2, 48, 32)


def _cfg(**kw):
    base = dict(device=torch.device("cpu"), dtypes=[torch.float32], modes=["fwd", "bwd", "fwd+bwd"],
                quick=True, policy=TINY, shapes=[SMALL])
    base.update(kw)
    return SuiteConfig(**base)


def _everywhere(names):
    """The suite with the providers ``names`` allowed on every device."""
    return dataclasses.replace(att.SUITE, providers=tuple(
        dataclasses.replace(p, devices=("cpu", "cuda")) if p.name in names else p for p in att.SUITE.providers))


def _by(records, **match):
    return [r for r in records if all(getattr(r, k) == v for k, v in match.items())]


# ------------------------------------------------------------------------------ pieces

def test_flop_convention():
    b, h, n, d = 2, 3, 5, 8
    fwd = 4 * b * h * n * n * d
    assert att.flops(att.PLAIN, "fwd", b, h, n, n, d) == fwd
    assert att.flops(att.BOOL_MASK, "fwd", b, h, n, n, d) == fwd               # masks do not count
    assert att.flops(att.CAUSAL, "fwd", b, h, n, n, d) == fwd // 2
    assert att.flops(att.PLAIN, "bwd", b, h, n, n, d) == fwd * 5 // 2
    assert att.flops(att.PLAIN, "fwd+bwd", b, h, n, n, d) == fwd * 7 // 2
    assert att.flops(att.CAUSAL, "fwd+bwd", b, h, n, n, d) == fwd * 7 // 4
    assert att.flops(att.PLAIN, "fwd", 1, 1, 3, 7, 4) == 4 * 3 * 7 * 4          # Nq != Nk
    assert att.work(att.CAUSAL, "bwd", att.shape(b, h, n, d), torch.float32) == fwd * 5 // 4
    with pytest.raises(ValueError):
        att.flops("softmax", "fwd", b, h, n, n, d)
    with pytest.raises(ValueError):
        att.flops(att.PLAIN, "sideways", b, h, n, n, d)


def test_default_shapes_keep_tokens_and_width():
    cuda = [att.dims(s) for s in att.default_shapes(torch.device("cuda"), quick=False)]
    assert sorted({n for _, _, n, _ in cuda}) == list(att.N_CUDA) and {d for *_, d in cuda} == {64, 128}
    assert all(b * n == 16384 and h * d == 2048 for b, h, n, d in cuda)
    quick = [att.dims(s) for s in att.default_shapes(torch.device("cuda"), quick=True)]
    assert set(quick) < set(cuda) and {d for *_, d in quick} == {64, 128}
    cpu = [att.dims(s) for s in att.default_shapes(torch.device("cpu"), quick=False)]
    assert max(n for _, _, n, _ in cpu) <= 1024 and all(b * n == 2048 and h * d == 256 for b, h, n, d in cpu)
    assert len(att.default_shapes(torch.device("cpu"), quick=True)) == 1


def test_dims_accepts_dicts_tuples_and_their_strings():
    s = att.shape(2, 4, 128, 64)
    assert att.dims(s) == att.dims((2, 4, 128, 64)) == att.dims(core.shape_str(s)) == (2, 4, 128, 64)
    assert att.dims("2x4x128x64") == (2, 4, 128, 64)
    with pytest.raises(ValueError, match="BxHxNxD"):
        att.dims((128, 64))


def test_inputs_are_transposed_views_and_masks_keep_enough_keys():
    b, h, n, d = 3, 2, 40, 16
    (q, k, v), (do,) = att.make_inputs(att.PLAIN, att.shape(b, h, n, d), torch.bfloat16, torch.device("cpu"), 0)
    for t in (q, k, v):
        assert t.shape == (b, h, n, d) and t.dtype == torch.bfloat16
        assert t.stride(-1) == 1 and not t.is_contiguous() and t.stride(2) == h * d   # (B, N, H, D) memory
    assert do.shape == (b, h, n, d)
    (*_, keep), _ = att.make_inputs(att.BOOL_MASK, att.shape(b, h, n, d), torch.float32, torch.device("cpu"), 0)
    assert keep.shape == (b, 1, 1, n) and keep.dtype == torch.bool
    kept = keep.sum(-1).flatten().tolist()
    assert all(n // 2 < c < n for c in kept) and len(set(kept)) == b
    assert bool(keep[:, 0, 0, 0].all())                                            # no row fully masked
    (*_, bias), _ = att.make_inputs(att.FLOAT_MASK, att.shape(b, h, n, d), torch.bfloat16, torch.device("cpu"), 0)
    assert bias.shape == (n, n) and bias.dtype == torch.bfloat16 and bool(torch.isfinite(bias).all())


@pytest.mark.parametrize("op", att.OPS)
def test_composition_and_chunked_reference_match_float64(op, monkeypatch):
    """torch-eager's composition ≡ pydl's float64 attention_ref; the reference in row chunks
    (made small here) gives the same outputs and gradients."""
    from pydl.ops.attention import attention_ref

    inputs, (do,) = att.make_inputs(op, att.shape(2, 2, 37, 16), torch.float32, torch.device("cpu"), 3)
    q, k, v, *mask = inputs
    want = attention_ref(q, k, v, *mask, is_causal=op == att.CAUSAL)
    (got,) = att.eager_fn(op)(*inputs)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)

    monkeypatch.setattr(att, "REF_CHUNK_SCORES", 2 * 2 * 37 * 5)                 # 5 rows a chunk
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    whole = att.naive(*leaves, *mask, causal=op == att.CAUSAL)
    (chunked,) = att.reference_fn(op)(*leaves, *mask)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    for a, b in zip(torch.autograd.grad(chunked, leaves, do), torch.autograd.grad(whole, leaves, do)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------- providers / runs

def test_suite_smoke_every_cpu_provider():
    """--smoke on CPU: every op and mode; the CUDA-only providers are skipped with the reason."""
    recs = att.SUITE.run(_cfg(smoke=True, shapes=None, providers=[p.name for p in att.SUITE.providers
                                                                   if p.name != COMPILE]))
    assert {r.op for r in recs} == set(att.OPS) and {r.shape for r in recs} == {"B=2,H=2,N=80,D=64"}
    for r in recs:
        assert r.metric == core.THROUGHPUT and r.flops == att.work(r.op, r.mode, att.SUITE.smoke_shapes[0], None)
        if r.provider in ("pydl-triton", "sdpa-efficient", "sdpa-cudnn", "flex"):
            assert r.status == SKIPPED and "cuda only" in r.note
        else:
            assert r.status == OK and r.measurement is not None, (r.op, r.provider, r.mode, r.note)
            assert r.plot_x == 80 and r.plot_series == "D=64"
    rows = report.finalize(recs, None, {"device": "cpu"})
    lines = att.report(rows)
    assert lines[0].startswith("## Attention targets") and any("No CUDA cells" in line for line in lines)
    assert lines[-2].startswith("Attention targets: 0 check(s) not measured; 0 of 0")
    md = report.markdown(rows, {"device": "cpu"}, extra=lines)
    assert "## attention.bool_mask — bwd — float32 — cpu" in md and "best pydl TFLOP/s" in md


def test_torch_compile_provider_all_modes():
    recs = att.SUITE.run(_cfg(providers=[COMPILE], ops=[att.CAUSAL]))
    assert [(r.mode, r.status) for r in recs] == [("fwd", OK), ("bwd", OK), ("fwd+bwd", OK)], [r.note for r in recs]


def test_sdpa_backend_refusal_is_skipped_with_the_reason():
    """SDPA's efficient / cuDNN backends do not exist on CPU: forced there, they refuse."""
    suite = _everywhere({"sdpa-efficient", "sdpa-cudnn"})
    recs = suite.run(_cfg(providers=["sdpa-efficient", "sdpa-cudnn", "sdpa-flash", EAGER], ops=[att.BOOL_MASK],
                          modes=["fwd", "bwd"]))
    for name in ("sdpa-efficient", "sdpa-cudnn"):
        for r in _by(recs, provider=name):
            assert r.status == SKIPPED and f"{name} refuses this cell" in r.note, r.note
    assert all(r.status == OK for r in _by(recs, provider="sdpa-flash"))


def test_materializing_providers_skip_above_the_score_cap(monkeypatch):
    monkeypatch.setattr(att, "MAX_SCORES", 1000)                                   # SMALL has 2·2·48·48
    recs = att.SUITE.run(_cfg(providers=["pydl", "sdpa-math", EAGER], ops=[att.FLOAT_MASK]))
    for r in _by(recs, provider="sdpa-math") + _by(recs, provider=EAGER):
        assert r.status == SKIPPED and "materializes" in r.note and "scores" in r.note
    assert all(r.status == OK for r in _by(recs, provider="pydl"))                 # the gate still ran


@pytest.mark.slow
def test_flex_forward_on_cpu_and_its_missing_backward():
    """FlexAttention (compiled) with a block mask and with a score_mod: the forward passes the
    gate; its backward is skipped on CPU, saying why. (~25 s: two CPU compiles.)"""
    recs = _everywhere({"flex"}).run(_cfg(providers=["flex"], ops=[att.BOOL_MASK, att.FLOAT_MASK],
                                          modes=["fwd", "bwd"], shapes=[att.shape(2, 2, 64, 32)]))
    assert [(r.op, r.mode, r.status) for r in recs] == [
        (att.BOOL_MASK, "fwd", OK), (att.BOOL_MASK, "bwd", SKIPPED),
        (att.FLOAT_MASK, "fwd", OK), (att.FLOAT_MASK, "bwd", SKIPPED)], [r.note for r in recs]
    assert "backward" in recs[1].note and recs[1].note.startswith("flex:")


@pytest.mark.triton
def test_pydl_triton_provider_passes_the_gate(triton_device):
    """The forced Triton backend (on CPU: the interpreter) against the float32 reference."""
    dtype = torch.bfloat16 if triton_device.type == "cuda" else torch.float32
    recs = _everywhere({"pydl-triton"}).run(_cfg(device=triton_device, dtypes=[dtype], providers=["pydl-triton"],
                                                 ops=[att.BOOL_MASK], shapes=[att.shape(1, 2, 40, 32)]))
    assert [(r.mode, r.status) for r in recs] == [("fwd", OK), ("bwd", OK), ("fwd+bwd", OK)], [r.note for r in recs]


# ------------------------------------------------------------------------------ targets

def _row(provider, ms, op=att.PLAIN, mode="fwd", n=4096, d=128, dtype="bfloat16", status=OK, note="", flag=""):
    s = core.shape_str(att.shape(16384 // n, 2048 // d, n, d))
    return core.Record(op=op, provider=provider, mode=mode, shape=s, dtype=dtype, device="cuda", bytes_moved=None,
                       status=status, note=note, suite=att.NAME, metric=core.THROUGHPUT, flag=flag,
                       flops=att.work(op, mode, s, None),
                       measurement=None if ms is None else timing.Measurement(ms, ms, ms, 10, 1))


def test_target_table_verdicts():
    ceil = Ceilings(copy_gbps=4000.0, copy_bytes=1, matmul_tflops=800.0, matmul_desc="bfloat16 8192x8192x8192")
    recs = [
        # plain fwd N=4096: pydl 1.0 ms; flash 1.1 (met: 1.1×), cudnn 0.7 fastest (0.7× < 0.8: MISSED)
        _row("pydl", 1.0), _row("sdpa-flash", 1.1), _row("sdpa-cudnn", 0.7),
        _row("sdpa-efficient", None, status=SKIPPED, note="sdpa-efficient refuses this cell: ..."),
        # plain fwd N=1024: below N ≥ 2k, no target applies
        _row("pydl", 1.0, n=1024), _row("sdpa-flash", 0.5, n=1024),
        # bool mask bwd: 2.5× the fastest SDPA (met), flex missing (not measured)
        _row("pydl", 1.0, op=att.BOOL_MASK, mode="bwd"), _row("sdpa-efficient", 2.5, op=att.BOOL_MASK, mode="bwd"),
        _row("sdpa-math", 9.0, op=att.BOOL_MASK, mode="bwd"),
        _row("flex", None, op=att.BOOL_MASK, mode="bwd", status=SKIPPED, note="compile failed: boom"),
        # float mask fwd: pydl wrong -> MISSED whatever the time; flex flagged noisy
        _row("pydl", 0.1, op=att.FLOAT_MASK, status=MISMATCH, note="o: rel=1"),
        _row("sdpa-efficient", 1.0, op=att.FLOAT_MASK), _row("flex", 1.0, op=att.FLOAT_MASK, flag=core.NOISY),
    ]
    rows = report.finalize(recs, ceil, {"device": "cuda"})
    lines = att.report(rows)
    text = "\n".join(lines)
    table = [line for line in lines if line.startswith("| fwd") or line.startswith("| bwd")
             or line.startswith("| masked") or line.startswith("| fp32")]

    def verdict(target, cell):
        hits = [line for line in table if line.startswith(f"| {target} | {cell} |")]
        assert len(hits) == 1, (target, cell, table)
        return hits[0]

    flash = verdict("fwd ≥ 1.0× sdpa-flash", "attention fwd N=4096 D=128")
    assert "| sdpa-flash |" in flash and "1.10×" in flash and flash.endswith("| met |")
    fastest = verdict("fwd ≥ 0.8× fastest SDPA", "attention fwd N=4096 D=128")
    assert "| sdpa-cudnn |" in fastest and "0.70×" in fastest and "**MISSED**" in fastest
    assert not any("N=1024" in line for line in table)
    masked = verdict("masked ≥ 2× fastest SDPA", "attention.bool_mask bwd N=4096 D=128")
    assert "| sdpa-efficient |" in masked and "2.50×" in masked and masked.endswith("| met |")
    flex = verdict("masked ≥ 1.0× flex", "attention.bool_mask bwd N=4096 D=128")
    assert "not measured (flex: skipped compile failed: boom)" in flex
    wrong = verdict("masked ≥ 1.0× flex", "attention.float_mask fwd N=4096 D=128")
    assert "**MISSED** (pydl mismatch)" in wrong and "⚠noisy: do not trust" in wrong
    tflops = att.flops(att.PLAIN, "fwd", 4, 16, 4096, 4096, 128) / 1e-3 / 1e12      # pydl: 1 ms
    assert f"| {tflops:.3g} ({100 * tflops / 800:.0f}% of bfloat16 matmul) |" in flash
    assert "| fp32 ≥ 2× fastest SDPA (every op) | 0 | 0 | no cells in this run |" in text
    assert "| bwd ≥ 0.8× fastest SDPA (plain, causal; D 64/128, N ≥ 2k) | 0 | 0 | no cells in this run |" in text
    assert lines[-2] == "Attention targets: 1 check(s) not measured; 2 of 5 measured checks met."


def test_plots_split_by_head_dim(tmp_path):
    pytest.importorskip("matplotlib")
    recs = [_row("pydl", 1.0, n=n, d=d) for n in (2048, 4096) for d in (64, 128)]
    for r in recs:
        r.plot_x, r.plot_series = att.dims(r.shape)[2], f"D={att.dims(r.shape)[3]}"
    files, note = report.plots(report.finalize(recs, None, {"device": "cuda"}), str(tmp_path))
    assert note == "" and sorted(p.rsplit("/", 1)[-1] for p in files) == [
        "plot_attention_D128_bfloat16_cuda.png", "plot_attention_D64_bfloat16_cuda.png"]
