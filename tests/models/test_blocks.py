"""Injected blocks of the sequence models (gpt2, bert, bert_mlm, transformer): ``norm_layer``,
``attention`` and ``decode_attention`` keyword arguments. torch's blocks give the default model's
state_dict keys, outputs and gradients; the injected callables are the ones called (and the fused
add + LayerNorm only runs for pydl's LayerNorm); RMSNorm builds and trains; bad blocks are refused;
generation runs through injected blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pydl
import pydl.models._seq as seq
from pydl.generation import greedy_search
from pydl.models.bert import bert, bert_mlm
from pydl.models.gpt import gpt2
from pydl.models.transformer import transformer

EPS = 1e-6  # not any model's default: shows that the model's eps reaches norm_layer

GPT = dict(vocab_size=97, n_positions=24, n_embd=32, n_layer=2, n_head=4, layer_norm_epsilon=EPS,
           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
BERT = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=24, layer_norm_eps=EPS, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)
TF = dict(src_vocab_size=50, tgt_vocab_size=61, d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
          dim_feedforward=48, dropout=0.0, layer_norm_eps=EPS)

# name -> (factory, its small keywords, number of norms, residual adds + norms, takes decode_attention)
MODELS = {
    "gpt2": (gpt2, GPT, 2 * 2 + 1, 2 * 2, True),
    "bert": (bert, BERT, 1 + 2 * 2, 1 + 2 * 2, False),
    "bert_mlm": (bert_mlm, BERT, 1 + 2 * 2 + 1, 1 + 2 * 2, False),
    "transformer": (transformer, TF, 2 * 2 + 1 + 3 * 2 + 1, 2 * 2 + 3 * 2, True),
    "transformer_pre_ln": (transformer, {**TF, "norm_first": True}, 2 * 2 + 1 + 3 * 2 + 1, 2 * 2 + 3 * 2, True),
}


def torch_decode_attention(q, k_cache, v_cache, cache_seqlens, scale=None):
    """pydl.ops.decode_attention as a torch composition: q (B, H, 1, D) over each row's valid prefix.
    The cache past a row's length is uninitialised memory (NaN possibly), so it is zeroed, not only
    masked: a masked NaN value would still give 0 * NaN = NaN."""
    valid = (torch.arange(k_cache.shape[2], device=q.device) < cache_seqlens.to(torch.int64)[:, None])[:, None]
    k, v = (t.masked_fill(~valid[..., None], 0.0) for t in (k_cache, v_cache))  # (B, H, L, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, :, None, :], scale=scale)


class Counting:
    """A callable that counts its calls and forwards them to ``fn``."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


class Recording:
    """A norm_layer that builds ``cls(dim, eps=eps)`` and keeps every instance it built."""

    def __init__(self, cls=nn.LayerNorm):
        self.cls, self.made = cls, []

    def __call__(self, dim, eps):
        self.made.append(self.cls(dim, eps=eps))
        return self.made[-1]


def _build(name, **blocks):
    factory, kw, *_ = MODELS[name]
    torch.manual_seed(0)
    return factory(**kw, **blocks)


def _torch_blocks(name):
    blocks = dict(norm_layer=nn.LayerNorm, attention=F.scaled_dot_product_attention)
    if MODELS[name][4]:
        blocks["decode_attention"] = torch_decode_attention
    return blocks


def _inputs(name, padded: bool):
    """Positional forward arguments: token ids and (``padded``) padding masks in the model's convention
    (gpt2: left padding, bert: right padding + token types, transformer: key padding masks, True = pad)."""
    g = torch.Generator().manual_seed(1)
    if name.startswith("transformer"):
        src, tgt = torch.randint(0, 50, (3, 7), generator=g), torch.randint(0, 61, (3, 5), generator=g)
        if not padded:
            return src, tgt
        spm, tpm = torch.zeros(3, 7, dtype=torch.bool), torch.zeros(3, 5, dtype=torch.bool)
        spm[1, 5:], tpm[2, 3:] = True, True
        return src, tgt, spm, tpm
    ids = torch.randint(1, 97, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    if name == "gpt2":
        mask[0, :3] = 0
        return (ids, mask) if padded else (ids,)
    mask[1, 6:] = 0
    tt = torch.zeros_like(ids)
    tt[:, 5:] = 1
    return (ids, mask if padded else torch.ones_like(ids), tt)


def _output_and_grads(model, args):
    out = model(*args)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * w).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("name", list(MODELS))
def test_torch_blocks_load_the_state_dict_and_give_the_same_outputs_and_gradients(name, padded, train):
    ref = _build(name).train(train)
    model = _build(name, **_torch_blocks(name)).train(train)
    assert list(model.state_dict()) == list(ref.state_dict())
    model.load_state_dict(ref.state_dict(), strict=True)
    args = _inputs(name, padded)
    out, grads = _output_and_grads(model, args)
    ref_out, ref_grads = _output_and_grads(ref, args)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("name", list(MODELS))
def test_injected_blocks_are_the_ones_called(name, monkeypatch):
    _, _, n_norms, n_adds, has_decode = MODELS[name]
    fused = Counting(seq.add_layer_norm)
    monkeypatch.setattr(seq, "add_layer_norm", fused)  # add_norm's fused path
    norm, attn, dec = Recording(), Counting(F.scaled_dot_product_attention), Counting(torch_decode_attention)
    blocks = dict(norm_layer=norm, attention=attn, **(dict(decode_attention=dec) if has_decode else {}))
    model = _build(name, **blocks).eval()
    # every norm of the model is one norm_layer built, with the model's eps
    assert len(norm.made) == n_norms and all(m.eps == EPS for m in norm.made)
    assert {id(m) for m in model.modules() if isinstance(m, nn.LayerNorm)} == {id(m) for m in norm.made}
    used = {id(m): 0 for m in norm.made}
    for m in norm.made:
        m.register_forward_hook(lambda mod, i, o: used.__setitem__(id(mod), used[id(mod)] + 1))
    with torch.no_grad():
        model(*_inputs(name, padded=True))
    assert all(used.values()) and attn.calls > 0 and fused.calls == 0
    # the default model: pydl's LayerNorm and ops, the fused add + LayerNorm for every residual add,
    # and none of the injected callables
    calls = (attn.calls, dec.calls)
    ref = _build(name).eval()
    assert all(type(m) is pydl.nn.LayerNorm for m in ref.modules() if isinstance(m, nn.LayerNorm))
    with torch.no_grad():
        ref(*_inputs(name, padded=True))
    assert fused.calls == n_adds and (attn.calls, dec.calls) == calls


@pytest.mark.parametrize("name", ["gpt2", "transformer"])
def test_greedy_search_through_injected_blocks(name):
    """Generation over the KV cache runs the injected attention (prefill) and decode_attention (steps)
    and finds the default model's sequences."""
    attn, dec = Counting(F.scaled_dot_product_attention), Counting(torch_decode_attention)
    ref = _build(name).eval()
    model = _build(name, norm_layer=nn.LayerNorm, attention=attn, decode_attention=dec).eval()
    model.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, MODELS[name][1].get("vocab_size", 50), (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left-padded prompt / a padded source
    kw = dict(max_new_tokens=5) if name == "gpt2" else dict(max_new_tokens=5, decoder_start_token_id=1)
    out = greedy_search(model, ids, mask, **kw)
    assert out.sequences.tolist() == greedy_search(ref, ids, mask, **kw).sequences.tolist()
    assert dec.calls > 0 and (name != "gpt2" or attn.calls > 0)


@pytest.mark.parametrize("name", list(MODELS))
def test_rms_norm_builds_and_trains(name):
    model = _build(name, norm_layer=nn.RMSNorm).train()
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    assert sum(isinstance(m, nn.RMSNorm) for m in model.modules()) == MODELS[name][2]
    out = model(*_inputs(name, padded=True))
    out.float().square().mean().backward()
    assert torch.isfinite(out).all()
    grads = [p.grad for n, p in model.named_parameters() if not n.startswith("pooler.")]  # bert: not in out
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_registry_passes_the_blocks():
    norm = Recording()
    model = pydl.models.create("gpt2", **pydl.models.small_config("gpt2"), norm_layer=norm)
    assert norm.made and model.ln_f is norm.made[-1]


BLOCK_ARGS = [(name, arg) for name, spec in MODELS.items()
              for arg in ("norm_layer", "attention") + (("decode_attention",) if spec[4] else ())]


@pytest.mark.parametrize("name, arg", BLOCK_ARGS)
def test_blocks_that_are_not_callable_are_refused(name, arg):
    with pytest.raises(TypeError, match=f"{arg} must be callable"):
        _build(name, **{arg: "sdpa"})


class _OwnForward(pydl.nn.LayerNorm):
    """A pydl LayerNorm subclass with its own forward: the fused kernel would not give its answer."""

    def forward(self, x):
        return super().forward(x) * 2.0


@pytest.mark.parametrize("norm, fused", [
    (pydl.nn.LayerNorm(8), True),
    (pydl.nn.LayerNormGELU(8), True),
    (pydl.nn.LayerNormGELU(8, approximate="tanh"), True),
    (pydl.nn.LayerNorm(8, bias=False), True),
    (_OwnForward(8), False),
    (pydl.nn.LayerNorm((3, 8)), False),  # two normalized dims: not the kernel's last-dim rows
    (nn.LayerNorm(8), False),
    (nn.RMSNorm(8), False),
], ids=["pydl", "pydl_gelu", "pydl_gelu_tanh", "pydl_no_bias", "own_forward", "two_dims", "torch", "rms"])
def test_add_norm_fuses_only_what_the_kernel_computes(norm, fused, monkeypatch):
    """add_norm(x, r, norm) == (norm(x + r), x + r) for every norm, fused only for pydl's own forward."""
    counting = Counting(seq.add_layer_norm)
    monkeypatch.setattr(seq, "add_layer_norm", counting)
    with torch.no_grad():
        for p in norm.parameters():
            p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(5)
    x, r = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    y, h = seq.add_norm(x, r, norm)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, norm(x + r), rtol=1e-5, atol=1e-5)
    assert counting.calls == int(fused)
