"""BERT: a bidirectional Transformer encoder (Devlin et al., 2019) and its masked-LM head, on pydl's ops.

    model = pydl.models.bert.bert()                         # BERT-base: 12 layers, 768 wide, 109.48M
    h = model(input_ids, attention_mask, token_type_ids)    # (B, T) -> last hidden state (B, T, 768)
    mlm = pydl.models.bert.bert_mlm()                       # + the MLM head (tied decoder) -> logits

Hugging Face's math, module tree and parameter names: a ``BertModel`` state_dict loads into ``Bert``
with ``load_state_dict`` unchanged (and a ``BertForMaskedLM`` one into ``BertForMaskedLM``);
``pydl.models.from_transformers`` also reads the sizes from the model's config.

Post-LN layers: ``LayerNorm(x + Dropout(sublayer(x)))`` after the attention and after the MLP, each
residual add fused with its LayerNorm in one ``pydl.ops.add_layer_norm``; the embedding sum
(word + token type + position) is fused the same way. Attention is ``pydl.ops.attention`` with the
padding mask as one bool (B, 1, 1, T) mask read through strides.

Both are injected blocks, keyword-only arguments of ``Bert`` / ``BertForMaskedLM`` / ``bert`` /
``bert_mlm`` (see ``pydl.models._seq``): ``norm_layer`` (default ``pydl.nn.LayerNorm``, called
``norm_layer(hidden_size, eps=layer_norm_eps)`` for every LayerNorm, the MLM head's included; the adds
fuse only into pydl's LayerNorm) and ``attention`` (``F.scaled_dot_product_attention``'s signature).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor, nn

from ..nn.layer_norm import LayerNorm
from ..ops.attention import attention
from ._seq import (AttentionFn, NormLayer, activation, add_norm, all_true, check_blocks, check_ids, check_sizes,
                   init_weights, keep_mask, merge_heads, split_heads)


@dataclasses.dataclass
class BertConfig:
    """BERT's hyper-parameters, named as in transformers' ``BertConfig`` (defaults: BERT-base)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: Optional[int] = 0
    add_pooling_layer: bool = True  # the pooler (dense + tanh on [CLS]); BERT-base's 109.48M count has it

    def __post_init__(self):
        check_sizes("bert", **{n: getattr(self, n) for n in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                             "num_attention_heads", "intermediate_size",
                                                             "max_position_embeddings", "type_vocab_size")})
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"bert: hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads})")
        activation(self.hidden_act, "bert: hidden_act")


class BertEmbeddings(nn.Module):
    """LayerNorm(word + token type + position embeddings) -> dropout: (B, T) ids -> (B, T, hidden_size)."""

    def __init__(self, cfg: BertConfig, norm_layer: NormLayer):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = norm_layer(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, token_type_ids: Optional[Tensor], position_ids: Optional[Tensor]) -> Tensor:
        T = input_ids.shape[1]
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)[None]  # (1, T)
        x = self.word_embeddings(input_ids)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        pos = self.position_embeddings(position_ids).expand_as(x)  # (B, T, H), a stride-0 view for (1, T)
        return self.dropout(add_norm(x, pos, self.LayerNorm)[0])


class BertSelfAttention(nn.Module):
    """Multi-head self-attention without the output projection: query, key, value -> ``attention``."""

    def __init__(self, cfg: BertConfig, attention: AttentionFn):
        super().__init__()
        self.attention_fn = attention
        H = cfg.hidden_size
        self.num_attention_heads = cfg.num_attention_heads
        self.query = nn.Linear(H, H)
        self.key = nn.Linear(H, H)
        self.value = nn.Linear(H, H)
        self.dropout_p = cfg.attention_probs_dropout_prob

    def forward(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        """x (B, T, H); mask bool (B, 1, 1, T) True = attend, or None -> context (B, T, H)."""
        n = self.num_attention_heads
        q, k, v = (split_heads(f(x), n) for f in (self.query, self.key, self.value))  # (B, n, T, D)
        p = self.dropout_p if self.training else 0.0
        return merge_heads(self.attention_fn(q, k, v, attn_mask=mask, dropout_p=p))


class BertSelfOutput(nn.Module):
    """Post-LN residual step: x (B, T, in_features) -> LayerNorm(dropout(dense(x)) + residual) (B, T, hidden)."""

    def __init__(self, cfg: BertConfig, norm_layer: NormLayer, in_features: Optional[int] = None):
        super().__init__()
        self.dense = nn.Linear(in_features or cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = norm_layer(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return add_norm(self.dropout(self.dense(x)), residual, self.LayerNorm)[0]


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig, norm_layer: NormLayer, attention: AttentionFn):
        super().__init__()
        self.self = BertSelfAttention(cfg, attention)
        self.output = BertSelfOutput(cfg, norm_layer)

    def forward(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.intermediate_act_fn = activation(cfg.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.intermediate_act_fn(self.dense(x))


class BertOutput(BertSelfOutput):
    """The MLP's residual step (dense: intermediate_size -> hidden_size)."""

    def __init__(self, cfg: BertConfig, norm_layer: NormLayer):
        super().__init__(cfg, norm_layer, cfg.intermediate_size)


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig, norm_layer: NormLayer, attention: AttentionFn):
        super().__init__()
        self.attention = BertAttention(cfg, norm_layer, attention)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg, norm_layer)

    def forward(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        a = self.attention(x, mask)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig, norm_layer: NormLayer, attention: AttentionFn):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(cfg, norm_layer, attention) for _ in range(cfg.num_hidden_layers)])

    def forward(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        for layer in self.layer:
            x = layer(x, mask)
        return x


class BertPooler(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden: Tensor) -> Tensor:
        return self.activation(self.dense(hidden[:, 0]))


def _example_inputs(cfg: BertConfig, device, batch_size: int, seq_len: int,
                    generator: Optional[torch.Generator]) -> tuple:
    """(input_ids, attention_mask (the first row right-padded by 2), token_type_ids (0s then 1s))."""
    T = min(seq_len, cfg.max_position_embeddings)
    ids = torch.randint(0, cfg.vocab_size, (batch_size, T), generator=generator)
    mask = torch.ones(batch_size, T, dtype=torch.long)
    mask[0, T - min(2, T - 1):] = 0
    tt = torch.zeros(batch_size, T, dtype=torch.long)
    tt[:, T // 2:] = min(1, cfg.type_vocab_size - 1)
    return ids.to(device), mask.to(device), tt.to(device)


def _config(config: Optional[BertConfig], kwargs: dict) -> BertConfig:
    if config is None:
        return BertConfig(**kwargs)
    return dataclasses.replace(config, **kwargs) if kwargs else config


class Bert(nn.Module):
    """BERT encoder: ``forward(input_ids, attention_mask=None, token_type_ids=None) -> (B, T, hidden)``.

    ``config`` and/or ``BertConfig``'s fields as keywords; keyword-only blocks (``pydl.models._seq``):
    ``norm_layer(hidden_size, eps=layer_norm_eps)`` (default ``pydl.nn.LayerNorm``) and ``attention``
    (default ``pydl.ops.attention``).
    """

    def __init__(self, config: Optional[BertConfig] = None, *, norm_layer: NormLayer = LayerNorm,
                 attention: AttentionFn = attention, **kwargs):
        super().__init__()
        check_blocks("bert", norm_layer=norm_layer, attention=attention)
        cfg = self.config = _config(config, kwargs)
        self.embeddings = BertEmbeddings(cfg, norm_layer)
        self.encoder = BertEncoder(cfg, norm_layer, attention)
        self.pooler = BertPooler(cfg) if cfg.add_pooling_layer else None
        init_weights(self, cfg.initializer_range)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None) -> Tensor:
        """input_ids (B, T) int64; attention_mask (B, T) 1 = token, 0 = padding; token_type_ids (B, T)
        (None: all 0); position_ids (B, T) (None: 0..T-1) -> last hidden state (B, T, hidden_size)."""
        check_ids("input_ids", input_ids)
        T = input_ids.shape[1]
        if T > self.config.max_position_embeddings and position_ids is None:
            raise ValueError(f"bert: sequence length {T} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        if token_type_ids is not None:
            check_ids("token_type_ids", token_type_ids)
        keep = keep_mask(attention_mask, input_ids, "attention_mask")
        mask = None if keep is None or all_true(keep) else keep[:, None, None, :]  # (B, 1, 1, T)
        x = self.embeddings(input_ids, token_type_ids, position_ids)
        return self.encoder(x, mask)

    def example_inputs(self, batch_size: int = 2, *, seq_len: int = 8,
                       generator: Optional[torch.Generator] = None) -> tuple:
        return _example_inputs(self.config, self.embeddings.word_embeddings.weight.device, batch_size, seq_len,
                               generator)

    def pooled_output(self, last_hidden_state: Tensor) -> Tensor:
        """The pooler on [CLS]: tanh(dense(h[:, 0])) -> (B, hidden_size) (transformers' pooler_output)."""
        if self.pooler is None:
            raise RuntimeError("bert: this model was built with add_pooling_layer=False")
        return self.pooler(last_hidden_state)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, cfg: BertConfig, norm_layer: NormLayer):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.transform_act_fn = activation(cfg.hidden_act)
        self.LayerNorm = norm_layer(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, cfg: BertConfig, norm_layer: NormLayer):
        super().__init__()
        self.transform = BertPredictionHeadTransform(cfg, norm_layer)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.decoder.bias = self.bias  # one output bias, under both names (as transformers)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.transform(x))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, cfg: BertConfig, norm_layer: NormLayer):
        super().__init__()
        self.predictions = BertLMPredictionHead(cfg, norm_layer)

    def forward(self, x: Tensor) -> Tensor:
        return self.predictions(x)


class BertForMaskedLM(nn.Module):
    """BERT + the masked-LM head (dense -> act -> LayerNorm -> decoder tied to the word embedding)
    -> logits (B, T, vocab_size). The encoder has no pooler, as in transformers. Keywords as ``Bert``'s;
    ``norm_layer`` also builds the head's LayerNorm."""

    def __init__(self, config: Optional[BertConfig] = None, *, norm_layer: NormLayer = LayerNorm,
                 attention: AttentionFn = attention, **kwargs):
        super().__init__()
        kwargs.setdefault("add_pooling_layer", False)
        cfg = _config(config, kwargs)
        self.bert = Bert(cfg, norm_layer=norm_layer, attention=attention)
        self.config = self.bert.config
        self.cls = BertOnlyMLMHead(cfg, norm_layer)
        init_weights(self.cls, cfg.initializer_range)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None) -> Tensor:
        return self.cls(self.bert(input_ids, attention_mask, token_type_ids, position_ids))

    def example_inputs(self, batch_size: int = 2, *, seq_len: int = 8,
                       generator: Optional[torch.Generator] = None) -> tuple:
        return self.bert.example_inputs(batch_size, seq_len=seq_len, generator=generator)


def bert(config: Optional[BertConfig] = None, **kwargs) -> Bert:
    """BERT-base encoder (109.48M parameters with the pooler); ``BertConfig``'s fields (named as in
    transformers' ``BertConfig``) override the defaults; ``norm_layer`` and ``attention`` go to ``Bert``."""
    return Bert(config, **kwargs)


def bert_mlm(config: Optional[BertConfig] = None, **kwargs) -> BertForMaskedLM:
    """BERT-base with the masked-LM head (tied decoder) -> logits (B, T, vocab_size); keywords as ``bert``'s."""
    return BertForMaskedLM(config, **kwargs)


__all__ = ["Bert", "BertConfig", "BertForMaskedLM", "bert", "bert_mlm"]
