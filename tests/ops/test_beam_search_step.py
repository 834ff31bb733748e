"""beam_search_step: the top candidates of log_softmax(logits) + beam_scores over K*V, against the float64
composition and torch's own ops: odd vocabularies, beams 1..64, candidates up to 256, the first step
(only beam 0 alive), banned tokens (masked after the normalization), -inf logits, ties (ordered by the
flat index on every backend), strided logits, dtypes, the custom op (opcheck, compile, export, vmap),
bad input. Device-generic: PYDL_TEST_DEVICE=cuda runs them on the GPU."""

from __future__ import annotations

import sys

import pytest
import torch

import pydl
from pydl.ops import beam_search_step, beam_search_step_ref
from tests.utils.checks import assert_error_mentions, opcheck_calls, record_calls
from tests.utils.inputs import BF16, FP16, FP32, FP64

BS = sys.modules["pydl.ops.beam_search_step"]
BACKENDS = ["native", "torch"]


def supported(dtype, device) -> bool:
    return dtype in (BS._NATIVE_CUDA_DTYPES if device.type == "cuda" else BS._NATIVE_CPU_DTYPES)


def make(B, K, V, dtype=FP32, device="cpu", first_step=False, scale=3.0):
    logits = (torch.randn(B * K, V) * scale).to(dtype).to(device)
    sdt = FP64 if dtype == FP64 else FP32
    scores = -torch.rand(B, K, dtype=sdt).cumsum(1).to(device) * 4
    if first_step:
        scores[:, 1:] = -1e9
    return logits, scores


def check(out, logits, beam_scores, n, banned=None):
    """Tokens / beams equal to the float64 reference wherever its scores are not within rounding of a
    neighbour's (near-ties may swap), scores within float32 rounding of it."""
    scores, tokens, beams = out
    B, K = beam_scores.shape
    assert scores.shape == tokens.shape == beams.shape == (B, n)
    assert scores.dtype == beam_scores.dtype and tokens.dtype == beams.dtype == torch.int64
    r_scores, r_tokens, r_beams = beam_search_step_ref(logits, beam_scores, n, banned)
    tol = 1e-12 if logits.dtype == FP64 else 2e-5 * (1 + r_scores.abs())
    finite = torch.isfinite(r_scores)
    assert torch.equal(torch.isfinite(scores), finite), "the -inf candidates differ"
    assert ((scores.double() - r_scores).abs()[finite] <= tol if logits.dtype == FP64 else
            (scores.double() - r_scores).abs()[finite] <= tol[finite]).all(), (scores, r_scores)
    # each returned (beam, token) really has the returned score
    s_all = torch.log_softmax(logits.double(), -1).view(B, K, -1) + beam_scores.double()[..., None]
    if banned is not None:
        s_all[..., banned] = float("-inf")
    picked = s_all[torch.arange(B)[:, None], beams, tokens]
    assert torch.equal(torch.isfinite(picked), finite)
    gap = (r_scores[:, :-1] - r_scores[:, 1:]).abs()
    clear = torch.ones_like(finite)
    clear[:, :-1] &= gap > 1e-4
    clear[:, 1:] &= gap > 1e-4
    clear &= finite
    assert torch.equal(tokens[clear], r_tokens[clear]) and torch.equal(beams[clear], r_beams[clear])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,K,V,n", [(1, 1, 7, 2), (2, 4, 1000, 8), (3, 5, 97, 10), (8, 4, 50257, 8),
                                     (1, 12, 513, 24), (2, 64, 33, 128), (1, 2, 300, 256), (4, 3, 1, 3)])
def test_values(B, K, V, n, backend, device):
    logits, scores = make(B, K, V, device=device)
    check(beam_search_step(logits, scores, n, backend=backend), logits, scores, n)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [BF16, FP16, FP64])
def test_dtypes(dtype, backend, device):
    if backend == "native" and not supported(dtype, device):
        pytest.skip(f"no native {dtype} kernel on {device.type}")
    logits, scores = make(3, 4, 1001, dtype, device)
    check(beam_search_step(logits, scores, 8, backend=backend), logits, scores, 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_step_only_beam_zero(backend, device):
    logits, scores = make(2, 6, 500, device=device, first_step=True)
    logits = logits.view(2, 6, 500)[:, :1].expand(2, 6, 500).reshape(12, 500)  # every beam the same prompt
    out = beam_search_step(logits, scores, 12, backend=backend)
    check(out, logits, scores, 12)
    assert (out[2] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_banned_tokens_are_masked_after_the_normalization(backend, device):
    logits, scores = make(2, 3, 50, device=device)
    logits[:, 7] = 20.0  # the banned token would win every beam
    banned = torch.tensor([7, 11], device=device)
    out = beam_search_step(logits, scores, 6, banned_tokens=banned, backend=backend)
    check(out, logits, scores, 6, banned)
    assert not torch.isin(out[1], banned).any()
    assert (out[0] < -10).all()  # the normalizer still counts the banned logit


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_are_ordered_by_flat_index(backend, device):
    logits = torch.zeros(6, 9, device=device)  # every candidate ties
    scores = torch.zeros(2, 3, device=device)
    s, tok, beam = beam_search_step(logits, scores, 5, backend=backend)
    flat = beam * 9 + tok
    assert torch.equal(flat, torch.arange(5, device=device).expand(2, 5))
    logits[1, 4] = logits[2, 2] = 1.0  # two winners tie; then the zeros tie at the boundary
    s, tok, beam = beam_search_step(logits, scores, 4, backend=backend)
    assert (beam[0] * 9 + tok[0]).tolist() == [13, 20, 0, 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_neg_inf_logits_and_strided_rows(backend, device):
    big = torch.randn(8, 130, device=device)
    logits = big[:, 3:103]  # row stride 130, misaligned start
    logits[:, 50:] = float("-inf")
    scores = torch.zeros(2, 4, device=device)
    check(beam_search_step(logits, scores, 8, backend=backend), logits, scores, 8)
    one = torch.full((2, 5), float("-inf"), device=device)  # one finite logit per row
    one[0, 1] = one[1, 3] = 0.0
    s, tok, beam = beam_search_step(one, torch.tensor([[0.0, -1.0]], device=device), 3, backend=backend)
    assert s[0].tolist() == [0.0, -1.0, float("-inf")] and tok[0, :2].tolist() == [1, 3] and beam[0, :2].tolist() == [0, 1]


def test_backends_agree_exactly_on_float64(device):
    if not supported(FP64, device):
        pytest.skip("no float64 native kernel here")
    logits, scores = make(4, 4, 777, FP64, device)
    a = beam_search_step(logits, scores, 8, backend="native")
    b = beam_search_step(logits, scores, 8, backend="torch")
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    torch.testing.assert_close(a[0], b[0], rtol=1e-13, atol=1e-13)


def test_empty_batch(device):
    out = beam_search_step(torch.empty(0, 10, device=device), torch.empty(0, 3, device=device), 4)
    assert [t.shape for t in out] == [(0, 4)] * 3


def test_large_limits_go_to_torch(device):
    logits, scores = make(1, 65, 10, device=device)
    assert BS.DISPATCH.choose((device.type, FP32, False)) == "torch"
    check(beam_search_step(logits, scores, 130), logits, scores, 130)
    with pytest.raises(pydl.backends.BackendError) as e:
        beam_search_step(logits, scores, 130, backend="native")
    assert_error_mentions(e, "64")


def test_custom_op_opcheck_compile_and_vmap(device):
    logits, scores = make(2, 3, 40, device=device)
    banned = torch.tensor([1], device=device)
    calls = record_calls(lambda: torch.ops.pydl.beam_search_step(logits, scores, 6, banned))
    opcheck_calls(calls)
    fn = torch.compile(lambda l, s: beam_search_step(l, s, 6, banned_tokens=banned, backend="native"), fullgraph=True)
    got, want = fn(logits, scores), beam_search_step(logits, scores, 6, banned_tokens=banned, backend="native")
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    vm = torch.func.vmap(lambda l, s: beam_search_step(l, s, 6, backend="native"))(
        torch.stack([logits, -logits]), torch.stack([scores, scores]))
    for i, l in enumerate((logits, -logits)):
        assert all(torch.equal(a[i], b) for a, b in zip(vm, beam_search_step(l, scores, 6, backend="native")))


BAD = [
    (lambda a: a.update(logits=torch.randn(7, 10)), ValueError, ["B*K", "rows"]),
    (lambda a: a.update(beam_scores=torch.randn(2, 4, dtype=FP64)), TypeError, ["beam_scores", "float32"]),
    (lambda a: a.update(logits=torch.randint(0, 5, (8, 10))), TypeError, ["logits", "floating"]),
    (lambda a: a.update(n=0), ValueError, ["num_candidates"]),
    (lambda a: a.update(n=41), ValueError, ["num_candidates", "40"]),
    (lambda a: a.update(n=2.0), TypeError, ["num_candidates", "int"]),
    (lambda a: a.update(banned_tokens=torch.tensor([1.0])), TypeError, ["banned_tokens"]),
    (lambda a: a.update(beam_scores=torch.randn(8)), ValueError, ["beam_scores", "2 dims"]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mutate,exc,words", BAD, ids=range(len(BAD)))
def test_bad_input(mutate, exc, words, backend):
    args = dict(logits=torch.randn(8, 10), beam_scores=torch.zeros(2, 4), n=4, banned_tokens=None)
    mutate(args)
    with pytest.raises(exc) as e:
        beam_search_step(args["logits"], args["beam_scores"], args["n"], banned_tokens=args["banned_tokens"],
                         backend=backend)
    assert_error_mentions(e, *words)
