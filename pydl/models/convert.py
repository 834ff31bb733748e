"""``pydl.models.from_transformers`` / ``to_transformers``: thin, lazy entry points to
``pydl.integrations.transformers`` (transformers is imported only when one is called)."""

from __future__ import annotations

from torch import nn


def from_transformers(hf_model) -> nn.Module:
    """A Hugging Face ``GPT2LMHeadModel``, ``BertModel`` or ``BertForMaskedLM`` (any config) -> the
    pydl model (``gpt2`` / ``bert`` / ``bert_mlm``) with its weights and the same outputs."""
    from ..integrations.transformers import from_transformers as convert

    return convert(hf_model)


def to_transformers(model: nn.Module):
    """A pydl ``GPT`` / ``Bert`` / ``BertForMaskedLM`` -> the Hugging Face model with its weights."""
    from ..integrations.transformers import to_transformers as convert

    return convert(model)


__all__ = ["from_transformers", "to_transformers"]
