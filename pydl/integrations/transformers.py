"""Hugging Face transformers interop: convert ``GPT2LMHeadModel``, ``BertModel`` and
``BertForMaskedLM`` (any config) to pydl's models and back, weights included.

    pydl_model = pydl.models.from_transformers(hf_model)    # same outputs
    hf_model = pydl.models.to_transformers(pydl_model)

The sizes come from ``hf_model.config``; options pydl's models do not implement (cross-attention,
relative position embeddings, a BERT decoder, unknown activations) are refused with a ValueError
naming the config field. GPT-2's ``Conv1D`` layers store their weight as (in, out), the transpose of
the ``nn.Linear`` (out, in) that pydl uses: they are transposed both ways. The converted model has
the source's dtype, device and train/eval mode, and its own copy of the weights.

Also here (from pydl/integrations/transformers_attention.py): ``attention_forward`` and
``register_attention`` — importing this module registers ``attn_implementation="pydl"`` with
transformers — and ``llama_rms_norm_forward`` / ``rms_norm_classes`` (LLaMA-family RMSNorm).

Import-guarded: importing this module imports transformers (an ImportError naming the package when
it is missing), and pydl never imports this module unless asked (``pydl.models.from_transformers`` /
``to_transformers`` do, lazily).
"""

from __future__ import annotations

import dataclasses
from typing import Dict

import torch
from torch import Tensor, nn

from .transformers_attention import (attention_forward, llama_rms_norm_forward, patch_rules, register_attention,
                                    rms_norm_classes)


def _tf():
    """The transformers package (importing .transformers_attention imported it, or raised)."""
    import transformers

    return transformers


def _like(src: nn.Module) -> dict:
    p = next(iter(src.parameters()), None)
    return {} if p is None else {"dtype": p.dtype, "device": p.device}


def _finish(dst: nn.Module, src: nn.Module) -> nn.Module:
    kw = _like(src)
    if kw:
        dst.to(**kw)
    return dst.train(src.training)


def _empty(build, src: nn.Module) -> nn.Module:
    """build() on the meta device (no initialisation cost), then uninitialised storage in the source's
    dtype and device; the caller re-ties shared parameters and loads every entry of the state_dict."""
    with torch.device("meta"):
        model = build()
    kw = _like(src)
    model.to_empty(device=kw.get("device", "cpu"))
    return model.to(dtype=kw.get("dtype", torch.float32))


def _load(dst: nn.Module, sd: Dict[str, Tensor], what: str) -> None:
    """Copy ``sd`` into ``dst`` (strict over dst's keys; keys dst does not have are an error too)."""
    own = dst.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(f"{what}: state_dict mismatch; missing {missing[:8]}, unexpected {unexpected[:8]}")
    dst.load_state_dict(sd, strict=True)


def _config_values(hf_cfg, fields) -> dict:
    """The dataclass fields that ``hf_cfg`` sets (same names in pydl's configs and transformers')."""
    return {f.name: getattr(hf_cfg, f.name) for f in fields if hasattr(hf_cfg, f.name)}


# ---- GPT-2 -----------------------------------------------------------------------------------------

_GPT_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _gpt_from(hf_model):
    from ..models.gpt import GPT, GPTConfig

    c = hf_model.config
    if getattr(c, "add_cross_attention", False):
        raise ValueError("from_transformers: GPT-2 with config.add_cross_attention=True is not supported")
    if not isinstance(getattr(c, "activation_function", None), str):
        raise ValueError(f"from_transformers: config.activation_function={c.activation_function!r} is not supported")
    kw = _config_values(c, dataclasses.fields(GPTConfig))
    kw["tie_word_embeddings"] = bool(getattr(c, "tie_word_embeddings", True))
    try:
        cfg = GPTConfig(**kw)
    except ValueError as e:
        raise ValueError(f"from_transformers: {e}") from None
    model = _empty(lambda: GPT(cfg), hf_model)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.wte.weight
    sd = {}
    for k, v in hf_model.state_dict().items():
        k = k.removeprefix("transformer.")
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of older transformers versions
        sd[k] = v.t() if k.endswith(_GPT_CONV1D) else v
    if "lm_head.weight" not in sd and cfg.tie_word_embeddings:
        sd["lm_head.weight"] = sd["wte.weight"]
    _load(model, sd, "from_transformers(GPT2LMHeadModel)")
    return model.train(hf_model.training)


def _gpt_to(model):
    tf = _tf()
    c = model.config
    hc = tf.GPT2Config(**{k: v for k, v in dataclasses.asdict(c).items()})
    hf = tf.GPT2LMHeadModel(hc)
    sd = {}
    for k, v in model.state_dict().items():
        v = v.t() if k.endswith(_GPT_CONV1D) else v
        sd[k if k == "lm_head.weight" else "transformer." + k] = v
    hf.to(**_like(model))
    _load(hf, sd, "to_transformers(GPT)")
    return hf.train(model.training)


# ---- BERT ------------------------------------------------------------------------------------------

def _bert_config(c):
    from ..models.bert import BertConfig

    if getattr(c, "is_decoder", False) or getattr(c, "add_cross_attention", False):
        raise ValueError("from_transformers: BERT as a decoder (config.is_decoder / add_cross_attention) is "
                         "not supported")
    pet = getattr(c, "position_embedding_type", "absolute")
    if pet not in (None, "absolute"):
        raise ValueError(f"from_transformers: config.position_embedding_type={pet!r} is not supported "
                         f"(only 'absolute')")
    if not isinstance(getattr(c, "hidden_act", None), str):
        raise ValueError(f"from_transformers: config.hidden_act={c.hidden_act!r} is not supported")
    kw = _config_values(c, [f for f in dataclasses.fields(BertConfig) if f.name != "add_pooling_layer"])
    try:
        return BertConfig(**kw)
    except ValueError as e:
        raise ValueError(f"from_transformers: {e}") from None


def _bert_from(hf_model, mlm: bool):
    from ..models.bert import Bert, BertForMaskedLM

    cfg = _bert_config(hf_model.config)
    if mlm:
        model = _empty(lambda: BertForMaskedLM(cfg, add_pooling_layer=hf_model.bert.pooler is not None), hf_model)
        pred = model.cls.predictions
        pred.decoder.weight = model.bert.embeddings.word_embeddings.weight
        pred.decoder.bias = pred.bias
    else:
        model = _empty(lambda: Bert(cfg, add_pooling_layer=hf_model.pooler is not None), hf_model)
    model.train(hf_model.training)
    sd = dict(hf_model.state_dict())
    if mlm:  # tied entries that some versions leave out of the state_dict
        sd.setdefault("cls.predictions.decoder.weight", sd["bert.embeddings.word_embeddings.weight"])
        sd.setdefault("cls.predictions.decoder.bias", sd["cls.predictions.bias"])
    _load(model, sd, f"from_transformers({type(hf_model).__name__})")
    return model


def _bert_to(model, mlm: bool):
    tf = _tf()
    c = dataclasses.asdict(model.config)
    pool = c.pop("add_pooling_layer")
    if mlm and pool:
        raise ValueError("to_transformers: transformers' BertForMaskedLM has no pooler; build bert_mlm with "
                         "add_pooling_layer=False")
    hc = tf.BertConfig(**c)
    hf = tf.BertForMaskedLM(hc) if mlm else tf.BertModel(hc, add_pooling_layer=pool)
    _finish(hf, model)
    _load(hf, model.state_dict(), "to_transformers(Bert)")
    return hf


# ---- public ----------------------------------------------------------------------------------------

def from_transformers(hf_model) -> nn.Module:
    """A transformers ``GPT2LMHeadModel`` / ``BertModel`` / ``BertForMaskedLM`` -> the pydl model
    (``pydl.models.gpt.GPT`` / ``pydl.models.bert.Bert`` / ``BertForMaskedLM``) with its weights."""
    tf = _tf()
    if isinstance(hf_model, tf.GPT2LMHeadModel):
        return _gpt_from(hf_model)
    if isinstance(hf_model, tf.BertForMaskedLM):
        return _bert_from(hf_model, mlm=True)
    if isinstance(hf_model, tf.BertModel):
        return _bert_from(hf_model, mlm=False)
    raise TypeError(f"from_transformers: hf_model must be a transformers GPT2LMHeadModel, BertModel or "
                    f"BertForMaskedLM, got {type(hf_model).__name__}")


def to_transformers(model: nn.Module):
    """A pydl ``GPT`` / ``Bert`` / ``BertForMaskedLM`` -> the transformers model with its weights."""
    from ..models.bert import Bert, BertForMaskedLM
    from ..models.gpt import GPT

    if isinstance(model, GPT):
        return _gpt_to(model)
    if isinstance(model, BertForMaskedLM):
        return _bert_to(model, mlm=True)
    if isinstance(model, Bert):
        return _bert_to(model, mlm=False)
    raise TypeError(f"to_transformers: model must be a pydl GPT, Bert or BertForMaskedLM, got "
                    f"{type(model).__name__}")


__all__ = ["attention_forward", "from_transformers", "llama_rms_norm_forward", "patch_rules", "register_attention",
           "rms_norm_classes", "to_transformers"]
