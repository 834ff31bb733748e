"""attn_implementation="pydl" in Hugging Face transformers, and the LLaMA-family RMSNorm forward
(pydl/integrations/transformers_attention.py), on tiny random configs (nothing downloaded).

"pydl" vs "sdpa" on the same weights: GPT-2, BERT and a GQA LLaMA give the same outputs and
parameter gradients with and without a padding mask, and pydl's op is really called
(``set_attn_implementation`` and ``from_pretrained`` included); greedy and beam generation through
the KV cache give the same sequences; attention dropout works in train mode; a LLaMA forward
compiles with fullgraph=True. ``llama_rms_norm_forward`` on real RMSNorm modules vs their own
forward against the float64 formula (DESIGN §7 tolerances), fp32, bf16 and mixed, with gradients.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from pydl.ops.rms_norm import rms_norm_ref

from ..models._hf import import_transformers
from ..tolerances import assert_close_to_ref

tf = import_transformers()  # (or skip the module) before pydl's integration imports it

from pydl.integrations import transformers as pydl_tf  # noqa: E402  (registers "pydl")
from pydl.integrations import transformers_attention as attn_mod  # noqa: E402

ATOL, RTOL = 1e-5, 1e-4  # float32; on a GPU pydl's Triton kernels sum in another order than SDPA
V = 97  # vocabulary size


def _config(family: str, **kw):
    """A tiny random config, dropout off unless ``kw`` turns it on."""
    if family == "gpt2":
        base = dict(n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=V, resid_pdrop=0.0, embd_pdrop=0.0,
                    attn_pdrop=0.0)
        return tf.GPT2Config(**{**base, **kw})
    if family == "bert":
        base = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                    max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return tf.BertConfig(**{**base, **kw})
    base = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=32, attention_dropout=0.0)
    return tf.LlamaConfig(**{**base, **kw})


def _auto(family: str):
    return tf.AutoModel if family == "bert" else tf.AutoModelForCausalLM


def _pair(family: str, device, **kw):
    """(model built with attn_implementation="pydl", the same weights with "sdpa"), eval mode."""
    # One config each: from_config keeps the config object it is given and sets its _attn_implementation.
    ours = _auto(family).from_config(_config(family, **kw), attn_implementation="pydl").to(device).eval()
    theirs = _auto(family).from_config(_config(family, **kw), attn_implementation="sdpa").to(device).eval()
    theirs.load_state_dict(ours.state_dict())
    assert ours.config._attn_implementation == "pydl" and theirs.config._attn_implementation == "sdpa"
    return ours, theirs


def _inputs(family: str, device, padded: bool, B: int = 3, T: int = 9):
    """(input_ids, attention_mask or None); padding on the left for decoders, on the right for BERT
    (row 0 loses 3 tokens, row 1 one)."""
    ids = torch.randint(1, V, (B, T), generator=torch.Generator().manual_seed(0)).to(device)
    if not padded:
        return ids, None
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    for row, n in ((0, 3), (1, 1)):
        if family == "bert":
            mask[row, T - n:] = 0
        else:
            mask[row, :n] = 0
    return ids, mask


def _output(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


def _loss(out, mask):
    """A loss that weighs every output differently and ignores padded positions."""
    w = torch.linspace(-1.0, 1.0, out.numel(), device=out.device).reshape(out.shape)
    keep = 1.0 if mask is None else mask[..., None].to(out.dtype)
    return (out * w * keep).sum()


@pytest.fixture
def pydl_calls(monkeypatch):
    """The calls of pydl.ops.attention made through attention_forward (a counting wrapper)."""
    calls = []
    real = attn_mod.attention

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(attn_mod, "attention", counted)
    return calls


def _force_triton(monkeypatch):
    """attention_forward calls pydl's op with backend="triton" (its kernels; the interpreter on CPU)."""
    real = attn_mod.attention
    monkeypatch.setattr(attn_mod, "attention", lambda *a, **kw: real(*a, **kw, backend="triton"))


def _assert_same_forward_backward(ours, theirs, ids, mask):
    a, b = _output(ours, ids, mask), _output(theirs, ids, mask)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    _loss(a, mask).backward()
    _loss(b, mask).backward()
    other = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        if p.grad is None:
            assert other[name].grad is None, name
            continue
        torch.testing.assert_close(p.grad, other[name].grad, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")


# ---- registration ----------------------------------------------------------------------------------

def test_registered_with_both_interfaces_and_idempotent():
    pydl_tf.register_attention()
    pydl_tf.register_attention()
    assert tf.AttentionInterface()["pydl"] is pydl_tf.attention_forward
    assert tf.AttentionMaskInterface()["pydl"] is tf.masking_utils.sdpa_mask
    assert "pydl" in tf.AttentionInterface().valid_keys()


def test_unknown_name_is_still_refused():
    with pytest.raises(ValueError, match="not supported"):
        tf.AutoModelForCausalLM.from_config(_config("gpt2"), attn_implementation="pydl2")


# ---- equal to sdpa ---------------------------------------------------------------------------------

@pytest.mark.parametrize("padded", [False, True], ids=["no_mask", "padded"])
@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
def test_outputs_and_gradients_equal_sdpa(family, padded, device, pydl_calls):
    ours, theirs = _pair(family, device)
    ids, mask = _inputs(family, device, padded)
    _assert_same_forward_backward(ours, theirs, ids, mask)
    assert len(pydl_calls) == ours.config.num_hidden_layers


@pytest.mark.triton
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_pydls_own_kernels_inside_the_model(family, triton_device, monkeypatch):
    """On CPU pydl's attention runs SDPA itself; here its Triton kernels (the interpreter without a
    GPU) take transformers' padding masks ((B, 1, Nq, Nk), broadcast over the heads; fully masked
    query rows under left padding) and GQA."""
    _force_triton(monkeypatch)
    ours, theirs = _pair(family, triton_device, num_hidden_layers=1)
    _assert_same_forward_backward(ours, theirs, *_inputs(family, triton_device, padded=True, B=2, T=7))


def test_gqa_reaches_pydl_unrepeated(device, pydl_calls):
    """k/v keep their 2 heads (enable_gqa), q has 4."""
    ours, _ = _pair("llama", device)
    with torch.no_grad():
        ours(input_ids=_inputs("llama", device, padded=True)[0])
    assert pydl_calls and all(shape[1] == 4 for shape in pydl_calls)


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
def test_set_attn_implementation_switches_to_pydl(family, device, pydl_calls):
    cfg = _config(family)
    model = _auto(family).from_config(cfg, attn_implementation="sdpa").to(device).eval()
    ids, mask = _inputs(family, device, padded=True)
    with torch.no_grad():
        want = _output(model, ids, mask)
        assert not pydl_calls
        model.set_attn_implementation("pydl")
        assert model.config._attn_implementation == "pydl"
        got = _output(model, ids, mask)
    assert len(pydl_calls) == cfg.num_hidden_layers
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def test_from_pretrained_with_pydl(tmp_path, device, pydl_calls):
    ours, theirs = _pair("llama", device)
    theirs.save_pretrained(tmp_path)
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="pydl").to(device).eval()
    assert loaded.config._attn_implementation == "pydl"
    ids, mask = _inputs("llama", device, padded=True)
    with torch.no_grad():
        torch.testing.assert_close(_output(loaded, ids, mask), _output(theirs, ids, mask), atol=ATOL, rtol=RTOL)
    assert pydl_calls


# ---- generation through the KV cache ---------------------------------------------------------------

@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam3"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_equals_sdpa(family, num_beams, device, pydl_calls):
    ours, theirs = _pair(family, device)
    ids, mask = _inputs(family, device, padded=True, B=2, T=6)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, num_beams=num_beams, pad_token_id=0,
              eos_token_id=None)
    got, want = ours.generate(ids, **kw), theirs.generate(ids, **kw)
    assert got.shape == (2, 6 + 8)
    assert torch.equal(got, want)
    decode_steps = [s for s in pydl_calls if s[2] == 1]
    assert decode_steps, "the cached decode steps (one query token) must go through pydl"


# ---- dropout ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_attention_dropout_in_train_mode(family, device, pydl_calls):
    kw = {"attn_pdrop": 0.5} if family == "gpt2" else {"attention_dropout": 0.5}
    ours, theirs = _pair(family, device, **kw)
    ids, mask = _inputs(family, device, padded=True)
    with torch.no_grad():
        evaluated = _output(ours, ids, mask)
        torch.testing.assert_close(evaluated, _output(theirs, ids, mask), atol=ATOL, rtol=RTOL)
    ours.train()
    trained = _output(ours, ids, mask)
    assert torch.isfinite(trained).all()
    assert not torch.allclose(trained, evaluated, atol=1e-3)
    _loss(trained, mask).backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)


# ---- torch.compile ---------------------------------------------------------------------------------

def _check_compiled_llama(device, padded):
    """torch.compile(fullgraph=True) of a 1-layer "pydl" LLaMA forward: no graph break, the eager
    model's logits and parameter gradients (aot_eager: AOTAutograd's graphs, no codegen)."""
    torch._dynamo.reset()
    model, _ = _pair("llama", device, num_hidden_layers=1)
    ids, mask = _inputs("llama", device, padded)
    compiled = torch.compile(lambda i, m: model(input_ids=i, attention_mask=m, use_cache=False).logits,
                             fullgraph=True, backend="aot_eager")
    got = compiled(ids, mask)
    _loss(got, mask).backward()
    got_grads = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    want = _output(model, ids, mask)
    _loss(want, mask).backward()
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got_grads[name], p.grad, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("padded", [False, True], ids=["no_mask", "padded"])
def test_compile_fullgraph_llama(padded, device):
    _check_compiled_llama(device, padded)


@pytest.mark.triton
def test_compile_fullgraph_llama_with_pydls_kernels(triton_device, monkeypatch):
    """The same through pydl's custom op (the Triton backend: the GPU default)."""
    _force_triton(monkeypatch)
    _check_compiled_llama(triton_device, padded=True)


# ---- fallback and refusals (as sdpa) ---------------------------------------------------------------

class _Layer(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 1


def _qkv(B=2, H=2, N=5, D=8):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(B, H, N, D, generator=g) for _ in range(3)]


def test_position_bias_and_layout_equal_sdpa():
    q, k, v = _qkv()
    bias = torch.randn(1, 2, 5, 5)
    pad = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    pad[0, ..., :2] = False
    for mask, causal in ((None, True), (None, False), (pad, None), (pad.float().log(), None)):
        got, w = pydl_tf.attention_forward(_Layer(), q, k, v, mask, scaling=0.3, is_causal=causal,
                                           position_bias=bias)
        want, _ = attn_mod._sdpa.sdpa_attention_forward(_Layer(), q, k, v, mask, scaling=0.3, is_causal=causal,
                                                        position_bias=bias)
        assert w is None and got.shape == (2, 5, 2, 8) and got.is_contiguous()
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def test_a_mask_dtype_pydl_refuses_goes_to_sdpa(pydl_calls):
    """A float16 mask with float32 q: pydl's op refuses it, sdpa's function decides (it refuses too)."""
    q, k, v = _qkv()
    mask = torch.zeros(2, 1, 5, 5, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="attn_mask dtype"):
        pydl_tf.attention_forward(_Layer(), q, k, v, mask)
    assert not pydl_calls


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_jit_trace_and_other_devices_go_to_sdpa(pydl_calls):
    q, k, v = _qkv()
    fn = lambda q, k, v: pydl_tf.attention_forward(_Layer(), q, k, v, None)[0]  # noqa: E731
    traced = torch.jit.trace(fn, (q, k, v), check_trace=False)  # (the check reruns fn untraced)
    torch.testing.assert_close(traced(q, k, v), attn_mod._sdpa.sdpa_attention_forward(_Layer(), q, k, v, None)[0])
    meta = [t.to("meta") for t in (q, k, v)]
    assert pydl_tf.attention_forward(_Layer(), *meta, None)[0].shape == (2, 5, 2, 8)
    assert not pydl_calls


def test_softcap_is_refused():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="softcap"):
        pydl_tf.attention_forward(_Layer(), q, k, v, None, softcap=30.0)


# ---- LLaMA-family RMSNorm ----------------------------------------------------------------------------

def test_rms_norm_classes_share_llamas_forward():
    classes = pydl_tf.rms_norm_classes()
    llama = tf.models.llama.modeling_llama.LlamaRMSNorm
    assert classes[0] is llama and len(classes) >= 8
    src = inspect.getsource(llama.forward)
    for cls in classes:
        assert inspect.getsource(cls.forward) == src, f"{cls.__name__}.forward is not LlamaRMSNorm's"
    gemma = tf.models.gemma.modeling_gemma.GemmaRMSNorm
    assert gemma not in classes and inspect.getsource(gemma.forward) != src


def _norm(cls, n, dtype=torch.float32):
    """A ``cls(n, eps=1e-5)`` module with a random weight (around 1) of ``dtype``."""
    m = cls(n, eps=1e-5)
    with torch.no_grad():
        m.weight.copy_(torch.randn(n) * 0.5 + 1.0)
    return m.to(dtype)


def _forward_backward(module, x, gy, fn):
    """(y, dx, dweight) of fn(module, x) (pydl's forward, or the class's own) for the output gradient gy."""
    x = x.detach().clone().requires_grad_()
    module.weight.grad = None
    y = fn(module, x)
    (y * gy.to(y.dtype)).sum().backward()
    return y, x.grad, module.weight.grad


@pytest.mark.parametrize("n", [1, 7, 97, 1025])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_llama_rms_norm_forward_equals_the_modules_own(n, dtype):
    """Output and gradients judged against the float64 formula (HF's forward being the torch
    result of the low-precision rule): HF's dtype, fp32 within the fixed bound, bf16 within 2x HF's error."""
    module = _norm(tf.models.llama.modeling_llama.LlamaRMSNorm, n, dtype)
    x, gy = torch.randn(3, 5, n).to(dtype), torch.randn(3, 5, n, dtype=torch.float64)
    got = _forward_backward(module, x, gy, pydl_tf.llama_rms_norm_forward)
    want = _forward_backward(module, x, gy, type(module).forward)
    assert got[0].dtype == want[0].dtype == dtype and got[0].shape == x.shape
    w64 = module.weight.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    ref = rms_norm_ref(x64, w64, module.variance_epsilon)
    (ref * gy).sum().backward()
    for name, a, b, r, scale in (("y", got[0], want[0], ref, None), ("dx", got[1], want[1], x64.grad, None),
                                 ("dweight", got[2], want[2], w64.grad, (x.numel() // n) ** 0.5)):
        assert_close_to_ref(a, r, b, name=name, scale=scale)


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_llama_rms_norm_forward_mixed_dtypes_keep_hfs_promotion(x_dtype, w_dtype):
    """The normalised x is rounded to x's dtype, then multiplied by the weight with type promotion:
    HF's own steps, so the results agree to a bfloat16 rounding of the normalised x."""
    module = _norm(tf.models.llama.modeling_llama.LlamaRMSNorm, 59, w_dtype)
    x, gy = torch.randn(4, 59).to(x_dtype), torch.randn(4, 59, dtype=torch.float64)
    got = _forward_backward(module, x, gy, pydl_tf.llama_rms_norm_forward)
    want = _forward_backward(module, x, gy, type(module).forward)
    assert got[0].dtype == want[0].dtype == torch.float32
    assert got[1].dtype == x_dtype and got[2].dtype == w_dtype
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2.0 ** -7)


def test_llama_rms_norm_forward_on_every_listed_class():
    x = torch.randn(2, 3, 33)
    for cls in pydl_tf.rms_norm_classes():
        module = _norm(cls, 33)
        torch.testing.assert_close(pydl_tf.llama_rms_norm_forward(module, x), module(x), msg=cls.__name__)


def test_llama_rms_norm_forward_refuses_a_wrong_size():
    module = _norm(tf.models.llama.modeling_llama.LlamaRMSNorm, 8)
    with pytest.raises(ValueError, match="weight"):
        pydl_tf.llama_rms_norm_forward(module, torch.randn(2, 9))
