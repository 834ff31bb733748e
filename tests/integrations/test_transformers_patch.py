"""pydl.patch on Hugging Face models (tiny random configs, nothing downloaded): GPT-2, BERT (masked
LM) and a GQA LLaMA give the unpatched outputs and gradients in train and eval mode; the attention
implementation goes to "pydl" and back; the LLaMA RMSNorms and the GPT-2/BERT LayerNorms get pydl's
kernels; unpatch restores every type; generation of a patched model equals the unpatched one."""

from __future__ import annotations

import pytest
import torch

import pydl

from ..models._hf import import_transformers
from ..utils.patching import check_patch

tf = import_transformers()  # (or skip the module)

import pydl.integrations.transformers  # noqa: E402,F401  (registers "pydl")

V = 97


def _model(family: str):
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=V, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0)
        return tf.GPT2LMHeadModel(cfg)
    if family == "bert":
        cfg = tf.BertConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=96, max_position_embeddings=32, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
        return tf.BertForMaskedLM(cfg)
    cfg = tf.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return tf.LlamaForCausalLM(cfg)


def _inputs(family: str) -> dict:
    ids = torch.randint(1, V, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if family == "bert":
        mask[0, -3:] = 0   # right padding
    else:
        mask[0, :3] = 0    # left padding
    return {"input_ids": ids, "attention_mask": mask}


# family: the replacements pydl.patch makes, per family
CASES = {
    "gpt2": {"attention": 1, "layer_norm": 5},
    "bert": {"attention": 1, "layer_norm": 6},
    "llama": {"attention": 1, "rms_norm": 5},
}


@pytest.mark.parametrize("family", list(CASES))
def test_patch_matches_unpatched(family):
    model = _model(family)
    assert model.config._attn_implementation == "sdpa"
    report = check_patch(model, _inputs(family), atol=1e-5, rtol=1e-4)
    assert report.counts() == CASES[family]
    assert report.replaced[0].name == "" and '"pydl"' in report.replaced[0].new_type
    assert model.config._attn_implementation == "sdpa"  # unpatched (check_patch ends with unpatch)


def test_patched_llama_runs_pydl_and_generates_the_same():
    model = _model("llama").eval()
    ids = torch.randint(1, V, (2, 5), generator=torch.Generator().manual_seed(1))
    want = model.generate(ids, max_new_tokens=6, do_sample=False, num_beams=2)
    pydl.patch(model)
    assert model.config._attn_implementation == "pydl"
    norm = model.model.layers[0].input_layernorm
    assert isinstance(norm, tf.models.llama.modeling_llama.LlamaRMSNorm)
    assert type(norm).forward is pydl.integrations.transformers.llama_rms_norm_forward
    got = model.generate(ids, max_new_tokens=6, do_sample=False, num_beams=2)
    assert torch.equal(got, want)
    pydl.unpatch(model)
    assert type(norm) is tf.models.llama.modeling_llama.LlamaRMSNorm


def test_patch_only_norms_leaves_attention():
    model = _model("gpt2")
    report = pydl.patch(model, ops=["layer_norm"])
    assert report.counts() == {"layer_norm": 5} and model.config._attn_implementation == "sdpa"
    pydl.unpatch(model)


def test_patched_bf16_gpt2_close():
    model = _model("gpt2").to(torch.bfloat16).eval()
    inputs = _inputs("gpt2")
    with torch.no_grad():
        want = model(**inputs).logits.float()
        report = pydl.patch(model, verify=inputs)
        got = model(**inputs).logits.float()
    assert report.max_abs_diff < 0.1
    keep = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[keep], want[keep], atol=0.1, rtol=0.05)
    pydl.unpatch(model)
