"""attention: SDPA's semantics (the reference and the default dispatch against torch's SDPA), the
backend choice, bad input, and every torch mode (tests/utils/modes.py) on both backends."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pydl
from pydl.ops.attention import attention, attention_ref, choose_backend
from tests.ops.attention_cases import AttnCase, make_inputs, sdpa_kwargs
from tests.utils.checks import assert_error_mentions
from tests.utils.inputs import FP32, FP64
from tests.utils.modes import MODES, OpUnderTest, no_recompile_limit

REF_CASES = [AttnCase(causal=True), AttnCase(Nq=29, Nk=13, causal=True), AttnCase(Nq=5, Nk=40, causal=True),
             AttnCase(H=4, Hkv=2, gqa=True), AttnCase(H=4, Hkv=1), AttnCase(E=24, EV=40),
             AttnCase(mask="bool2d"), AttnCase(mask="keypad"), AttnCase(mask="add2d"),
             AttnCase(mask="add_expanded"), AttnCase(mask="add_all_inf_row")]


@pytest.mark.parametrize("c", REF_CASES, ids=AttnCase.id)
def test_reference_is_sdpa(c):
    """attention_ref (float64 composition) == torch's SDPA in float64: the yardstick is right."""
    q, k, v, mask = make_inputs(c, FP64, "cpu")
    torch.testing.assert_close(attention_ref(q, k, v, **sdpa_kwargs(c, mask)),
                               F.scaled_dot_product_attention(q, k, v, **sdpa_kwargs(c, mask)),
                               atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("c", REF_CASES[:4], ids=AttnCase.id)
def test_default_dispatch_on_cpu_is_sdpa(c):
    q, k, v, mask = make_inputs(c, FP32, "cpu")
    assert choose_backend(q, k, v) == "torch"
    assert torch.equal(attention(q, k, v, **sdpa_kwargs(c, mask)),
                       F.scaled_dot_product_attention(q, k, v, **sdpa_kwargs(c, mask)))


def test_torch_backend_covers_what_the_kernels_do_not():
    q = torch.randn(3, 5, 16, dtype=FP64)  # rank 3, float64
    assert torch.equal(attention(q, q, q, backend="torch"), F.scaled_dot_product_attention(q, q, q))
    big = torch.randn(1, 1, 4, 320)  # head dim > 256
    assert torch.equal(attention(big, big, big), F.scaled_dot_product_attention(big, big, big))


@pytest.mark.parametrize("what,args,words", [
    ("float64", lambda: (torch.randn(1, 1, 4, 8, dtype=FP64),) * 3, ["float64"]),
    ("rank", lambda: (torch.randn(1, 4, 8),) * 3, ["rank"]),
    ("head dim", lambda: (torch.randn(1, 1, 4, 512),) * 3, ["head dim"]),
])
def test_forced_triton_says_why_not(what, args, words):
    with pytest.raises(pydl.BackendError) as e:
        attention(*args(), backend="triton")
    assert_error_mentions(e, *words)


def _qkv(B=1, H=2, Hkv=2, Nq=4, Nk=5, E=8, EV=8, dtype=FP32):
    return torch.randn(B, H, Nq, E, dtype=dtype), torch.randn(B, Hkv, Nk, E, dtype=dtype), \
        torch.randn(B, Hkv, Nk, EV, dtype=dtype)


@pytest.mark.parametrize("mutate,exc,words", [
    (lambda q, k, v: dict(q=q, k=k[..., :4], v=v), ValueError, ["head dims"]),
    (lambda q, k, v: dict(q=q, k=k, v=v[:, :, :3]), ValueError, ["sequence length"]),
    (lambda q, k, v: dict(q=q.repeat(1, 3, 1, 1)[:, :3], k=k, v=v, enable_gqa=True), ValueError, ["multiple"]),
    (lambda q, k, v: dict(q=q.repeat(1, 3, 1, 1)[:, :3], k=k, v=v), ValueError, ["enable_gqa"]),
    (lambda q, k, v: dict(q=q.long(), k=k, v=v), TypeError, ["floating"]),
    (lambda q, k, v: dict(q=q, k=k.double(), v=v), TypeError, ["dtype"]),
    (lambda q, k, v: dict(q=q, k=k, v=v, attn_mask=torch.ones(3, 5, dtype=torch.bool)), ValueError, ["attn_mask"]),
    (lambda q, k, v: dict(q=q, k=k, v=v, attn_mask=torch.ones(4, 5).long()), TypeError, ["attn_mask"]),
    (lambda q, k, v: dict(q=q, k=k, v=v, attn_mask=torch.ones(4, 5).double()), TypeError, ["attn_mask"]),
    (lambda q, k, v: dict(q=q, k=k, v=v, attn_mask=torch.ones(4, 5, dtype=torch.bool), is_causal=True),
     ValueError, ["is_causal"]),
    (lambda q, k, v: dict(q=q, k=k, v=v, dropout_p=1.5), ValueError, ["dropout_p"]),
    (lambda q, k, v: dict(q=q, k=k, v=v, scale=float("nan")), TypeError, ["scale"]),
    (lambda q, k, v: dict(q=q, k=[1.0], v=v), TypeError, ["k must be a Tensor"]),
], ids=["head-dim", "kv-length", "gqa-not-divisible", "heads-without-gqa", "int-q", "dtype-mix", "mask-shape",
        "mask-int", "mask-double", "mask-and-causal", "dropout", "scale-nan", "k-list"])
@pytest.mark.parametrize("backend", [None, "torch"])
def test_bad_input(mutate, exc, words, backend):
    with pytest.raises(exc) as e:
        attention(**mutate(*_qkv()), backend=backend)
    assert_error_mentions(e, *words)


def test_empty_inputs_like_sdpa():
    q, k, v = _qkv(Nq=0)
    assert attention(q, k, v).shape == (1, 2, 0, 8)
    q, k, v = _qkv(Nk=0)
    torch.testing.assert_close(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


# ---- every torch mode ---------------------------------------------------------------------------

def _inputs(dtype):
    def make(shape, requires_grad):
        g = torch.Generator().manual_seed(shape[0] * 31 + shape[1])
        B, N = shape
        mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_(requires_grad)  # noqa: E731
        return mk(B, 2, N, 16), mk(B, 2, N + 3, 16), mk(B, 2, N + 3, 16)
    return make


def _mode_ops(backend, dtype, atol, rtol):
    """The op on ``backend`` against the softmax composition in ``dtype`` (twice differentiable,
    unlike torch's CPU SDPA kernel)."""
    fn = lambda causal: (lambda q, k, v: attention(q, k, v, is_causal=causal, backend=backend))  # noqa: E731
    ref = lambda causal: (lambda q, k, v: attention_ref(q, k, v, is_causal=causal).to(q.dtype))  # noqa: E731
    # jacrev at (B, N) = (1, 3): 96 output elements (the Triton interpreter runs a program per
    # (vmapped entry, batch, head): at (2, 5) the check alone took ~3 minutes)
    return [OpUnderTest(f"attention{'-causal' if c else ''}", fn(c), ref(c), _inputs(dtype), shapes=((2, 5), (3, 5)),
                        vmap_in_dims=(0, 0, 0), atol=atol, rtol=rtol, jacrev_shape=(1, 3)) for c in (False, True)]


# The torch backend is SDPA itself (the modes only prove the pass-through): the causal op only.
MODE_OPS = [("torch", op) for op in _mode_ops("torch", FP64, 1e-9, 1e-7)[1:]]
TRITON_MODE_OPS = [("triton", op) for op in _mode_ops("triton", FP32, 5e-5, 1e-4)[1:]]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend,op", MODE_OPS, ids=[f"{b}-{o.name}" for b, o in MODE_OPS])
def test_modes_torch_backend(backend, op, mode):
    if mode == "double_backward":
        pytest.skip("the torch backend is SDPA itself, and torch's CPU SDPA kernel has no double backward")
    with no_recompile_limit():
        MODES[mode](op)


@pytest.mark.triton
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend,op", TRITON_MODE_OPS, ids=[f"{b}-{o.name}" for b, o in TRITON_MODE_OPS])
def test_modes_triton_backend(backend, op, mode):
    with no_recompile_limit():
        MODES[mode](op)
