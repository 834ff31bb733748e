"""pydl.generation.greedy_search == transformers' generate(do_sample=False, num_beams=1), and
beam_search(num_beams=1) == greedy_search (as in transformers)."""

from __future__ import annotations

import pytest
import torch

from pydl.generation import beam_search, greedy_search

from . import _hf
from ._pydl_model import PydlGPT2

EOS = list(_hf.GPT2_EOS)


@pytest.fixture(scope="module")
def gpt2():
    return _hf.gpt2()


@pytest.fixture(scope="module")
def batch():
    return _hf.prompts(4, 5, seed=5)


@pytest.mark.parametrize("kind", ["hf", "callable", "pydl"])
@pytest.mark.parametrize("kw", [dict(eos_token_id=EOS, pad_token_id=3), dict(min_new_tokens=3, eos_token_id=EOS),
                                dict(eos_token_id=1, pad_token_id=0)])
def test_gpt2_greedy(gpt2, batch, kind, kw):
    ids, mask = batch
    model = {"hf": gpt2, "callable": _hf.gpt2_callable(gpt2), "pydl": PydlGPT2(gpt2)}[kind]
    ref = _hf.hf_generate(gpt2, ids, mask, max_new_tokens=10, **kw)
    out = greedy_search(model, ids, mask, max_new_tokens=10, **kw)
    _hf.assert_same(ref, out, beams=False)
    assert _hf.finished_early(out, 5, EOS)
    assert torch.equal(beam_search(model, ids, mask, num_beams=1, max_new_tokens=10, **kw).sequences, out.sequences)


def test_bart_greedy():
    bart = _hf.bart()
    ids, mask = _hf.encoder_inputs(3, 7, seed=6)
    for kw in (dict(), dict(eos_token_id=list(_hf.BART_EOS), min_new_tokens=2)):
        ref = _hf.hf_generate(bart, ids, mask, max_new_tokens=10, **kw)
        out = greedy_search(bart, ids, mask, max_new_tokens=10, **kw)
        _hf.assert_same(ref, out, beams=False)


def test_greedy_bad_input(gpt2):
    with pytest.raises(TypeError, match="input_ids"):
        greedy_search(gpt2, torch.rand(1, 3), max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids"):
        greedy_search(gpt2, torch.ones(3, dtype=torch.long), max_new_tokens=2)
