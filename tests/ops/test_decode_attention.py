"""decode_attention on CPU: SDPA over each row's valid prefix (float64), lengths 0 / 1 / 17 / Lmax and
mixed, NaN past the lengths, GQA, strided caches, dtypes, scale, the split path, the custom op
(opcheck, torch.compile, export), the grad routing, bad input, and torch backend == native.
(The CUDA native path: tests/ops/test_decode_attention_cuda.py.)"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

import pydl
from pydl.ops import decode_attention, decode_attention_ref
from tests.tolerances import assert_close_to_ref
from tests.utils.checks import assert_error_mentions, opcheck_calls, record_calls
from tests.utils.inputs import BF16, FP32, FP64

DA = sys.modules["pydl.ops.decode_attention"]
BACKENDS = ["native", "torch"]


def sdpa_prefix(q, k, v, lens, scale=None, dtype=FP64):
    """torch's SDPA over each row's valid prefix, in ``dtype``; rows of length 0 give 0."""
    B, H = q.shape[:2]
    out = torch.zeros((B, H, 1, v.shape[-1]), dtype=dtype)
    for b, n in enumerate(lens.tolist()):
        if n:
            out[b] = F.scaled_dot_product_attention(
                q[b:b + 1].to(dtype), k[b:b + 1, :, :n].to(dtype), v[b:b + 1, :, :n].to(dtype), scale=scale,
                enable_gqa=True)[0]
    return out


def make(B=4, H=4, Hkv=2, L=40, E=16, Ev=None, dtype=FP32, lens=None, ldtype=torch.int64):
    Ev = E if Ev is None else Ev
    q = torch.randn(B, H, 1, E, dtype=dtype)
    k = torch.randn(B, Hkv, L, E, dtype=dtype)
    v = torch.randn(B, Hkv, L, Ev, dtype=dtype)
    lens = torch.tensor(lens if lens is not None else [L] * B, dtype=ldtype)
    return q, k, v, lens


def poison_past_lengths(k, v, lens):
    """NaN at every position at or past each row's length (in place)."""
    for b, n in enumerate(lens.tolist()):
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")


def check(out, q, k, v, lens, scale=None):
    ref = sdpa_prefix(q, k, v, lens, scale)
    torch_out = sdpa_prefix(q, k, v, lens, scale, dtype=q.dtype) if q.dtype == BF16 else None
    assert out.shape == (q.shape[0], q.shape[1], 1, v.shape[-1]) and out.dtype == q.dtype
    assert_close_to_ref(out, ref, torch_out, dtype=q.dtype, name="decode_attention")


# ---- values --------------------------------------------------------------------------------------

def test_reference_is_sdpa_over_prefix():
    q, k, v, lens = make(dtype=FP64, lens=[0, 1, 17, 40])
    poison_past_lengths(k, v, lens)
    torch.testing.assert_close(decode_attention_ref(q, k, v, lens), sdpa_prefix(q, k, v, lens), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [FP32, FP64, BF16], ids=str)
@pytest.mark.parametrize("G", [1, 2, 4, 8])
@pytest.mark.parametrize("E", [24, 64])  # 64: the CPU kernel's compile-time head dim
def test_matches_sdpa_over_prefix(backend, dtype, G, E):
    L = 97
    q, k, v, lens = make(B=5, H=2 * G, Hkv=2, L=L, E=E, dtype=dtype, lens=[0, 1, 17, L, 64])
    check(decode_attention(q, k, v, lens, backend=backend), q, k, v, lens)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lens", [[0], [1], [17], [300], [0, 300, 1, 17, 299, 64]], ids=str)
def test_lengths(backend, lens):
    q, k, v, t = make(B=len(lens), H=4, Hkv=1, L=300, E=64, lens=lens, ldtype=torch.int32)
    out = decode_attention(q, k, v, t, backend=backend)
    check(out, q, k, v, t)
    assert torch.equal(out[t == 0], torch.zeros_like(out[t == 0]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=str)
@pytest.mark.parametrize("E,Hkv", [(32, 2), (64, 8), (64, 2)], ids=str)
def test_nan_past_lengths_changes_nothing(backend, dtype, E, Hkv):
    q, k, v, lens = make(B=4, H=8, Hkv=Hkv, L=130, E=E, dtype=dtype, lens=[0, 1, 67, 129])
    clean = decode_attention(q, k, v, lens, backend=backend)
    poison_past_lengths(k, v, lens)
    out = decode_attention(q, k, v, lens, backend=backend)
    assert not out.isnan().any()
    assert torch.equal(out, clean)


@pytest.mark.parametrize("dtype", [FP32, BF16, FP64], ids=str)
@pytest.mark.parametrize("E,Ev", [(20, 36), (5, 3), (67, 9), (64, 32)], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_and_value_head_dim(backend, E, Ev, dtype):
    """Head dims that are not whole vectors (the CPU kernel's scalar tails; 5 and 3: tails only)."""
    q, k, v, lens = make(B=3, H=6, Hkv=3, L=150, E=E, Ev=Ev, dtype=dtype, lens=[150, 3, 131])
    check(decode_attention(q, k, v, lens, 0.3, backend=backend), q, k, v, lens, scale=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_caches(backend):
    """Slices of a larger pre-allocated cache, a (B, L, Hkv, E) buffer transposed, a transposed q."""
    B, H, Hkv, L, E = 3, 8, 2, 45, 32
    big_k, big_v = torch.randn(B, Hkv + 1, 2 * L, E), torch.randn(B, Hkv + 1, 2 * L, E + 8)
    k, v = big_k[:, 1:, :L], big_v[:, 1:, :L, 4:E + 4]  # strides of the big cache, offset data
    q = torch.randn(B, 1, H, E).transpose(1, 2)  # (B, H, 1, E), head stride E, batch stride H * E
    lens = torch.tensor([45, 0, 20])
    assert not k.is_contiguous() and not v.is_contiguous()
    check(decode_attention(q, k, v, lens, backend=backend), q, k, v, lens)
    kt = torch.randn(B, L, Hkv, E).transpose(1, 2)  # the (B, L, Hkv, E) layout of some caches
    vt = torch.randn(B, L, Hkv, E).transpose(1, 2)
    check(decode_attention(q, kt, vt, lens, backend=backend), q, kt, vt, lens)


def test_non_unit_last_stride_is_copied():
    q, k, v, lens = make(B=2, H=2, Hkv=2, L=10, E=8, lens=[10, 4])
    kk = torch.randn(2, 2, 10, 16)[..., ::2]
    check(decode_attention(q, kk, v, lens, backend="native"), q, kk, v, lens)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=str)
def test_split_path(dtype):
    """Few (row, KV head) pairs and several threads: rows are split along L and recombined;
    splits past a row's length are empty."""
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        for lens in ([1500], [700], [0, 1025], [3, 1500]):
            q, k, v, t = make(B=len(lens), H=8, Hkv=1, L=1500, E=64, dtype=dtype, lens=lens)
            poison_past_lengths(k, v, t)
            check(decode_attention(q, k, v, t, backend="native"), q, k, v, t)
    finally:
        torch.set_num_threads(threads)


def test_torch_backend_equals_native():
    q, k, v, lens = make(B=4, H=8, Hkv=2, L=77, E=64, lens=[77, 0, 5, 60])
    torch.testing.assert_close(decode_attention(q, k, v, lens, backend="native"),
                               decode_attention(q, k, v, lens, backend="torch"), atol=2e-6, rtol=1e-5)


def test_empty_batch_and_heads():
    q, k, v, lens = make(B=0, H=4, Hkv=2, L=8, E=16)
    for backend in BACKENDS:
        assert decode_attention(q, k, v, lens, backend=backend).shape == (0, 4, 1, 16)
    q, k, v, lens = make(B=2, H=2, Hkv=2, L=0, E=16, lens=[0, 0])
    for backend in BACKENDS:
        assert torch.equal(decode_attention(q, k, v, lens, backend=backend), torch.zeros(2, 2, 1, 16))


# ---- dispatch, grad routing, custom op, compile ---------------------------------------------------

def test_default_backend_is_native_on_cpu():
    q, k, v, _ = make()
    assert DA.choose_backend(q, k, v) == "native"
    assert DA.choose_backend(q.half(), k.half(), v.half()) == "torch"


def test_requires_grad_goes_to_the_differentiable_torch_backend():
    q, k, v, lens = make(B=2, H=4, Hkv=2, L=12, E=8, dtype=FP64, lens=[12, 5])
    q.requires_grad_()
    assert DA.choose_backend(q, k, v) == "torch"
    out = decode_attention(q, k, v, lens)
    assert out.requires_grad
    assert torch.autograd.gradcheck(lambda q_: decode_attention(q_, k, v, lens), (q,))
    with pytest.raises(pydl.BackendError) as e:
        decode_attention(q, k, v, lens, backend="native")
    assert_error_mentions(e, "require grad")
    with torch.no_grad():
        assert DA.choose_backend(q, k, v) == "native"
        check(decode_attention(q, k, v, lens), q, k, v, lens)


def test_opcheck():
    q, k, v, lens = make(B=3, H=4, Hkv=2, L=20, E=16, lens=[20, 0, 7])
    calls = record_calls(lambda: decode_attention(q, k, v, lens))
    assert [c[0]._schema.name for c in calls] == ["pydl::decode_attention"]
    opcheck_calls(calls)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=str)
def test_compile_fullgraph(dtype):
    torch._dynamo.reset()
    q, k, v, lens = make(B=3, H=4, Hkv=2, L=33, E=16, dtype=dtype, lens=[33, 1, 0])
    fn = torch.compile(lambda *a: decode_attention(*a) * 2, fullgraph=True)
    out = fn(q, k, v, lens)
    assert torch.equal(out, decode_attention(q, k, v, lens) * 2)


def test_export():
    class M(torch.nn.Module):
        def forward(self, q, k, v, lens):
            return decode_attention(q, k, v, lens)

    q, k, v, lens = make(B=2, H=4, Hkv=2, L=9, E=8, lens=[9, 4])
    ep = torch.export.export(M(), (q, k, v, lens))
    assert torch.equal(ep.module()(q, k, v, lens), decode_attention(q, k, v, lens))


def test_vmap():
    q, k, v, lens = make(B=2, H=4, Hkv=2, L=9, E=8, lens=[9, 4])
    qs = torch.stack([q, 2 * q])
    out = torch.vmap(lambda q_: decode_attention(q_, k, v, lens))(qs)
    torch.testing.assert_close(out[1], decode_attention(2 * q, k, v, lens))


# ---- bad input -------------------------------------------------------------------------------------

def _bad(**over):
    q, k, v, lens = make(B=2, H=4, Hkv=2, L=10, E=8, lens=[10, 3])
    args = dict(q=q, k_cache=k, v_cache=v, cache_seqlens=lens)
    args.update({n: f(args) for n, f in over.items()})
    return args


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what,over,exc,words", [
    ("q rank", dict(q=lambda a: a["q"][:, :, 0]), ValueError, ["q", "4 dims"]),
    ("q two tokens", dict(q=lambda a: torch.cat([a["q"]] * 2, 2)), ValueError, ["q", "(B, H, 1, E)"]),
    ("E mismatch", dict(k_cache=lambda a: a["k_cache"][..., :4]), ValueError, ["k_cache"]),
    ("batch mismatch", dict(k_cache=lambda a: a["k_cache"][:1]), ValueError, ["k_cache"]),
    ("v length", dict(v_cache=lambda a: a["v_cache"][:, :, :5]), ValueError, ["v_cache"]),
    ("v heads", dict(v_cache=lambda a: a["v_cache"][:, :1]), ValueError, ["v_cache"]),
    ("H % Hkv", dict(k_cache=lambda a: torch.randn(2, 3, 10, 8), v_cache=lambda a: torch.randn(2, 3, 10, 8)),
     ValueError, ["multiple"]),
    ("dtype mix", dict(k_cache=lambda a: a["k_cache"].double()), TypeError, ["dtype"]),
    ("int q", dict(q=lambda a: a["q"].long()), TypeError, ["q"]),
    ("lens shape", dict(cache_seqlens=lambda a: a["cache_seqlens"][:1]), ValueError, ["cache_seqlens"]),
    ("lens 2d", dict(cache_seqlens=lambda a: a["cache_seqlens"][None]), ValueError, ["cache_seqlens"]),
    ("lens dtype", dict(cache_seqlens=lambda a: a["cache_seqlens"].float()), TypeError, ["cache_seqlens", "int32"]),
    ("lens int16", dict(cache_seqlens=lambda a: a["cache_seqlens"].short()), TypeError, ["cache_seqlens"]),
    ("lens list", dict(cache_seqlens=lambda a: [10, 3]), TypeError, ["cache_seqlens"]),
    ("lens device", dict(cache_seqlens=lambda a: a["cache_seqlens"].to("meta")), ValueError, ["cache_seqlens"]),
    ("length > L", dict(cache_seqlens=lambda a: torch.tensor([11, 3])), ValueError, ["cache_seqlens", "11"]),
    ("negative length", dict(cache_seqlens=lambda a: torch.tensor([10, -1], dtype=torch.int32)), ValueError,
     ["cache_seqlens", "-1"]),
])
def test_bad_input(backend, what, over, exc, words):
    with pytest.raises(exc) as e:
        decode_attention(**_bad(**over), backend=backend)
    assert_error_mentions(e, *words)


def test_bad_scale():
    with pytest.raises(TypeError) as e:
        decode_attention(**_bad(), scale=float("nan"))
    assert_error_mentions(e, "scale")


def test_native_binding_checks_its_arguments():
    """The C++ safety net for direct pydl._C callers: shapes, dtype codes and lengths."""
    from pydl import _native

    c = _native.module()
    q, k, v, lens = make(B=2, H=4, Hkv=2, L=10, E=8, lens=[10, 3], ldtype=torch.int32)
    out = torch.empty(2, 4, 1, 8)

    def call(H=4, Hkv=2, lens_ptr=lens.data_ptr(), lens_code=4, dtype=0):
        c.decode_attention_cpu(2, H, Hkv, 10, 8, 8, dtype, q.data_ptr(), 32, 8, k.data_ptr(), 160, 80, 8,
                               v.data_ptr(), 160, 80, 8, lens_ptr, lens_code, out.data_ptr(), 32, 8, 0.5, 1)

    call()
    check(out, q, k, v, lens, scale=0.5)
    with pytest.raises(ValueError, match="multiple"):
        call(Hkv=3)
    with pytest.raises(ValueError, match="cache_seqlens must have dtype int32 or int64"):
        call(lens_code=0)
    with pytest.raises(ValueError, match="float16"):
        call(dtype=1)
    bad = torch.tensor([10, 11], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] = 11 is outside \[0, 10\]"):
        call(lens_ptr=bad.data_ptr())
