"""pydl.models.gpt: GPT-2 — causality, left padding, KV-cache decoding equal to the full forward,
generation through the cache, the 124M parameter count, weight tying, bf16 autocast, config errors.
(Equality with Hugging Face's GPT2LMHeadModel: test_hf_convert.py.)"""

from __future__ import annotations

import pytest
import torch

from pydl.models.gpt import GPT, GPTConfig, gpt2

TINY = dict(vocab_size=97, n_positions=40, n_embd=32, n_layer=2, n_head=4)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return gpt2(**TINY).eval()


def _ids(B, T, seed=0):
    return torch.randint(0, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


def test_shapes_and_default_config():
    assert GPTConfig().n_embd == 768 and GPTConfig().n_layer == 12 and GPTConfig().inner_dim == 3072
    m = gpt2(**TINY)
    assert m(_ids(3, 5)).shape == (3, 5, TINY["vocab_size"])


def test_parameter_count_of_default_gpt2_is_124m():
    with torch.device("meta"):  # no memory, no init cost
        m = gpt2()
    assert sum(p.numel() for p in m.parameters()) == 124_439_808  # 124.44M, lm_head tied to wte
    assert m.lm_head.weight is m.wte.weight


def test_untied_head():
    m = gpt2(**TINY, tie_word_embeddings=False)
    assert m.lm_head.weight is not m.wte.weight
    n_tied = sum(p.numel() for p in gpt2(**TINY).parameters())
    assert sum(p.numel() for p in m.parameters()) == n_tied + TINY["vocab_size"] * TINY["n_embd"]


def test_causality(model):
    """Changing a later token never changes an earlier position's logits."""
    ids = _ids(2, 12)
    base = model(ids)
    for j in (3, 11):
        alt = ids.clone()
        alt[:, j] = (alt[:, j] + 1) % TINY["vocab_size"]
        out = model(alt)
        torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=1e-6)
        assert (out[:, j] - base[:, j]).abs().max() > 1e-4


def test_left_padding_equals_unpadded_rows(model):
    """Each row of a left-padded batch gives the logits of that row run alone (positions from the mask,
    as transformers' generate computes them), and padding logits stay finite."""
    lengths = [9, 5, 1]
    T = max(lengths)
    ids = _ids(3, T, seed=1)
    mask = torch.zeros(3, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = 1
    out = model(ids, mask)
    assert torch.isfinite(out).all()
    for b, n in enumerate(lengths):
        alone = model(ids[b:b + 1, T - n:])
        torch.testing.assert_close(out[b:b + 1, T - n:], alone, rtol=1e-4, atol=1e-5)
    # padding tokens are never attended: changing them changes no real position
    alt = ids.masked_fill(mask == 0, 3)
    torch.testing.assert_close(model(alt, mask)[mask.bool()], out[mask.bool()], rtol=0, atol=1e-6)
    # an all-ones mask is the unmasked forward
    torch.testing.assert_close(model(ids, torch.ones_like(ids)), model(ids), rtol=0, atol=0)


@torch.no_grad()
def test_kv_cache_decoding_equals_full_forward(model):
    """Prefill + token-by-token steps through the pre-allocated KVCache (decode_attention) give the
    full forward's logits at every step."""
    ids = _ids(3, 10, seed=2)
    full = model(ids)
    cache = model.init_cache(3, 16, reorderable=False)
    steps = [model.forward_step(ids[:, :4], cache)]  # prefill T=4
    steps += [model.forward_step(ids[:, t:t + 1], cache) for t in range(4, 10)]  # T=1 steps
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
    assert cache.lengths.tolist() == [10, 10, 10]
    # a prefill after which rows have different lengths (as the generator sets them), then T=1 steps
    cache = model.init_cache(2, 16)
    model.forward_step(ids[:2, :6], cache)
    cache.set_lengths(torch.tensor([6, 3], dtype=torch.int32))
    nxt = torch.tensor([[ids[0, 6]], [ids[1, 3]]])
    got = model.forward_step(nxt, cache)[:, 0]
    torch.testing.assert_close(got[0], model(ids[:1, :7])[0, -1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], model(ids[1:2, :4])[0, -1], rtol=1e-4, atol=1e-5)


def test_cache_is_a_generation_model(model):
    from pydl.generation import GenerationModel, KVCache

    assert isinstance(model, GenerationModel)
    c = model.init_cache(4, 8, num_beams=2)
    assert isinstance(c, KVCache) and c.batch_size == 4 and c.keys[0].shape == (4, 4, 8, 8)
    with pytest.raises(ValueError, match="n_positions"):
        model.init_cache(1, TINY["n_positions"] + 1)


def test_greedy_and_beam_search_through_the_cache_equal_the_uncached_model(model):
    """pydl.generation over the KV-cache protocol == over the plain (input_ids, mask) -> logits callable
    (which recomputes the whole left-padded prefix each step)."""
    from pydl.generation import beam_search, greedy_search

    ids = _ids(2, 6, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    plain = lambda i, m: model(i, m)  # noqa: E731
    a = greedy_search(model, ids, mask, max_new_tokens=5)
    b = greedy_search(plain, ids, mask, max_new_tokens=5)
    assert a.sequences.tolist() == b.sequences.tolist()
    a = beam_search(model, ids, mask, num_beams=3, max_new_tokens=5, eos_token_id=7, pad_token_id=0)
    b = beam_search(plain, ids, mask, num_beams=3, max_new_tokens=5, eos_token_id=7, pad_token_id=0)
    assert a.sequences.tolist() == b.sequences.tolist()
    torch.testing.assert_close(a.sequences_scores, b.sequences_scores, rtol=1e-4, atol=1e-5)


def test_training_step_and_bf16_autocast():
    torch.manual_seed(0)
    m = gpt2(**TINY)  # train mode: dropout on
    ids = _ids(2, 8)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = m(ids, mask)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    m.eval()
    with torch.no_grad():
        ref = m(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = m(ids)
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.05


@pytest.mark.parametrize("kw, match", [(dict(n_embd=30, n_head=4), "divisible"),
                                       (dict(activation_function="nope"), "activation_function"),
                                       (dict(n_layer=0), "n_layer")])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        GPT(**{**TINY, **kw})


def test_bad_input(model):
    with pytest.raises(TypeError, match="input_ids"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="attention_mask"):
        model(_ids(2, 3), torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="n_positions"):
        model(_ids(1, TINY["n_positions"] + 1))
