"""attention_varlen: packed sequences ≡ each sequence alone (≡ padded attention), on the torch
backend and the triton backend (interpreter on CPU), every gradient, GQA, causal, empty
sequences, torch.compile, and bad input."""

from __future__ import annotations

import pytest
import torch

from pydl.ops.attention import attention
from pydl.ops.attention_varlen import attention_varlen, attention_varlen_ref
from tests.ops.attention_cases import float64_leaves
from tests.tolerances import assert_close_to_ref
from tests.utils.checks import assert_error_mentions, grads
from tests.utils.inputs import BF16, FP32, dtype_id

LENGTHS = [([5, 17, 1, 0, 9], [7, 17, 3, 4, 0]), ([33], [33]), ([1, 2, 3], [3, 2, 1])]


def _packed(lens_q, lens_k, H=4, Hkv=2, E=24, EV=16, dtype=FP32, device="cpu"):
    cu = lambda lens: torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32,  # noqa: E731
                                   device=device)
    mk = lambda n, h, d: torch.randn(n, h, d).to(dtype=dtype, device=device).requires_grad_()  # noqa: E731
    return (mk(sum(lens_q), H, E), mk(sum(lens_k), Hkv, E), mk(sum(lens_k), Hkv, EV), cu(lens_q), cu(lens_k),
            max(lens_q), max(lens_k))


def _check(backend, lens_q, lens_k, causal, dtype=FP32, device="cpu"):
    q, k, v, cu_q, cu_k, mq, mk = _packed(lens_q, lens_k, dtype=dtype, device=device)
    out = attention_varlen(q, k, v, cu_q, cu_k, mq, mk, is_causal=causal, backend=backend)
    exact = float64_leaves([q, k, v])
    ref = attention_varlen_ref(*exact, cu_q, cu_k, is_causal=causal)
    tout = attention_varlen(q, k, v, cu_q, cu_k, mq, mk, is_causal=causal, backend="torch")
    assert out.shape == (q.shape[0], 4, 16) and out.dtype == dtype
    assert_close_to_ref(out, ref, tout, dtype=dtype, name="varlen out")
    do = torch.randn(out.shape).to(dtype=dtype, device=device)
    for name, g, w, t in zip("qkv", grads([out], [q, k, v], [do]), grads([ref], exact, [do.double()]),
                             grads([tout], [q, k, v], [do])):
        assert_close_to_ref(g, w, t, dtype=dtype, name=f"varlen d{name}")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lens", LENGTHS, ids=["mixed", "one", "short"])
def test_torch_backend(lens, causal):
    _check("torch", *lens, causal)


@pytest.mark.triton
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lens", LENGTHS, ids=["mixed", "one", "short"])
def test_triton_backend(lens, causal, triton_device):
    _check("triton", *lens, causal, device=triton_device)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [BF16], ids=dtype_id)
def test_triton_low_precision(dtype, triton_device):
    _check("triton", *LENGTHS[0], True, dtype=dtype, device=triton_device)


@pytest.mark.triton
def test_varlen_equals_dense_attention(triton_device):
    """Equal-length packed sequences are exactly the dense (B, H, N, E) call."""
    q, k, v, cu_q, cu_k, mq, mk = _packed([11, 11, 11], [11, 11, 11], device=triton_device)
    out = attention_varlen(q, k, v, cu_q, cu_k, mq, mk, is_causal=True, backend="triton")
    dense = lambda t: t.detach().view(3, 11, *t.shape[1:]).transpose(1, 2)  # noqa: E731
    want = attention(dense(q), dense(k), dense(v), is_causal=True, enable_gqa=True, backend="triton")
    torch.testing.assert_close(out, want.transpose(1, 2).reshape(33, 4, 16), atol=1e-6, rtol=1e-6)


@pytest.mark.triton
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_fullgraph(backend, triton_device):
    torch._dynamo.reset()
    q, k, v, cu_q, cu_k, mq, mk = _packed(*LENGTHS[0], device=triton_device)
    fn = torch.compile(lambda *a: attention_varlen(*a, is_causal=True, backend=backend), fullgraph=True)
    out = fn(q, k, v, cu_q, cu_k, mq, mk)
    torch.testing.assert_close(out.double(), attention_varlen_ref(q, k, v, cu_q, cu_k, is_causal=True),
                               atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("mutate,exc,words", [
    (lambda a: {**a, "cu_seqlens_q": a["cu_seqlens_q"].long()}, TypeError, ["int32"]),
    (lambda a: {**a, "max_seqlen_q": 3}, ValueError, ["max_seqlen_q"]),
    (lambda a: {**a, "cu_seqlens_k": a["cu_seqlens_k"] * 2}, ValueError, ["cu_seqlens_k"]),
    (lambda a: {**a, "cu_seqlens_k": a["cu_seqlens_k"][:-1]}, ValueError, ["same length"]),
    (lambda a: {**a, "k": a["k"][..., :8]}, ValueError, ["head dims"]),
    (lambda a: {**a, "q": a["q"][:, :3]}, ValueError, ["multiple"]),
    (lambda a: {**a, "q": a["q"][0]}, ValueError, ["total"]),
    (lambda a: {**a, "max_seqlen_k": 2.5}, TypeError, ["max_seqlen_k"]),
], ids=["cu-int64", "max-too-small", "cu-past-total", "cu-lengths", "head-dim", "heads", "rank", "max-float"])
def test_bad_input(mutate, exc, words):
    q, k, v, cu_q, cu_k, mq, mk = _packed(*LENGTHS[0])
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=mq, max_seqlen_k=mk)
    with pytest.raises(exc) as e:
        attention_varlen(**mutate(args))
    assert_error_mentions(e, *words)
