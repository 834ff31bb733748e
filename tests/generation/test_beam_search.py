"""pydl.generation.beam_search == transformers' generate(num_beams=K, do_sample=False) on tiny random
GPT-2 and BART models: sequences, sequences_scores (1e-4) and beam_indices, for HF models, the pydl
KV-cache protocol and plain callables. Every case asserts that some hypothesis finished with EOS."""

from __future__ import annotations

import pytest
import torch

from pydl.generation import GenerationModel, beam_search

from . import _hf
from ._pydl_model import PydlGPT2

GEN = 8  # max_new_tokens
EOS = list(_hf.GPT2_EOS)


@pytest.fixture(scope="module")
def gpt2():
    return _hf.gpt2()


@pytest.fixture(scope="module")
def bart():
    return _hf.bart()


@pytest.fixture(scope="module")
def batch():
    return _hf.prompts(3, 5, seed=0)  # left-padded (B=3, T=5)


def _check(model, ref_model, ids, mask, *, prompt_len, eos, **kw):
    ref = _hf.hf_generate(ref_model, ids, mask, **kw)
    out = beam_search(model, ids, mask, **kw)
    _hf.assert_same(ref, out, beams=kw["num_beams"] > 1)
    assert _hf.finished_early(out, prompt_len, eos), "no hypothesis finished with EOS: the test is too weak"
    return out


# ---- GPT-2 (decoder-only, left-padded batch) --------------------------------------------------------

@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0, -1.5])
@pytest.mark.parametrize("early_stopping", [False, True, "never"])
def test_gpt2_early_stopping_length_penalty(gpt2, batch, early_stopping, length_penalty):
    ids, mask = batch
    _check(gpt2, gpt2, ids, mask, prompt_len=5, eos=EOS, num_beams=4, max_new_tokens=GEN, eos_token_id=EOS,
           pad_token_id=3, early_stopping=early_stopping, length_penalty=length_penalty,
           num_return_sequences=4)  # all K: finished hypotheses show even when longer ones rank first


@pytest.mark.parametrize("num_beams,num_return_sequences", [(1, 1), (2, 2), (3, 1), (5, 3), (8, 8), (12, 5)])
def test_gpt2_num_beams(gpt2, batch, num_beams, num_return_sequences):
    ids, mask = batch
    _check(gpt2, gpt2, ids, mask, prompt_len=5, eos=EOS, num_beams=num_beams, max_new_tokens=GEN,
           num_return_sequences=num_return_sequences, eos_token_id=EOS, pad_token_id=0)


@pytest.mark.parametrize("eos", [[1], [1, 7], [7, 1, 42]])
def test_gpt2_eos_ids(gpt2, batch, eos):
    ids, mask = batch
    _check(gpt2, gpt2, ids, mask, prompt_len=5, eos=eos, num_beams=3, max_new_tokens=GEN, eos_token_id=eos,
           pad_token_id=0, length_penalty=0.5)


def test_gpt2_eos_int_and_defaults(gpt2, batch):
    """eos_token_id as an int; and unset ids taken from the model's generation_config (pad = EOS)."""
    ids, mask = batch
    _check(gpt2, gpt2, ids, mask, prompt_len=5, eos=[7], num_beams=4, max_new_tokens=GEN, eos_token_id=7,
           num_return_sequences=4)
    gc = gpt2.generation_config
    saved = gc.eos_token_id
    gc.eos_token_id = 7
    try:
        _check(gpt2, gpt2, ids, mask, prompt_len=5, eos=[7], num_beams=4, max_new_tokens=GEN, num_return_sequences=4)
    finally:
        gc.eos_token_id = saved


@pytest.mark.parametrize("min_new_tokens", [2, 5])
def test_gpt2_min_new_tokens(gpt2, batch, min_new_tokens):
    ids, mask = batch
    out = _check(gpt2, gpt2, ids, mask, prompt_len=5, eos=EOS, num_beams=4, max_new_tokens=GEN,
                 min_new_tokens=min_new_tokens, eos_token_id=EOS, pad_token_id=0, num_return_sequences=2)
    gen = out.sequences[:, 5:5 + min_new_tokens]
    assert not torch.isin(gen, torch.tensor(EOS)).any()


def test_gpt2_max_length_and_unpadded(gpt2):
    ids, _ = _hf.prompts(2, 4, seed=3)
    _check(gpt2, gpt2, ids, None, prompt_len=4, eos=EOS, num_beams=4, max_length=11, eos_token_id=EOS,
           pad_token_id=0, early_stopping=True)


# ---- the callable path and the pydl KV-cache protocol (vs generate on the same weights) ----------------

@pytest.mark.parametrize("num_beams,early_stopping", [(3, False), (6, True), (4, "never")])
def test_callable(gpt2, batch, num_beams, early_stopping):
    ids, mask = batch
    _check(_hf.gpt2_callable(gpt2), gpt2, ids, mask, prompt_len=5, eos=EOS, num_beams=num_beams,
           max_new_tokens=GEN, eos_token_id=EOS, pad_token_id=0, early_stopping=early_stopping)


@pytest.mark.parametrize("num_beams,early_stopping,length_penalty", [(2, False, 1.0), (5, True, 0.0),
                                                                     (4, "never", 2.0), (12, False, -1.0)])
def test_pydl_protocol(gpt2, batch, num_beams, early_stopping, length_penalty):
    model = PydlGPT2(gpt2)
    assert isinstance(model, GenerationModel)
    ids, mask = batch
    _check(model, gpt2, ids, mask, prompt_len=5, eos=EOS, num_beams=num_beams, max_new_tokens=GEN,
           eos_token_id=EOS, pad_token_id=0, early_stopping=early_stopping, length_penalty=length_penalty,
           num_return_sequences=2)


# ---- BART (encoder-decoder; forced_eos_token_id=2 from its generation_config) -----------------------------

@pytest.mark.parametrize("batch_size", [1, 3])  # B == 1: the stride-0 cross-attention view
@pytest.mark.parametrize("early_stopping,length_penalty", [(False, 1.0), (True, 2.0), ("never", 0.0),
                                                           ("never", -1.0)])
def test_bart(bart, batch_size, early_stopping, length_penalty):
    ids, mask = _hf.encoder_inputs(3, 7, seed=1)
    ids, mask = ids[:batch_size], mask[:batch_size]
    _check(bart, bart, ids, mask, prompt_len=1, eos=_hf.BART_EOS, num_beams=4, max_new_tokens=GEN,
           early_stopping=early_stopping, length_penalty=length_penalty, num_return_sequences=3)


@pytest.mark.parametrize("num_beams", [2, 7])
def test_bart_eos_list_min_new_tokens(bart, num_beams):
    ids, mask = _hf.encoder_inputs(2, 6, seed=2)
    _check(bart, bart, ids, mask, prompt_len=1, eos=_hf.BART_EOS, num_beams=num_beams, max_new_tokens=GEN,
           eos_token_id=list(_hf.BART_EOS), min_new_tokens=2, decoder_start_token_id=2)


def test_bart_no_forced_eos(bart):
    ids, mask = _hf.encoder_inputs(2, 6, seed=4)
    gc = bart.generation_config
    saved = gc.forced_eos_token_id
    gc.forced_eos_token_id = None
    try:
        _check(bart, bart, ids, None, prompt_len=1, eos=_hf.BART_EOS, num_beams=3, max_new_tokens=GEN,
               eos_token_id=list(_hf.BART_EOS))
    finally:
        gc.forced_eos_token_id = saved


# ---- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,exc,word", [
    (dict(num_beams=0), ValueError, "num_beams"),
    (dict(num_beams=-2), ValueError, "num_beams"),
    (dict(num_beams=2.0), TypeError, "num_beams"),
    (dict(num_beams=True), TypeError, "num_beams"),
    (dict(num_beams=2, num_return_sequences=3), ValueError, "num_return_sequences"),
    (dict(num_beams=2, num_return_sequences=0), ValueError, "num_return_sequences"),
    (dict(num_beams=2, max_new_tokens=0), ValueError, "max_new_tokens"),
    (dict(num_beams=2, max_length=3, max_new_tokens=None), ValueError, "max_length"),
    (dict(num_beams=2, early_stopping="sometimes"), ValueError, "early_stopping"),
    (dict(num_beams=2, eos_token_id="x"), TypeError, "eos_token_id"),
    (dict(num_beams=2, length_penalty="1"), TypeError, "length_penalty"),
])
def test_bad_arguments(gpt2, kw, exc, word):
    ids = torch.randint(2, 50, (2, 4))
    with pytest.raises(exc, match=word):
        beam_search(gpt2, ids, max_new_tokens=kw.pop("max_new_tokens", 3), **kw)


@pytest.mark.parametrize("ids,exc", [
    (torch.rand(2, 4), TypeError),
    (torch.ones(2, 4, dtype=torch.bool), TypeError),
    (torch.ones(4, dtype=torch.long), ValueError),
    (torch.ones(1, 2, 4, dtype=torch.long), ValueError),
    (torch.ones(0, 4, dtype=torch.long), ValueError),
    ([[1, 2, 3]], TypeError),
])
def test_bad_input_ids(gpt2, ids, exc):
    with pytest.raises(exc, match="input_ids"):
        beam_search(gpt2, ids, num_beams=2, max_new_tokens=3)


def test_bad_attention_mask_and_model(gpt2):
    ids = torch.randint(2, 50, (2, 4))
    with pytest.raises(ValueError, match="attention_mask"):
        beam_search(gpt2, ids, torch.ones(2, 5, dtype=torch.long), num_beams=2, max_new_tokens=3)
    with pytest.raises(TypeError, match="attention_mask"):
        beam_search(gpt2, ids, torch.ones(2, 4), num_beams=2, max_new_tokens=3)
    with pytest.raises(TypeError, match="model"):
        beam_search(object(), ids, num_beams=2, max_new_tokens=3)
    with pytest.raises(ValueError, match="logits"):
        beam_search(lambda i, m: torch.zeros(i.shape[0], 10), ids, num_beams=2, max_new_tokens=3)


# ---- what runs: the fused step op, the encoder once ---------------------------------------------------

def test_uses_step_op_and_encoder_once(bart, monkeypatch):
    import importlib

    bs_mod = importlib.import_module("pydl.generation.beam_search")

    calls = []
    step = bs_mod._beam_search_step
    monkeypatch.setattr(bs_mod, "_beam_search_step", lambda *a, **k: calls.append(a[0].shape) or step(*a, **k))
    enc_calls = []
    h = bart.get_encoder().register_forward_hook(lambda mod, inp, out: enc_calls.append(1))
    try:
        ids, mask = _hf.encoder_inputs(2, 6, seed=7)
        out = beam_search(bart, ids, mask, num_beams=4, max_new_tokens=GEN)
    finally:
        h.remove()
    assert len(enc_calls) == 1
    assert 1 <= len(calls) <= GEN and all(s == (2 * 4, _hf.V) for s in calls)  # logits (B*K, V) per step
    assert out.sequences.shape[1] <= 1 + GEN
