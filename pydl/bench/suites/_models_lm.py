"""The GPT-2 ops of the ``models`` suite (``gpt2``, ``gpt2.train``): shapes, inputs, the two model
classes and how each binds the shared parameters, FLOPs. The suite's shared call path is in
``models.py``; this module is one of its two model families (the other: ``_models_vision.py``).

A shape is {B, T, L, D}: B sequences of T token ids through a GPT-2 of L layers, width D (D // 64
heads), GPT-2's vocabulary (50257) and context (1024); L=12, D=768 (GPT-2 small, 124M) unless given.
Dropout is 0 (train mode is then deterministic, so the gate can compare training steps).

Inputs: ``(ids, amp, *params)``. ids (B, T) int64; amp a one-element tensor (1.0) whose dtype is the
autocast dtype of the call (float32: none; the gate's float32 reference gets it upcast like any
low-precision input); params float32 in Hugging Face's names and layout (``GPT2LMHeadModel``'s
``Conv1D`` weights (in, out)), ordered: the model-wide ones (``GLOBAL``), then layer by layer, so the
gradient names declared for ``MAX_LAYERS`` layers hold for any L up to it. Outputs: ``(logits (B, T,
50257), amp)``: amp passes through, so that the backward (which differentiates every floating input)
reaches it at no cost.
"""

from __future__ import annotations

import torch

from ..core import shape_dims

KEYS = ("B", "T", "L", "D")
SMALL = {"L": 12, "D": 768}
VOCAB, CONTEXT = 50257, 1024
MAX_LAYERS = 48  # GPT-2 XL's depth: the longest gradient-name list the suite declares
N_DATA = 2  # (ids, amp) precede the parameters
OUT_NAMES = ("logits", "amp")
PREFIX = "transformer."
GLOBAL = ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")
LAYER = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
         "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
         "mlp.c_proj.bias")
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # (in, out) in HF


def shape(b: int, t: int, layers: int = 12, d: int = 768) -> dict:
    return {"B": b, "T": t, "L": layers, "D": d}


def dims(sh) -> tuple:
    """(B, T, L, D) of a shape dict, tuple or "B=..,T=..[,L=..,D=..]" string (L, D default: GPT-2 small)."""
    b, t, layers, d = shape_dims(sh, KEYS, "models (gpt2)", SMALL)
    if not 1 <= t <= CONTEXT or not 1 <= layers <= MAX_LAYERS:
        raise ValueError(f"models (gpt2): need 1 <= T <= {CONTEXT} and 1 <= L <= {MAX_LAYERS}, got {sh!r}")
    return b, t, layers, d


def config(layers: int, d: int) -> dict:
    """The GPT-2 config (GPTConfig's = GPT2Config's field names) of an L-layer, D-wide model, no dropout."""
    return dict(vocab_size=VOCAB, n_positions=CONTEXT, n_layer=layers, n_embd=d, n_head=max(1, d // 64),
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def param_names(name: str, cfg: tuple) -> tuple:
    """Hugging Face's parameter names of the (L, D) model, in the inputs' order (the tied lm_head is wte)."""
    return tuple(PREFIX + n for n in GLOBAL) + tuple(f"{PREFIX}h.{i}.{n}" for i in range(cfg[0]) for n in LAYER)


def grad_names(name: str) -> tuple:
    return ("damp",) + tuple("d" + n.removeprefix(PREFIX) for n in param_names(name, (MAX_LAYERS, 0)))


def model_config(name: str, data: tuple, params: tuple) -> tuple:
    """(L, D) of the model a call's inputs are for: read off the parameters."""
    return (len(params) - len(GLOBAL)) // len(LAYER), params[0].shape[1]


def meta_model(which: str, name: str, cfg: tuple) -> torch.nn.Module:
    """pydl's GPT (``which`` "pydl") or transformers' GPT2LMHeadModel with SDPA attention ("ref"), no storage."""
    kw = config(*cfg)
    if which == "pydl":
        import pydl.models

        with torch.device("meta"):
            return pydl.models.create(name, **kw)
    from pydl.models._timm import import_transformers

    tf = import_transformers()
    tf.logging.set_verbosity_error()
    with torch.device("meta"):
        return tf.GPT2LMHeadModel(tf.GPT2Config(**kw, attn_implementation="sdpa"))


def binding(which: str, names: tuple) -> list:
    """[(the model's parameter name, transposed?)] for each input parameter: pydl's GPT has no
    ``transformer.`` prefix and nn.Linear weights (out, in), the transpose (a view) of GPT-2's Conv1D."""
    if which != "pydl":
        return [(n, False) for n in names]
    return [(n.removeprefix(PREFIX), n.endswith(CONV1D)) for n in names]


def forward(which: str, mod: torch.nn.Module, data: tuple, params: dict) -> tuple:
    ids, amp = data
    if which == "pydl":
        logits = torch.func.functional_call(mod, params, (ids,))
    else:
        logits = torch.func.functional_call(mod, params, (ids,), {"use_cache": False}).logits
    return logits, amp


def amp_dtype(data: tuple) -> torch.dtype:
    return data[1].dtype


def make_inputs(name: str, sh, dtype: torch.dtype, device: torch.device, seed: int, train: bool):
    """(ids, amp, *params), (dlogits (B, T, 50257) in ``dtype``, damp) for the train op else ().
    The parameters are pydl's GPT randomised (``pydl.models._common.randomize_``: N(0, 1/fan_in)
    weights), stored in Hugging Face's layout."""
    from pydl.models._common import randomize_

    b, t, layers, d = dims(sh)
    g = torch.Generator().manual_seed(seed)
    model = meta_model("pydl", name, (layers, d)).to_empty(device="cpu")
    model.lm_head.weight = model.wte.weight  # to_empty unties them
    own = dict(randomize_(model, g).named_parameters())
    params = []
    for own_name, transposed in binding("pydl", param_names(name, (layers, d))):
        p = own[own_name].detach()
        params.append((p.t() if transposed else p).contiguous().to(device))
    ids = torch.randint(0, VOCAB, (b, t), generator=g).to(device)
    amp = torch.ones(1, dtype=dtype, device=device)  # not empty: the gate takes max |error| of each output
    grads = tuple(torch.randn(*n, generator=g).to(device=device, dtype=dtype) for n in ((b, t, VOCAB), (1,))) \
        if train else ()
    return (ids, amp, *params), grads


def flops(name: str, sh) -> int:
    """Forward FLOPs of one call: 2 per multiply-add of every matmul — the 12·D² weights of each layer
    and the D × 50257 LM head, per token — plus attention's two T × T × D products per layer, counted
    in full (causal kernels skip about half; the usual convention keeps them)."""
    b, t, layers, d = dims(sh)
    return b * t * (2 * (12 * layers * d * d + VOCAB * d) + 4 * layers * t * d)
