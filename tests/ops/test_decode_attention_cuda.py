"""decode_attention on a CUDA GPU (@pytest.mark.cuda; skipped without one): the native split-K kernel
(csrc/cuda/decode_attention.cu) against the float64 reference, float32 / float16 / bfloat16 with the
2x rule of tests/tolerances.py (torch's own result: SDPA over each row's prefix in that dtype).
The cases mirror tests/cuda_emulation/test_decode_attention.cpp: lengths 0, 1, 17, Lmax and mixed,
NaN past the lengths, GQA 1..16, strided / misaligned caches (vector and scalar paths), one split and
many, plus a non-default stream, opcheck and torch.compile(fullgraph=True)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.tolerances import assert_close_to_ref

pytestmark = pytest.mark.cuda

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]


def _op():
    from pydl import ops  # lazily: collection never depends on the op module

    return ops.decode_attention


def _ref(*args, **kw):
    from pydl.ops.decode_attention import decode_attention_ref

    return decode_attention_ref(*args, **kw)


def _torch_in_dtype(q, k, v, lens, scale):
    """torch's own result in q's dtype: SDPA over each row's valid prefix (0 for length 0)."""
    B, H, _, _ = q.shape
    out = q.new_zeros((B, H, 1, v.shape[-1]))
    for b, n in enumerate(lens.tolist()):
        if n > 0:
            out[b:b + 1] = F.scaled_dot_product_attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n],
                                                          scale=scale, enable_gqa=True)
    return out


def _cache(B, Hkv, L, E, dtype, layout, lens):
    """A (B, Hkv, L, E) cache on the GPU in `layout`, NaN at every position at or past a row's length.
    layouts: contiguous; sliced (the first L positions of a longer cache); bshd (a (B, L, Hkv, E)
    buffer transposed); padded (E of an E + 8 buffer); misaligned (storage offset 1: scalar path)."""
    views = {
        "sliced": ((B, Hkv, L + 37, E), lambda t: t[:, :, :L]),
        "bshd": ((B, L, Hkv, E), lambda t: t.transpose(1, 2)),
        "padded": ((B, Hkv, L, E + 8), lambda t: t[..., :E]),
        "misaligned": ((B * Hkv * L * E + 1,), lambda t: t[1:].view(B, Hkv, L, E)),
    }
    shape, view = views.get(layout, ((B, Hkv, L, E), lambda t: t))
    base = torch.randn(shape).to(dtype)
    t = view(base)
    for b, n in enumerate(lens):
        t[b, :, max(n, 0):] = float("nan")
    return view(base.cuda())  # the view taken on the device: its strides and offset are kept


def _check(B, Hkv, G, L, E, Ev, lens, dtype, *, layout="contiguous", scale=None, lens_dtype=torch.int32):
    H = Hkv * G
    q = torch.randn(B, H, 1, E).mul(2).to(dtype).cuda()
    k = _cache(B, Hkv, L, E, dtype, layout, lens)
    v = _cache(B, Hkv, L, Ev, dtype, layout, lens)
    seq = torch.tensor(lens, dtype=lens_dtype, device="cuda")
    with torch.no_grad():
        out = _op()(q, k, v, seq, scale, backend="native")
    torch.cuda.synchronize()
    s = 1.0 / math.sqrt(E) if scale is None else scale
    ref = _ref(q, k, v, seq, s)
    touts = None if dtype == torch.float32 else _torch_in_dtype(q, k, v, seq, s)
    assert out.shape == (B, H, 1, Ev) and out.dtype == dtype
    assert torch.isfinite(out).all(), "NaN past the lengths leaked into the output"
    assert_close_to_ref(out, ref, touts, dtype=dtype, name="decode_attention")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G", [1, 2, 4, 8])
def test_mixed_lengths_gqa(G, dtype):
    """Lengths 0, 1, 17 and Lmax in one batch; B * Hkv = 4: the cache is split along L."""
    _check(4, 1, G, 300, 64, 64, [0, 1, 17, 300], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_split(dtype):
    """B * Hkv large enough to fill the GPU: one split, no workspace, no combine."""
    _check(64, 16, 2, 300, 128, 128, [300, 17, 0, 299, 1, 150, 256, 257], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,lens", [(4096, [4096]), (8192, [5000, 8192]), (1000, [1000, 643])])
def test_many_splits(L, lens, dtype):
    """Batch 1-2 with GQA 4: split into many blocks along L, merged by the combine kernel."""
    _check(len(lens), 2, 4, L, 128, 128, lens, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["sliced", "bshd", "padded", "misaligned"])
def test_strided_caches(layout, dtype):
    """Views of larger caches (vector path) and a misaligned one (scalar path)."""
    _check(3, 2, 4, 700, 64, 64, [700, 33, 512], dtype, layout=layout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E,Ev,G", [(7, 5, 3), (64, 32, 2), (256, 256, 8), (128, 128, 16), (16, 600, 2)])
def test_head_dims(E, Ev, G, dtype):
    """Odd head dims (scalar path), Ev != E, large heads, two head groups (G = 16), long value rows."""
    _check(2, 1, G, 333, E, Ev, [333, 100], dtype)


@pytest.mark.parametrize("lens_dtype", [torch.int32, torch.int64])
def test_scale_and_length_dtypes(lens_dtype):
    _check(2, 2, 2, 280, 64, 64, [280, 1], torch.bfloat16, scale=0.37, lens_dtype=lens_dtype)


def test_lengths_clamped_without_debug():
    """Documented: on CUDA a length above Lmax is clamped to Lmax (no host sync); PYDL_DEBUG checks."""
    from pydl.ops import decode_attention as mod

    if mod._DEBUG:
        pytest.skip("PYDL_DEBUG is set: lengths are checked on the host instead")
    q = torch.randn(2, 4, 1, 64, device="cuda")
    k = torch.randn(2, 2, 100, 64, device="cuda")
    v = torch.randn(2, 2, 100, 64, device="cuda")
    with torch.no_grad():
        got = _op()(q, k, v, torch.tensor([105, 100], device="cuda"), backend="native")
        want = _op()(q, k, v, torch.tensor([100, 100], device="cuda"), backend="native")
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_empty_cache():
    """Lmax = 0: every row has length 0 and gives 0."""
    q = torch.randn(2, 4, 1, 64, device="cuda")
    k = torch.randn(2, 2, 0, 64, device="cuda")
    with torch.no_grad():
        out = _op()(q, k, k, torch.zeros(2, dtype=torch.int32, device="cuda"), backend="native")
    assert torch.equal(out, torch.zeros_like(out))


def test_non_default_stream():
    """The kernels (split + combine) run on the current stream, not the legacy default stream."""
    q = torch.randn(1, 8, 1, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 1, 16384, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 1, 16384, 128, device="cuda", dtype=torch.bfloat16)
    seq = torch.tensor([16000], device="cuda")
    s = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(s), torch.no_grad():
        out = _op()(q, k, v, seq, backend="native") * 2
    s.synchronize()
    ref = _ref(q, k, v, seq) * 2
    assert_close_to_ref(out, ref, _torch_in_dtype(q, k, v, seq, 1 / math.sqrt(128)) * 2, dtype=torch.bfloat16)


def test_opcheck():
    _op()  # imports pydl.ops: registers pydl::decode_attention
    q = torch.randn(2, 4, 1, 64, device="cuda", dtype=torch.float16)
    k = torch.randn(2, 2, 300, 64, device="cuda", dtype=torch.float16)
    v = torch.randn(2, 2, 300, 64, device="cuda", dtype=torch.float16)
    seq = torch.tensor([300, 17], dtype=torch.int32, device="cuda")
    torch.library.opcheck(torch.ops.pydl.decode_attention.default, (q, k, v, seq, 0.125))


def test_compile_fullgraph():
    op = _op()

    def f(q, k, v, seq):
        return op(q, k, v, seq, backend="native") + 1

    q = torch.randn(2, 8, 1, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 2, 1024, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, 2, 1024, 128, device="cuda", dtype=torch.bfloat16)
    seq = torch.tensor([1024, 300], device="cuda")
    with torch.no_grad():
        got = torch.compile(f, fullgraph=True)(q, k, v, seq)
        want = f(q, k, v, seq)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
