"""pydl.models.transformer: the Vaswani encoder-decoder — equal to torch.nn.Transformer (GELU,
batch_first) parameter for parameter, decoder causality, padding, KV-cache decoding equal to the full
forward, generation through the cache, bf16 autocast, errors."""

from __future__ import annotations

import math

import pytest
import torch

from pydl.models.transformer import Transformer, sinusoidal_positions, transformer

V_SRC, V_TGT = 50, 61
TINY = dict(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=48)


def _model(norm_first=False, **kw):
    torch.manual_seed(0)
    return transformer(V_SRC, V_TGT, **TINY, norm_first=norm_first, **kw).eval()


def _ids(B, T, V, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _pad(B, T, padded: dict):
    """(B, T) bool key padding mask, True = padding: row b's last padded[b] positions."""
    m = torch.zeros(B, T, dtype=torch.bool)
    for b, n in padded.items():
        m[b, T - n:] = True
    return m


def test_sinusoidal_positions():
    pe = sinusoidal_positions(torch.arange(6), 8)
    assert pe.shape == (6, 8)
    p, i = 5, 1  # PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(...)
    torch.testing.assert_close(pe[p, 2 * i], torch.tensor(math.sin(p / 10000 ** (2 * i / 8))))
    torch.testing.assert_close(pe[p, 2 * i + 1], torch.tensor(math.cos(p / 10000 ** (2 * i / 8))))
    assert sinusoidal_positions(torch.arange(3), 7).shape == (3, 7)  # odd width


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
def test_equals_torch_nn_transformer(norm_first):
    """encoder/decoder state_dicts load into torch.nn.Transformer(activation="gelu", batch_first=True)
    and give the same output (padding masks included); the embedding is scaled by sqrt(d_model) and
    has the sinusoidal positions added."""
    m = _model(norm_first)
    ref = torch.nn.Transformer(TINY["d_model"], TINY["nhead"], 2, 2, TINY["dim_feedforward"], activation="gelu",
                               batch_first=True, norm_first=norm_first).eval()
    ref.encoder.load_state_dict(m.encoder.state_dict(), strict=True)
    ref.decoder.load_state_dict(m.decoder.state_dict(), strict=True)
    src, tgt = _ids(3, 7, V_SRC), _ids(3, 5, V_TGT, 1)
    spm, tpm = _pad(3, 7, {1: 2}), _pad(3, 5, {2: 2})
    out = m(src, tgt, spm, tpm)
    d = TINY["d_model"]
    xs = m.src_embed(src) * math.sqrt(d) + sinusoidal_positions(torch.arange(7), d)
    xt = m.tgt_embed(tgt) * math.sqrt(d) + sinusoidal_positions(torch.arange(5), d)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.bool)
    h = ref(xs, xt, tgt_mask=causal, src_key_padding_mask=spm, tgt_key_padding_mask=tpm,
            memory_key_padding_mask=spm, tgt_is_causal=True)
    torch.testing.assert_close(out[~tpm], m.generator(h)[~tpm], rtol=1e-4, atol=1e-5)
    assert out.shape == (3, 5, V_TGT)


def test_decoder_causality_and_source_padding():
    m = _model()
    src, tgt = _ids(2, 6, V_SRC), _ids(2, 8, V_TGT, 1)
    spm = _pad(2, 6, {0: 2})
    base = m(src, tgt, spm)
    for j in (2, 7):  # changing a later target token never changes an earlier position's logits
        alt = tgt.clone()
        alt[:, j] = (alt[:, j] + 1) % V_TGT
        out = m(src, alt, spm)
        torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=1e-6)
        assert (out[:, j] - base[:, j]).abs().max() > 1e-4
    alt_src = src.masked_fill(spm, 3)  # padded source tokens are never attended to
    torch.testing.assert_close(m(alt_src, tgt, spm), base, rtol=0, atol=1e-6)
    # a padded row equals that row run alone without its padding
    torch.testing.assert_close(m(src[:1, :4], tgt[:1]), base[:1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm_first", [False, True])
@torch.no_grad()
def test_kv_cache_decoding_equals_full_forward(norm_first):
    """encode() once (cross-attention K/V per item; left padding compacted), then a prefill and
    T=1 steps through the KVCache give the full forward's logits at every step."""
    m = _model(norm_first)
    src, tgt = _ids(3, 7, V_SRC), _ids(3, 6, V_TGT, 1)
    keep = torch.ones(3, 7, dtype=torch.long)
    keep[0, :2] = 0  # left padding
    keep[1, 5:] = 0  # right padding
    full = m(src, tgt, keep == 0)
    cache = m.init_cache(3, 10)
    m.encode(src, keep, cache)
    steps = [m.forward_step(tgt[:, :2], cache)] + [m.forward_step(tgt[:, t:t + 1], cache) for t in range(2, 6)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
    assert cache.lengths.tolist() == [6, 6, 6]


def test_generation_protocol_and_greedy_search():
    from pydl.generation import GenerationModel, beam_search, greedy_search

    m = _model(decoder_start_token_id=1)
    assert isinstance(m, GenerationModel) and m.is_encoder_decoder
    src = _ids(2, 6, V_SRC, 2)
    keep = torch.ones_like(src)
    keep[1, 4:] = 0
    out = greedy_search(m, src, keep, max_new_tokens=6)
    with torch.no_grad():  # the same greedy loop over the full forward
        seq = torch.ones(2, 1, dtype=torch.long)
        for _ in range(6):
            nxt = m(src, seq, keep == 0)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert out.sequences.tolist() == seq.tolist()
    # beam search: with length_penalty=0 a returned score is the sequence's summed log-probability
    res = beam_search(m, src, keep, num_beams=3, max_new_tokens=5, length_penalty=0.0, num_return_sequences=2)
    seqs = res.sequences  # (B * 2, 6)
    with torch.no_grad():
        src2, pad2 = src.repeat_interleave(2, 0), (keep == 0).repeat_interleave(2, 0)
        logp = m(src2, seqs[:, :-1], pad2).log_softmax(-1).gather(-1, seqs[:, 1:, None])[..., 0].sum(1)
    torch.testing.assert_close(res.sequences_scores, logp, rtol=1e-4, atol=1e-4)


def test_training_step_and_bf16_autocast():
    torch.manual_seed(0)
    m = transformer(V_SRC, V_TGT, **TINY, norm_first=True)  # train mode: dropout on
    src, tgt = _ids(2, 7, V_SRC), _ids(2, 6, V_TGT, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = m(src, tgt[:, :-1], _pad(2, 7, {0: 2}), _pad(2, 5, {1: 1}))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tgt[:, 1:].flatten())
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_tied_embeddings_and_default_size():
    m = transformer(V_SRC, V_TGT, **TINY, tie_word_embeddings=True)
    assert m.generator.weight is m.tgt_embed.weight
    with torch.device("meta"):
        base = transformer(1000, 1000)  # the paper's base sizes, 6 + 6 layers
    assert len(base.encoder.layers) == 6 and len(base.decoder.layers) == 6 and base.d_model == 512
    assert base.encoder.layers[0].linear1.out_features == 2048 and not base.encoder.norm_first


def test_bad_config_and_input():
    with pytest.raises(ValueError, match="divisible"):
        Transformer(10, 10, d_model=30, nhead=4)
    with pytest.raises(ValueError, match="activation"):
        Transformer(10, 10, **TINY, activation="nope")
    m = _model()
    with pytest.raises(TypeError, match="src"):
        m(torch.zeros(2, 3), _ids(2, 3, V_TGT))
    with pytest.raises(ValueError, match="src_key_padding_mask"):
        m(_ids(2, 3, V_SRC), _ids(2, 3, V_TGT), torch.zeros(2, 4, dtype=torch.bool))
