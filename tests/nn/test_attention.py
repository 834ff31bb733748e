"""pydl.nn.MultiheadAttention is a drop-in replacement for torch.nn.MultiheadAttention.

Same constructor, parameters, state_dict keys and repr; with torch's state_dict it gives torch's
outputs (attention output and weights) and gradients (inputs and every parameter), in float64
to rounding, for every constructor variant, mask form, layout and mode; torch's errors on bad
input. need_weights=False runs pydl's op (the fast path), need_weights=True torch's own forward.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import pickle
import warnings

import pytest
import torch

import pydl
from pydl.backends import BackendError
from pydl.nn.attention import _same_map
from tests.tolerances import assert_close_to_ref
from tests.utils.checks import grads, record_calls

mha_mod = importlib.import_module("pydl.nn.attention")
FP32, FP64 = torch.float32, torch.float64
E, H = 8, 2  # embed_dim, num_heads (head_dim 4)

VARIANTS = {
    "default": {}, "no-bias": dict(bias=False), "kdim-vdim": dict(kdim=6, vdim=10),
    "kdim=vdim": dict(kdim=6, vdim=6), "no-bias-kdim-vdim": dict(bias=False, kdim=6, vdim=10),
    "bias-kv": dict(add_bias_kv=True), "zero-attn": dict(add_zero_attn=True),
    "bias-kv-zero-attn-kdim": dict(add_bias_kv=True, add_zero_attn=True, kdim=6, vdim=6),
}


def _shares(kw):
    """The input sharings a variant's dims allow: "qkv" self-attention (query is key is value) needs
    kdim == vdim == embed_dim, "kv" (key is value) kdim == vdim, "none" always."""
    kdim, vdim = kw.get("kdim", E), kw.get("vdim", E)
    return ("qkv", "kv", "none")[(kdim != E) + (kdim != vdim):]


FORWARD_CASES = [(v, s) for v, kw in VARIANTS.items() for s in _shares(kw)]


def _pair(dtype=FP64, backend=None, **kw):
    """(pydl module, torch module) with the same random (non-trivial) parameters."""
    tm = torch.nn.MultiheadAttention(E, H, dtype=dtype, **kw)
    with torch.no_grad():  # torch initializes the biases to 0: randomize, so a dropped bias shows
        for p in tm.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    pm = pydl.nn.MultiheadAttention(E, H, dtype=dtype, backend=backend, **kw)
    pm.load_state_dict(tm.state_dict(), strict=True)
    return pm, tm


def _inputs(m, share="kv", B=3, L=5, S=7, batched=True, dtype=FP64):
    """(query, key, value) in m's layout; for self-attention S = L."""
    def x(n, d):
        return torch.randn((n, d) if not batched else (B, n, d) if m.batch_first else (n, B, d), dtype=dtype)
    q = x(L, m.embed_dim)
    if share == "qkv":
        return q, q, q
    k = x(S, m.kdim)
    return (q, k, k) if share == "kv" else (q, k, x(S, m.vdim))


def _run(m, inputs, gy, dtype, **kw):
    """m's (output, weights) and gradients of <output, gy> w.r.t. query, key, value and m's parameters."""
    leaves = _same_map(lambda t: t.detach().to(dtype).requires_grad_(), *inputs)
    cast = lambda t: t if t is None or not t.is_floating_point() else t.to(dtype)  # noqa: E731
    kw = {k: cast(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    out, w = m(*leaves, **kw)
    g = [] if gy is None else grads([out], [*leaves, *m.parameters()], [gy.to(dtype)])
    return out, w, g


def _check(pm, tm, inputs, grad=True, **kw):
    """pydl's outputs and gradients vs torch's module (float64: directly; float32: vs a float64
    copy of torch's module, torch's float32 result as the yardstick)."""
    dtype = pm.out_proj.weight.dtype
    t64 = tm if dtype == FP64 else copy.deepcopy(tm).double()
    gy = torch.randn(*inputs[0].shape[:-1], E, dtype=FP64) if grad else None
    out, w, g = _run(pm, inputs, gy, dtype, **kw)
    rout, rw, rg = _run(t64, inputs, gy, FP64, **kw)
    tout, tw, tg = _run(tm, inputs, gy, dtype, **kw) if dtype != FP64 else (None, None, [None] * len(rg))
    assert out.shape == rout.shape and out.dtype == dtype and out.device == rout.device
    assert_close_to_ref(out, rout, tout, name="attn_output")
    assert (w is None) == (rw is None), "attn_weights returned by one module only"
    if w is not None:
        assert w.shape == rw.shape
        assert_close_to_ref(w, rw, tw, name="attn_weights")
    names = ["query", "key", "value"] + [n for n, _ in pm.named_parameters()]
    assert names[3:] == [n for n, _ in tm.named_parameters()]
    for n, a, b, t in zip(names, g, rg, tg):
        assert_close_to_ref(a, b, t, name=f"d{n}")


def _masks(case, B, L, S, dtype=FP64):
    """(key_padding_mask, attn_mask, is_causal) in torch's convention (True = not allowed)."""
    kpm = attn = None
    causal = "causal" in case
    if "kpm" in case:
        kpm = torch.rand(B, S) < 0.3
        kpm[:, 0] = False  # no fully padded batch entry (test_fully_padded_batch_entry has one)
        if "kpm-float" in case:
            kpm = torch.where(kpm, float("-inf"), torch.randn(B, S, dtype=dtype))
    if "attn" in case or causal:
        shape = (B * H, L, S) if "attn3d" in case else (L, S)
        attn = torch.ones(L, S, dtype=torch.bool).triu(1) if causal else torch.rand(shape) < 0.3
        attn[..., 0] = False  # no fully masked row either
        if "float" in case.split("+")[-1]:
            attn = torch.where(attn, float("-inf"), 0.0 if causal else torch.randn(shape, dtype=dtype)).to(dtype)
    return kpm, attn, causal


MASK_CASES = ["kpm-bool", "kpm-float", "attn2d-bool", "attn2d-float", "attn3d-bool", "attn3d-float",
              "kpm-bool+attn2d-bool", "kpm-bool+attn3d-bool", "kpm-float+attn2d-float", "kpm-float+attn3d-float",
              "causal-bool", "causal-float", "causal+kpm-bool+attn-bool"]


# ---- the module: constructor, parameters, state_dict ------------------------------------------

@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_constructor_parameters_and_state_dict(variant, batch_first):
    kw = dict(VARIANTS[variant], batch_first=batch_first, dropout=0.25)
    pm, tm = pydl.nn.MultiheadAttention(E, H, **kw), torch.nn.MultiheadAttention(E, H, **kw)
    assert isinstance(pm, torch.nn.MultiheadAttention) and pm.backend is None
    for attr in ("embed_dim", "kdim", "vdim", "num_heads", "head_dim", "dropout", "batch_first",
                 "_qkv_same_embed_dim", "add_zero_attn"):
        assert getattr(pm, attr) == getattr(tm, attr), attr
    assert repr(pm) == repr(tm) and pm.extra_repr() == tm.extra_repr()
    assert [(n, p.shape) for n, p in pm.named_parameters()] == [(n, p.shape) for n, p in tm.named_parameters()]
    assert list(pm.state_dict()) == list(tm.state_dict())
    pm2, tm2 = _pair(**kw)  # torch -> pydl (in _pair), then pydl -> a fresh torch module
    tm3 = torch.nn.MultiheadAttention(E, H, dtype=FP64, **kw)
    tm3.load_state_dict(pm2.state_dict(), strict=True)
    for (n, a), b in zip(tm2.state_dict().items(), tm3.state_dict().values()):
        assert torch.equal(a, b), n


def test_signatures_match_torch():
    ours, theirs = (inspect.signature(c.__init__).parameters for c in (pydl.nn.MultiheadAttention,
                                                                       torch.nn.MultiheadAttention))
    assert [(n, p.default) for n, p in ours.items()][:-1] == [(n, p.default) for n, p in theirs.items()]
    assert list(ours)[-1] == "backend" and ours["backend"].kind is inspect.Parameter.KEYWORD_ONLY
    assert ours["backend"].default is None
    fwd = [inspect.signature(c.forward).parameters for c in (pydl.nn.MultiheadAttention, torch.nn.MultiheadAttention)]
    assert [(n, p.default) for n, p in fwd[0].items()] == [(n, p.default) for n, p in fwd[1].items()]


def test_checkpoint_inside_a_model_pickle_and_deepcopy():
    tmodel = torch.nn.ModuleDict({"attn": torch.nn.MultiheadAttention(E, H, batch_first=True)})
    pmodel = torch.nn.ModuleDict({"attn": pydl.nn.MultiheadAttention(E, H, batch_first=True, backend="torch")})
    pmodel.load_state_dict(tmodel.state_dict(), strict=True)  # prefixed keys
    pm = pickle.loads(pickle.dumps(copy.deepcopy(pmodel["attn"])))
    assert type(pm) is pydl.nn.MultiheadAttention and pm.backend == "torch"
    x = torch.randn(2, 4, E)
    torch.testing.assert_close(pm(x, x, x, need_weights=False)[0], tmodel["attn"](x, x, x, need_weights=False)[0])


# ---- outputs and gradients vs torch's module (float64) --------------------------------------

@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("variant,share", FORWARD_CASES, ids=[f"{v}-{s}" for v, s in FORWARD_CASES])
def test_forward_and_grads_match_torch(variant, share, batch_first, need_weights):
    pm, tm = _pair(batch_first=batch_first, **VARIANTS[variant])
    inputs = _inputs(pm, share, S=5 if share == "qkv" else 7)
    _check(pm, tm, inputs, need_weights=need_weights)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("case", MASK_CASES)
def test_masks_match_torch(case, batch_first, need_weights):
    pm, tm = _pair(batch_first=batch_first)
    kpm, attn, causal = _masks(case, 3, 5, 7)
    _check(pm, tm, _inputs(pm, "kv"), key_padding_mask=kpm, attn_mask=attn, is_causal=causal,
           need_weights=need_weights)


@pytest.mark.parametrize("average_attn_weights", [True, False])
@pytest.mark.parametrize("case", ["none", "kpm-bool+attn3d-bool", "attn2d-float"])
def test_attention_weights_match_torch(case, average_attn_weights):
    pm, tm = _pair(batch_first=True)
    kpm, attn, _ = _masks(case, 3, 5, 7)
    _check(pm, tm, _inputs(pm, "none"), key_padding_mask=kpm, attn_mask=attn,
           average_attn_weights=average_attn_weights)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])  # ignored for unbatched input, as in torch
@pytest.mark.parametrize("case", ["none", "kpm-bool", "kpm-float+attn2d-float", "attn3d-bool", "causal-bool"])
def test_unbatched_input(case, batch_first, need_weights):
    pm, tm = _pair(batch_first=batch_first)
    kpm, attn, causal = _masks(case, 1, 5, 7)
    kpm = None if kpm is None else kpm[0]  # (S,)
    _check(pm, tm, _inputs(pm, "kv", batched=False), key_padding_mask=kpm, attn_mask=attn, is_causal=causal,
           need_weights=need_weights)


@pytest.mark.parametrize("mode", ["train", "eval", "eval-no-grad"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_train_and_eval_modes(mode, need_weights):
    """train with dropout 0; eval ignores dropout; eval + no_grad is torch's native fast path."""
    pm, tm = _pair(batch_first=True, dropout=0.0 if mode == "train" else 0.5)
    for m in (pm, tm):
        m.train(mode == "train")
    kpm, attn, _ = _masks("kpm-bool+attn2d-bool", 3, 5, 5)
    kw = dict(key_padding_mask=kpm, attn_mask=attn, need_weights=need_weights)
    if mode != "eval-no-grad":
        _check(pm, tm, _inputs(pm, "qkv", S=5), **kw)
        return
    x = _inputs(pm, "qkv", S=5)[0]
    with torch.no_grad():
        (out, w), (tout, tw) = pm(x, x, x, **kw), tm(x, x, x, **kw)
    assert_close_to_ref(out, tout, name="attn_output")
    assert (w is None) == (tw is None)


def test_fully_padded_batch_entry():
    """A batch entry whose keys are all padding: SDPA's (and pydl's) 0 attention -> out_proj's bias.
    (torch's inference fast path, eval + no_grad, gives NaN there instead; need_weights=True too.)"""
    pm, tm = _pair(batch_first=True)
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[1] = True
    _check(pm, tm, _inputs(pm, "kv"), key_padding_mask=kpm, need_weights=False)
    out = pm(*_inputs(pm, "kv"), key_padding_mask=kpm, need_weights=False)[0]
    torch.testing.assert_close(out[1], pm.out_proj.bias.expand(5, E), atol=0, rtol=0)


def test_dropout_in_training_only():
    pm, tm = _pair(batch_first=True, dropout=0.5)
    x = _inputs(pm, "qkv", S=5)[0]
    torch.manual_seed(1)
    a = pm(x, x, x, need_weights=False)[0]
    torch.manual_seed(1)
    b = pm(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # reproducible by seed
    pm.eval()
    tm.eval()
    c = pm(x, x, x, need_weights=False)[0]
    assert (a - c).abs().max() > 1e-3, "dropout was not applied in training"
    assert_close_to_ref(c, tm(x, x, x, need_weights=False)[0], name="eval output")


def test_mismatched_mask_types_warn_like_torch():
    pm, tm = _pair(batch_first=True)
    kpm, attn, _ = _masks("kpm-bool+attn2d-float", 3, 5, 7)
    inputs = _inputs(pm, "kv")
    for m in (pm, tm):
        with pytest.warns(UserWarning, match="mismatched key_padding_mask and attn_mask"):
            m(*inputs, key_padding_mask=kpm, attn_mask=attn, need_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _check(pm, tm, inputs, key_padding_mask=kpm, attn_mask=attn, need_weights=False)


def test_swap_into_transformer_encoder_layer():
    """A torch TransformerEncoderLayer with its self_attn replaced keeps its outputs and gradients."""
    layer = torch.nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.0, batch_first=True, dtype=FP64)
    swapped = copy.deepcopy(layer)
    swapped.self_attn = pydl.nn.MultiheadAttention(E, H, batch_first=True, dtype=FP64)
    swapped.self_attn.load_state_dict(layer.self_attn.state_dict())
    x = torch.randn(2, 6, E, dtype=FP64, requires_grad=True)
    kpm = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    mask = torch.ones(6, 6, dtype=torch.bool).triu(1)
    outs = [m(x, src_mask=mask, src_key_padding_mask=kpm, is_causal=True) for m in (layer, swapped)]
    assert_close_to_ref(outs[1], outs[0], name="encoder layer output")
    g = torch.randn_like(outs[0])
    for a, b in zip(grads([outs[1]], [x, *swapped.parameters()], [g]), grads([outs[0]], [x, *layer.parameters()], [g])):
        assert_close_to_ref(a, b, name="encoder layer gradient")


# ---- the fast path: views, merged masks, the op ----------------------------------------------

@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("share", ["qkv", "kv"])
def test_fast_path_passes_views_and_broadcast_masks(share, batch_first, monkeypatch):
    calls = []

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        calls.append((q, k, v, attn_mask, dropout_p, is_causal, kw))
        return attention(q, k, v, attn_mask, dropout_p, is_causal, **kw)

    attention = mha_mod.attention
    monkeypatch.setattr(mha_mod, "attention", spy)
    pm, _ = _pair(batch_first=batch_first, dropout=0.5)
    pm.eval()
    inputs = _inputs(pm, share, S=5)
    kpm, attn, _ = _masks("kpm-bool+attn2d-bool", 3, 5, 5)
    pm(*inputs, key_padding_mask=kpm, need_weights=False)
    pm(*inputs, attn_mask=attn, need_weights=False)
    pm(*inputs, key_padding_mask=kpm, attn_mask=attn, need_weights=False)
    pm(*inputs, attn_mask=attn, is_causal=True, need_weights=False)
    pm(*inputs, key_padding_mask=kpm)  # need_weights=True: torch's forward, not the op
    assert len(calls) == 4
    q, k, v = calls[0][:3]
    assert q.shape == k.shape == v.shape == (3, H, 5, E // H)
    assert all(t.stride(-1) == 1 for t in (q, k, v))
    shared = (q, k, v) if share == "qkv" else (k, v)  # views of one fused projection
    assert len({t.untyped_storage().data_ptr() for t in shared}) == 1
    assert [c[3].shape for c in calls[:3]] == [(3, 1, 1, 5), (5, 5), (3, 1, 5, 5)]  # no (B, H, L, S) copies
    assert all(c[3] is None or c[3].dtype == torch.bool for c in calls)
    assert calls[3][3] is None and calls[3][5] is True  # the causal hint replaces attn_mask
    assert all(c[4] == 0.0 and c[6] == {"backend": None} for c in calls)  # eval: no dropout


def test_backend_is_passed_to_the_op():
    x = torch.randn(2, 3, E)
    with pytest.raises(BackendError, match="native"):
        pydl.nn.MultiheadAttention(E, H, backend="native")(x, x, x, need_weights=False)
    with pytest.raises(ValueError, match="bogus"):
        pydl.nn.MultiheadAttention(E, H, backend="bogus")(x, x, x, need_weights=False)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    pm, _ = _pair(dtype=FP32, batch_first=True)
    compiled = torch.compile(pm, fullgraph=True, backend="aot_eager")
    kpm, attn, _ = _masks("kpm-bool+attn2d-bool", 3, 5, 7)
    q, k, _ = _inputs(pm, "kv", dtype=FP32)
    want = pm(q, k, k, key_padding_mask=kpm, attn_mask=attn, need_weights=False)[0]
    got, w = compiled(q, k, k, key_padding_mask=kpm, attn_mask=attn, need_weights=False)
    assert w is None
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(want)
    for a, b in zip(grads([got], list(pm.parameters()), [g]), grads([want], list(pm.parameters()), [g])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("case", ["none", "kpm-bool", "attn2d-float", "kpm-bool+attn3d-bool", "causal-bool"])
def test_triton_backend_matches_torch(case, batch_first, triton_device):
    """The module on the triton kernels (the Triton interpreter on CPU), float32, small shapes."""
    pm, tm = (m.to(triton_device) for m in _pair(dtype=FP32, backend="triton", batch_first=batch_first))
    kpm, attn, causal = _masks(case, 2, 5, 6, dtype=FP32)
    to = lambda t: None if t is None else t.to(triton_device)  # noqa: E731
    inputs = [t.to(triton_device) for t in _inputs(pm, "kv", B=2, S=6, dtype=FP32)]
    kw = dict(key_padding_mask=to(kpm), attn_mask=to(attn), is_causal=causal, need_weights=False)
    calls = record_calls(lambda: pm(*inputs, **kw))
    assert [c[0]._schema.name for c in calls] == ["pydl::attention_fwd"]
    _check(pm, tm, (inputs[0], inputs[1], inputs[1]), **kw)


# ---- bad input: torch's exception types and messages ------------------------------------------

def _bad(case):
    """(module kwargs, query, key, value, forward kwargs) of one bad call (batch_first)."""
    x, kv, mkw, kw = torch.randn(3, 5, E), torch.randn(3, 7, E), {}, {}
    q, k, v = x, kv, kv
    if case == "query-4d":
        q = x[None]
    elif case == "key-2d":
        k = v = kv[0]
    elif case == "embed-dim":
        q = torch.randn(3, 5, E + 2)
    elif case == "key-value-shape":
        v = torch.randn(3, 6, E)
    elif case == "kdim":
        mkw = dict(kdim=6, vdim=6)
    elif case == "dtype":
        q = x.double()
    else:
        kw = {"kpm-int": dict(key_padding_mask=torch.zeros(3, 7, dtype=torch.int64)),
              "attn-int": dict(attn_mask=torch.zeros(5, 7, dtype=torch.int32)),
              "kpm-shape": dict(key_padding_mask=torch.zeros(3, 8, dtype=torch.bool)),
              "kpm-3d": dict(key_padding_mask=torch.zeros(3, 1, 7, dtype=torch.bool)),
              "attn2d-shape": dict(attn_mask=torch.zeros(5, 8, dtype=torch.bool)),
              "attn3d-shape": dict(attn_mask=torch.zeros(3, 5, 7, dtype=torch.bool)),
              "attn-4d": dict(attn_mask=torch.zeros(3, H, 5, 7, dtype=torch.bool)),
              "causal-no-mask": dict(is_causal=True)}[case]
    return mkw, q, k, v, kw


BAD = ["query-4d", "key-2d", "embed-dim", "key-value-shape", "kdim", "dtype", "kpm-int", "attn-int", "kpm-shape",
       "kpm-3d", "attn2d-shape", "attn3d-shape", "attn-4d", "causal-no-mask"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_raises_like_torch(case):
    mkw, q, k, v, kw = _bad(case)
    errors = []
    for cls in (pydl.nn.MultiheadAttention, torch.nn.MultiheadAttention):
        with pytest.raises(Exception) as excinfo:
            cls(E, H, batch_first=True, **mkw)(q, k, v, need_weights=False, **kw)
        errors.append(excinfo.value)
    assert type(errors[0]) is type(errors[1]), f"pydl raised {errors[0]!r}, torch {errors[1]!r}"
    if case not in ("key-value-shape", "dtype"):  # torch's message shows its internal (L, B, E) shapes
        assert str(errors[0]) == str(errors[1])


def test_bad_constructor_arguments_like_torch():
    for args in ((E, 3), (0, 2), (E, 0)):
        with pytest.raises((AssertionError, ValueError)) as excinfo:
            pydl.nn.MultiheadAttention(*args)
        with pytest.raises(type(excinfo.value)):
            torch.nn.MultiheadAttention(*args)
