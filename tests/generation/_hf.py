"""Tiny randomly initialised Hugging Face models (nothing downloaded) and comparison helpers.

EOS must actually occur for the finishing logic to be exercised: the embedding rows of the EOS ids
(tied to the LM head) are scaled up, which makes them likely next tokens.
"""

from __future__ import annotations

import functools
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
GPT2_EOS = (1, 7)   # GPT-2 test model: ids 1 (its config's EOS) and 7 boosted
BART_EOS = (2, 9)   # BART test model: ids 2 (its config's EOS) and 9 boosted
V = 100


def transformers():
    """transformers, imported with torchvision made importable first (pydl.models._timm)."""
    from pydl.models._timm import import_transformers

    tf = import_transformers()
    tf.logging.set_verbosity_error()
    return tf


@functools.lru_cache(maxsize=None)
def gpt2():
    tf = transformers()
    torch.manual_seed(1234)
    cfg = tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=V, n_positions=64, bos_token_id=0,
                        eos_token_id=GPT2_EOS[0])
    m = tf.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        m.transformer.wte.weight[list(GPT2_EOS)] *= 3.5
    return m


@functools.lru_cache(maxsize=None)
def bart():
    tf = transformers()
    torch.manual_seed(4321)
    cfg = tf.BartConfig(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
    m = tf.BartForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        m.model.shared.weight[list(BART_EOS)] *= 3.0
    return m


def prompts(batch: int, length: int, seed: int, pad: int = 0, lo: int = 10):
    """Left-padded prompts (B, T) and their mask: row b has b % 3 leading pads."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(lo, V, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for b in range(batch):
        mask[b, : b % 3] = 0
    return ids.masked_fill(mask == 0, pad), mask


def encoder_inputs(batch: int, length: int, seed: int):
    """Right-padded encoder inputs (B, S) for BART (pad id 1) and their mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, V, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for b in range(batch):
        mask[b, length - b % 3:] = 0
    return ids.masked_fill(mask == 0, 1), mask


def hf_generate(model, ids, mask, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, do_sample=False, return_dict_in_generate=True,
                              output_scores=True, **kw)


def assert_same(ref, out, beams: bool) -> None:
    assert out.sequences.dtype == ref.sequences.dtype
    assert torch.equal(out.sequences, ref.sequences), (out.sequences, ref.sequences)
    if beams:
        torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, atol=1e-4, rtol=0)
        assert out.beam_indices.dtype == ref.beam_indices.dtype
        assert torch.equal(out.beam_indices, ref.beam_indices)
    else:
        assert out.sequences_scores is None and out.beam_indices is None


def finished_early(out, prompt_len: int, eos) -> bool:
    """Whether some returned hypothesis ended with an EOS id (the finishing logic ran)."""
    gen = out.sequences[:, prompt_len:]
    return bool(torch.isin(gen, torch.tensor(list(eos))).any())


def gpt2_callable(model):
    """(input_ids, attention_mask) -> logits over the whole prefix, no cache; positions as
    transformers computes them for left padding."""
    def fn(ids, mask):
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        m = None if bool((mask == 1).all()) else mask
        return model(input_ids=ids, attention_mask=m, position_ids=pos, use_cache=False).logits
    return fn
