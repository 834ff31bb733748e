"""Hugging Face interop: pydl.models.from_transformers / to_transformers on GPT2LMHeadModel, BertModel
and BertForMaskedLM of tiny random configs (nothing downloaded): equal outputs and gradients both
ways, GPT-2 left padding as transformers' generate positions it, beam search through pydl's KV cache
equal to transformers' generate, refused configs."""

from __future__ import annotations

import pytest
import torch

from pydl.models.convert import from_transformers, to_transformers

from ._hf import import_transformers

tf = import_transformers()

ATOL, RTOL = 2e-5, 1e-4  # float32, different summation orders


def _ids(B, T, V, seed=0):
    return torch.randint(1, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _gpt_cfg(**kw):
    base = dict(vocab_size=101, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return tf.GPT2Config(**{**base, **kw})


def _bert_cfg(**kw):
    base = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                max_position_embeddings=24, type_vocab_size=3)
    return tf.BertConfig(**{**base, **kw})


def _grads_close(pydl_model, hf_model, name_map, transpose=()):
    hf_params = dict(hf_model.named_parameters())
    for name, p in pydl_model.named_parameters():
        q = hf_params[name_map(name)]
        g = q.grad.t() if name.endswith(transpose) else q.grad
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _gpt_name(n):
    return n if n == "lm_head.weight" else "transformer." + n


# ---- GPT-2 -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(), dict(n_inner=50, activation_function="gelu", layer_norm_epsilon=1e-6,
                                             scale_attn_by_inverse_layer_idx=True),
                                dict(activation_function="relu", tie_word_embeddings=False)])
def test_gpt2_from_transformers_same_logits_and_gradients(kw):
    torch.manual_seed(0)
    hf = tf.GPT2LMHeadModel(_gpt_cfg(**kw)).eval()
    m = from_transformers(hf)
    cfg = m.config
    assert (cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.vocab_size, cfg.inner_dim) == (
        32, 2, 4, 101, kw.get("n_inner") or 128)
    assert (m.lm_head.weight is m.wte.weight) == kw.get("tie_word_embeddings", True)
    assert not m.training
    ids = _ids(2, 9, 101)
    out, ref = m(ids), hf(ids).logits
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
    out.square().mean().backward()
    ref.square().mean().backward()
    _grads_close(m, hf, _gpt_name, _CONV1D)


def test_gpt2_left_padding_matches_transformers():
    """transformers positions a left-padded prompt with cumsum(mask) - 1 in generate; pydl's forward
    does that itself from the mask."""
    torch.manual_seed(0)
    hf = tf.GPT2LMHeadModel(_gpt_cfg()).eval()
    m = from_transformers(hf)
    ids = _ids(3, 8, 101, 1)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :7] = 0
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    ref = hf(ids, attention_mask=mask, position_ids=pos).logits
    out = m(ids, mask)
    keep = mask.bool()
    torch.testing.assert_close(out[keep], ref[keep], rtol=RTOL, atol=ATOL)
    out[keep].square().mean().backward()
    ref[keep].square().mean().backward()
    _grads_close(m, hf, _gpt_name, _CONV1D)


def test_gpt2_beam_search_through_the_kv_cache_equals_transformers_generate():
    from pydl.generation import beam_search

    torch.manual_seed(0)
    hf = tf.GPT2LMHeadModel(_gpt_cfg()).eval()
    m = from_transformers(hf)
    ids = _ids(2, 6, 101, 2)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    ours = beam_search(m, ids, mask, num_beams=3, max_new_tokens=6, eos_token_id=5, pad_token_id=0)
    theirs = hf.generate(ids, attention_mask=mask, num_beams=3, max_new_tokens=6, do_sample=False, eos_token_id=5,
                         pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    assert ours.sequences.tolist() == theirs.sequences.tolist()
    torch.testing.assert_close(ours.sequences_scores, theirs.sequences_scores, rtol=1e-4, atol=1e-5)


def test_gpt2_to_transformers_round_trip():
    torch.manual_seed(0)
    from pydl.models.gpt import gpt2

    m = gpt2(vocab_size=101, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=48).eval()
    hf = to_transformers(m)
    assert isinstance(hf, tf.GPT2LMHeadModel) and not hf.training
    assert hf.config.n_inner == 48 and hf.lm_head.weight is hf.transformer.wte.weight
    ids = _ids(2, 7, 101)
    torch.testing.assert_close(hf(ids).logits, m(ids), rtol=RTOL, atol=ATOL)
    back = from_transformers(hf)
    for (k, a), (k2, b) in zip(m.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert back.wte.weight.data_ptr() != m.wte.weight.data_ptr()  # a copy, not shared storage


def test_gpt2_dtype_follows_the_source():
    hf = tf.GPT2LMHeadModel(_gpt_cfg()).to(torch.bfloat16).eval()
    m = from_transformers(hf)
    assert m.wte.weight.dtype == torch.bfloat16 and m.h[0].ln_1.weight.dtype == torch.bfloat16
    ids = _ids(1, 5, 101)
    assert (m(ids).float() - hf(ids).logits.float()).abs().max() < 0.1


# ---- BERT --------------------------------------------------------------------------------------------

def _bert_inputs(V=99):
    ids = _ids(3, 10, V, 3)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    tt = torch.zeros_like(ids)
    tt[:, 5:] = 1
    tt[0, 8:] = 2
    return ids, mask, tt


@pytest.mark.parametrize("kw", [dict(), dict(hidden_act="gelu_new", layer_norm_eps=1e-5, intermediate_size=24)])
def test_bert_model_from_transformers_same_outputs_and_gradients(kw):
    torch.manual_seed(0)
    hf = tf.BertModel(_bert_cfg(**kw)).eval()
    m = from_transformers(hf)
    assert m.config.type_vocab_size == 3 and m.pooler is not None
    ids, mask, tt = _bert_inputs()
    ref = hf(ids, attention_mask=mask, token_type_ids=tt)
    out = m(ids, mask, tt)
    keep = mask.bool()
    torch.testing.assert_close(out[keep], ref.last_hidden_state[keep], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(m.pooled_output(out), ref.pooler_output, rtol=RTOL, atol=ATOL)
    (out[keep].square().mean() + m.pooled_output(out).sum()).backward()
    (ref.last_hidden_state[keep].square().mean() + ref.pooler_output.sum()).backward()
    _grads_close(m, hf, lambda n: n)


def test_bert_without_pooler_and_to_transformers():
    torch.manual_seed(0)
    hf = tf.BertModel(_bert_cfg(), add_pooling_layer=False).eval()
    m = from_transformers(hf)
    assert m.pooler is None
    back = to_transformers(m)
    assert isinstance(back, tf.BertModel) and back.pooler is None
    ids, mask, tt = _bert_inputs()
    torch.testing.assert_close(back(ids, attention_mask=mask, token_type_ids=tt).last_hidden_state,
                               hf(ids, attention_mask=mask, token_type_ids=tt).last_hidden_state, rtol=0, atol=0)
    # the state_dict keys are transformers' own
    assert sorted(m.state_dict()) == sorted(hf.state_dict())


def test_bert_mlm_round_trip():
    torch.manual_seed(0)
    hf = tf.BertForMaskedLM(_bert_cfg()).eval()
    m = from_transformers(hf)
    assert m.cls.predictions.decoder.weight is m.bert.embeddings.word_embeddings.weight
    ids, mask, tt = _bert_inputs()
    ref = hf(ids, attention_mask=mask, token_type_ids=tt).logits
    out = m(ids, mask, tt)
    keep = mask.bool()
    torch.testing.assert_close(out[keep], ref[keep], rtol=RTOL, atol=ATOL)
    out[keep].square().mean().backward()
    ref[keep].square().mean().backward()
    _grads_close(m, hf, lambda n: n)
    back = to_transformers(m)
    assert isinstance(back, tf.BertForMaskedLM)
    assert back.cls.predictions.decoder.weight is back.bert.embeddings.word_embeddings.weight
    torch.testing.assert_close(back(ids, attention_mask=mask, token_type_ids=tt).logits, ref, rtol=0, atol=0)


# ---- refusals ------------------------------------------------------------------------------------------

def test_unsupported_models_and_configs_are_refused():
    with pytest.raises(TypeError, match="GPT2LMHeadModel, BertModel or BertForMaskedLM"):
        from_transformers(tf.GPT2Model(_gpt_cfg()))
    with pytest.raises(TypeError, match="pydl GPT, Bert or BertForMaskedLM"):
        to_transformers(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="add_cross_attention"):
        from_transformers(tf.GPT2LMHeadModel(_gpt_cfg(add_cross_attention=True)))
    with pytest.raises(ValueError, match="activation_function"):
        from_transformers(tf.GPT2LMHeadModel(_gpt_cfg(activation_function="gelu_10")))
    with pytest.raises(ValueError, match="is_decoder"):
        from_transformers(tf.BertModel(_bert_cfg(is_decoder=True)))
    cfg = _bert_cfg()
    cfg.position_embedding_type = "relative_key"
    with pytest.raises(ValueError, match="position_embedding_type"):
        from_transformers(tf.BertModel(cfg))
