"""pydl.models.bert: the encoder with attention_mask and token types, the MLM head (tied decoder),
the BERT-base parameter count, bf16 autocast, errors. (Equality with Hugging Face: test_hf_convert.py.)"""

from __future__ import annotations

import pytest
import torch

from pydl.models.bert import Bert, BertConfig, BertForMaskedLM, bert, bert_mlm

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=24)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return bert(**TINY).eval()


def _ids(B, T, seed=0):
    return torch.randint(1, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


def test_parameter_counts_of_bert_base():
    with torch.device("meta"):
        enc, mlm = bert(), bert_mlm()
    assert sum(p.numel() for p in enc.parameters()) == 109_482_240  # 109.48M, with the pooler
    assert sum(p.numel() for p in mlm.parameters()) == 109_514_298  # no pooler; decoder tied
    assert BertConfig().hidden_size == 768 and BertConfig().num_hidden_layers == 12


def test_attention_mask_padding_invariance(model):
    """A right-padded row's real tokens get the hidden states of the row run alone; padding tokens'
    values never matter."""
    ids = _ids(3, 10)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 1:] = 0
    tt = torch.zeros_like(ids)
    tt[:, 4:] = 1
    out = model(ids, mask, tt)
    assert out.shape == (3, 10, TINY["hidden_size"]) and torch.isfinite(out).all()
    for b, n in enumerate((10, 6, 1)):
        alone = model(ids[b:b + 1, :n], None, tt[b:b + 1, :n])
        torch.testing.assert_close(out[b:b + 1, :n], alone, rtol=1e-4, atol=1e-5)
    alt = ids.masked_fill(mask == 0, 5)
    torch.testing.assert_close(model(alt, mask, tt)[mask.bool()], out[mask.bool()], rtol=0, atol=1e-6)
    # mask dtypes: bool == long == float
    torch.testing.assert_close(model(ids, mask.bool(), tt), out, rtol=0, atol=0)
    torch.testing.assert_close(model(ids, mask.float(), tt), out, rtol=0, atol=0)


def test_token_types(model):
    ids = _ids(2, 7)
    zeros = torch.zeros_like(ids)
    torch.testing.assert_close(model(ids), model(ids, None, zeros), rtol=0, atol=0)  # None = all type 0
    ones = torch.ones_like(ids)
    assert (model(ids, None, ones) - model(ids)).abs().max() > 1e-3


def test_pooler(model):
    h = model(_ids(2, 5))
    p = model.pooled_output(h)
    assert p.shape == (2, TINY["hidden_size"]) and p.abs().max() <= 1
    with pytest.raises(RuntimeError, match="add_pooling_layer"):
        bert(**TINY, add_pooling_layer=False).pooled_output(h)


def test_mlm_head_is_tied_and_gives_logits():
    torch.manual_seed(0)
    m = bert_mlm(**TINY).eval()
    assert isinstance(m, BertForMaskedLM) and m.bert.pooler is None
    pred = m.cls.predictions
    assert pred.decoder.weight is m.bert.embeddings.word_embeddings.weight
    assert pred.decoder.bias is pred.bias
    ids = _ids(2, 6)
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    logits = m(ids, mask)
    assert logits.shape == (2, 6, TINY["vocab_size"])
    h = m.bert(ids, mask)
    torch.testing.assert_close(logits, pred.decoder(pred.transform(h)), rtol=0, atol=0)
    logits.sum().backward()
    assert m.bert.embeddings.word_embeddings.weight.grad is not None and pred.bias.grad is not None


def test_training_step_and_bf16_autocast():
    torch.manual_seed(0)
    m = bert_mlm(**TINY)  # train mode (dropout)
    ids = _ids(2, 8)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = m(ids, mask)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    m.eval()
    with torch.no_grad():
        ref = m.bert(ids, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = m.bert(ids, mask)
    assert (low.float() - ref).abs().max() < 0.15


def test_bad_config_and_input(model):
    with pytest.raises(ValueError, match="divisible"):
        Bert(**{**TINY, "hidden_size": 30})
    with pytest.raises(ValueError, match="hidden_act"):
        Bert(**{**TINY, "hidden_act": "nope"})
    with pytest.raises(TypeError, match="input_ids"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="attention_mask"):
        model(_ids(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(_ids(1, TINY["max_position_embeddings"] + 1))
