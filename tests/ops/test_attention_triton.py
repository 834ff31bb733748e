"""attention, the triton backend (@pytest.mark.triton): compiled on a CUDA GPU, or run by the
Triton interpreter on CPU (small shapes). Every gradient, every mask form, GQA, Ev != E, odd
lengths and head dims, dropout, the custom ops (opcheck) and torch.compile."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from pydl.ops.attention import attention, attention_ref, dropout_mask
from tests.ops.attention_cases import AttnCase, check_case, make_inputs
from tests.utils.checks import grads, opcheck_calls, record_calls
from tests.utils.inputs import BF16, FP16, FP32, dtype_id

pytestmark = pytest.mark.triton
kernels = importlib.import_module("pydl.triton.attention")

SHAPES = [
    AttnCase(B=1, H=1, Hkv=1, Nq=1, Nk=1, E=16, EV=16),
    AttnCase(Nq=17, Nk=17, E=16, EV=16, causal=True),
    AttnCase(B=1, Nq=127, Nk=129, E=64, EV=64),
    AttnCase(B=1, H=1, Hkv=1, Nq=129, Nk=127, E=64, EV=64, causal=True),     # Nq > Nk, causal
    AttnCase(B=1, H=1, Hkv=1, Nq=23, Nk=70, E=32, EV=32, causal=True),       # Nq < Nk, causal
    AttnCase(Nq=20, Nk=33, E=40, EV=24),                                     # Ev != E, odd head dims
    AttnCase(H=4, Hkv=2, Nq=19, Nk=31, E=32, EV=32, gqa=True, causal=True),  # GQA
    AttnCase(H=4, Hkv=1, Nq=9, Nk=21, E=16, EV=16, gqa=True),                # MQA
    AttnCase(H=3, Hkv=1, Nq=9, Nk=21, E=16, EV=16),                          # Hkv = 1 broadcast, no gqa
    AttnCase(Nq=33, Nk=33, E=32, EV=32, projected=True, causal=True),        # transposed views
]
HEAD_DIMS = [16, 40, 80, 96, 112, 128, 256]
MASKS = ["bool2d", "keypad", "bool_full", "add2d", "add_heads", "add_expanded", "add_all_inf_row"]


@pytest.mark.parametrize("c", SHAPES, ids=AttnCase.id)
def test_shapes_fp32(c, triton_device):
    check_case(c, FP32, triton_device, "triton")


@pytest.mark.parametrize("dtype", [BF16, FP16], ids=dtype_id)
@pytest.mark.parametrize("c", [SHAPES[2], SHAPES[6]], ids=AttnCase.id)
def test_low_precision(c, dtype, triton_device):
    check_case(c, dtype, triton_device, "triton")


@pytest.mark.parametrize("e", HEAD_DIMS)
def test_head_dims(e, triton_device):
    check_case(AttnCase(B=1, H=1, Hkv=1, Nq=20, Nk=18, E=e, EV=e, causal=True), FP32, triton_device, "triton")


@pytest.mark.parametrize("form", MASKS)
def test_masks(form, triton_device):
    check_case(AttnCase(Nq=21, Nk=37, mask=form), FP32, triton_device, "triton")


@pytest.mark.parametrize("form", ["add2d", "add_heads", "add_all_inf_row"])
def test_additive_mask_gradient(form, triton_device):
    """A learned additive bias (relative positions, ALiBi): its gradient, summed over broadcast dims."""
    check_case(AttnCase(Nq=19, Nk=26, mask=form), FP32, triton_device, "triton", mask_grad=True)


def test_float32_mask_with_bfloat16_q(triton_device):
    c = AttnCase(Nq=19, Nk=26)
    q, k, v, _ = make_inputs(c, BF16, triton_device)
    mask = torch.randn(19, 26, device=triton_device)
    out = attention(q, k, v, mask, backend="triton")
    ref = attention_ref(q, k, v, mask)
    tout = F.scaled_dot_product_attention(q, k, v, mask)
    from tests.tolerances import assert_close_to_ref
    assert_close_to_ref(out, ref, tout, dtype=BF16, name="bf16 q, fp32 mask")


def test_fully_masked_rows_are_zero(triton_device):
    c = AttnCase(Nq=9, Nk=12, mask="bool2d")
    q, k, v, _ = make_inputs(c, FP32, triton_device)
    mask = torch.ones(9, 12, dtype=torch.bool, device=triton_device)
    mask[4] = False
    out = attention(q, k, v, mask, backend="triton")
    dq, dk, dv = grads([out], [q, k, v], [torch.randn_like(out)])
    assert torch.equal(out[:, :, 4], torch.zeros_like(out[:, :, 4]))
    assert torch.equal(dq[:, :, 4], torch.zeros_like(dq[:, :, 4]))
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all()


def test_scale_argument(triton_device):
    check_case(AttnCase(Nq=13, Nk=15), FP32, triton_device, "triton", scale=0.3)


def test_projected_views_are_not_copied(triton_device, monkeypatch):
    """q/k/v as transposed views of (B, N, H, D) reach the kernels as they are (no .contiguous())."""
    c = AttnCase(Nq=17, Nk=17, projected=True)
    q, k, v, _ = make_inputs(c, FP32, triton_device)
    seen = []
    real = kernels.attention_fwd
    monkeypatch.setattr(kernels, "attention_fwd",
                        lambda P, q_, k_, v_, *a: seen.append((q_, k_, v_)) or real(P, q_, k_, v_, *a))
    attention(q, k, v, backend="triton")
    assert [t.data_ptr() for t in seen[0]] == [q.data_ptr(), k.data_ptr(), v.data_ptr()]
    assert seen[0][0].stride() == q.stride()


def test_output_layout_is_projection_friendly(triton_device):
    """The output is (B, H, Nq, Ev) over (B, Nq, H, Ev) memory: .transpose(1, 2) is contiguous."""
    q, k, v, _ = make_inputs(AttnCase(), FP32, triton_device)
    out = attention(q, k, v, backend="triton")
    assert out.transpose(1, 2).is_contiguous()


def test_backward_is_deterministic(triton_device):
    q, k, v, _ = make_inputs(AttnCase(H=4, Hkv=2, gqa=True, Nq=40, Nk=40), FP32, triton_device)
    do = torch.randn(2, 4, 40, 32, device=triton_device)
    first = grads([attention(q, k, v, enable_gqa=True, backend="triton")], [q, k, v], [do])
    second = grads([attention(q, k, v, enable_gqa=True, backend="triton")], [q, k, v], [do])
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# ---- dropout --------------------------------------------------------------------------------------

def _seed_after(seed: int, device) -> torch.Tensor:
    """The seed tensor pydl draws right after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=device)


def test_dropout_zero_is_exact(triton_device):
    q, k, v, _ = make_inputs(AttnCase(), FP32, triton_device)
    assert torch.equal(attention(q, k, v, dropout_p=0.0, backend="triton"), attention(q, k, v, backend="triton"))


def test_dropout_reproducible_and_matches_its_mask(triton_device):
    p = 0.3
    c = AttnCase(Nq=29, Nk=41, causal=True)
    q, k, v, _ = make_inputs(c, FP32, triton_device)
    torch.manual_seed(7)
    out = attention(q, k, v, dropout_p=p, is_causal=True, backend="triton")
    torch.manual_seed(7)
    again = attention(q, k, v, dropout_p=p, is_causal=True, backend="triton")
    torch.manual_seed(8)
    other = attention(q, k, v, dropout_p=p, is_causal=True, backend="triton")
    assert torch.equal(out, again) and not torch.equal(out, other)
    keep = dropout_mask(_seed_after(7, triton_device), (2, 2, 29, 41), p)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.05
    ref = attention_ref(q, k, v, dropout_p=p, is_causal=True, keep=keep)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    # the backward regenerates the forward's mask: it is the gradient of the masked reference
    do = torch.randn_like(out)
    got = grads([out], [q, k, v], [do])
    want = grads([ref], [q, k, v], [do.double()])
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), atol=5e-5, rtol=1e-5)


def test_dropout_preserves_the_mean(triton_device):
    """E[dropout output] = the output without dropout: averaged over 100 seeds."""
    q, k, v, _ = make_inputs(AttnCase(B=1, H=1, Hkv=1, Nq=16, Nk=64, E=16, EV=16), FP32, triton_device)
    plain = attention(q, k, v, backend="triton").detach()
    torch.manual_seed(0)
    mean = sum(attention(q, k, v, dropout_p=0.5, backend="triton").detach() for _ in range(100)) / 100
    assert (mean - plain).abs().mean() < 0.05 * plain.abs().mean() + 0.02


# ---- custom ops and compile -------------------------------------------------------------------------

@pytest.mark.parametrize("mask", [None, "add2d"])
def test_opcheck(mask, triton_device):
    c = AttnCase(B=1, Nq=9, Nk=13, E=16, EV=16, mask=mask)
    q, k, v, m = make_inputs(c, FP32, triton_device)
    if m is not None:
        m = m.detach().requires_grad_()

    def fwd_bwd():
        out = attention(q, k, v, m, backend="triton")
        out.backward(torch.randn_like(out))

    calls = record_calls(fwd_bwd)
    assert {f._schema.name for f, _, _ in calls} == {"pydl::attention_fwd", "pydl::attention_bwd"}
    opcheck_calls(calls, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph(dynamic, triton_device):
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: attention(q, k, v, is_causal=True, backend="triton"),
                       fullgraph=True, dynamic=dynamic)
    for n in (17, 23):
        q, k, v, _ = make_inputs(AttnCase(Nq=n, Nk=n), FP32, triton_device)
        out = fn(q, k, v)
        ref = attention_ref(q, k, v, is_causal=True)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
        do = torch.randn_like(out)
        for g, w in zip(grads([out], [q, k, v], [do]), grads([ref], [q, k, v], [do.double()])):
            torch.testing.assert_close(g.double(), w.double(), atol=5e-5, rtol=1e-5)


@pytest.mark.cuda
def test_autotuned_launch(monkeypatch):
    """The GPU launch path users get (autotuning over candidate tiles), forward and backward."""
    monkeypatch.setattr(kernels, "AUTOTUNE", True)
    cuda = torch.device("cuda")
    check_case(AttnCase(B=2, H=4, Hkv=2, Nq=300, Nk=300, E=64, EV=64, causal=True, gqa=True), BF16, cuda, "triton")
    check_case(AttnCase(B=1, H=2, Hkv=2, Nq=200, Nk=257, E=128, EV=128, mask="add2d"), FP32, cuda, "triton",
               mask_grad=True)


@pytest.mark.slow
def test_long_sequence(triton_device, monkeypatch):
    """N = 1000 (16 tiles of 64 per dim; the interpreter's default 16-wide tiles would take minutes)."""
    monkeypatch.setattr(kernels, "INTERPRETER_CONFIG", kernels.Config(64, 64, 4, 1))
    check_case(AttnCase(B=1, H=1, Hkv=1, Nq=1000, Nk=1000, E=16, EV=16, causal=True), FP32, triton_device,
               "triton")


@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("in_dims", [(0, None, None), (1, 0, 2)], ids=str)
def test_vmap_folds_into_the_batch(B, in_dims, triton_device):
    """vmap (and jacrev's batch of cotangents) over the custom ops: the vmapped dim joins the batch
    dim in one kernel call; outputs and gradients equal the per-entry calls (a shared lse with
    batch stride 0 — B == 1 — must not be read with the kernels' contiguous lse strides)."""
    g = torch.Generator().manual_seed(B)
    mk = lambda *s: torch.randn(*s, generator=g).to(triton_device)  # noqa: E731
    q, k, v = mk(B, 2, 5, 16), mk(B, 1, 7, 16), mk(B, 1, 7, 16)
    batched = [torch.stack([t, 0.5 * t + 0.1, -t], dim=d) if d is not None else t
               for t, d in zip((q, k, v), in_dims)]
    fn = lambda q_, k_, v_: attention(q_, k_, v_, is_causal=True, enable_gqa=True, backend="triton")  # noqa: E731
    got = torch.func.vmap(fn, in_dims=in_dims)(*batched)
    want = torch.stack([fn(*[t.select(d, i) if d is not None else t for t, d in zip(batched, in_dims)])
                        for i in range(3)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    loss = lambda q_, k_, v_: torch.func.vmap(fn, in_dims=in_dims)(q_, k_, v_).square().sum()  # noqa: E731
    got_g = torch.func.grad(loss, argnums=(0, 1, 2))(*batched)
    leaves = [t.detach().requires_grad_() for t in batched]
    want_g = torch.autograd.grad(
        sum(fn(*[t.select(d, i) if d is not None else t for t, d in zip(leaves, in_dims)]).square().sum()
            for i in range(3)), leaves)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # jacrev's pattern: one forward, then the backward vmapped over cotangents (o and lse shared)
    out, vjp_fn = torch.func.vjp(fn, q, k, v)
    cotangents = torch.stack([mk(*out.shape) for _ in range(3)])
    got_v = torch.func.vmap(vjp_fn)(cotangents)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    for i in range(3):
        for a, b in zip(got_v, torch.autograd.grad(out, leaves, cotangents[i], retain_graph=True)):
            torch.testing.assert_close(a[i], b, atol=1e-4, rtol=1e-4)
