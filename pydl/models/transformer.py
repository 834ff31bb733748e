"""The Transformer encoder-decoder of "Attention Is All You Need" (Vaswani et al., 2017) on pydl's ops.

    model = pydl.models.transformer.transformer(src_vocab_size=8000, tgt_vocab_size=8000)
    logits = model(src, tgt, src_key_padding_mask, tgt_key_padding_mask)   # (B, T, tgt_vocab_size)

Token embeddings scaled by sqrt(d_model) plus sinusoidal positions (sin on even, cos on odd
channels, wavelengths 2*pi .. 10000*2*pi), dropout; an encoder of self-attention + MLP layers and a
decoder of causal self-attention + cross-attention + MLP layers (MLP: Linear -> GELU -> Linear), each
sub-layer with a residual connection and a LayerNorm: post-LN (``LayerNorm(x + sublayer(x))``, the
paper) by default, pre-LN with ``norm_first=True``; a final LayerNorm on the encoder and the decoder
(as ``torch.nn.Transformer``), and a linear projection to the target vocabulary.

Masks use ``torch.nn.Transformer``'s convention: ``*_key_padding_mask`` (B, S) bool, True = padding.

The encoder and decoder stacks are ``torch.nn.TransformerEncoder``/``TransformerDecoder`` with
``batch_first=True`` and ``activation="gelu"`` parameter for parameter (names ``encoder.layers.{i}.
self_attn.in_proj_weight``, ``linear1``, ``norm1``, ..., ``encoder.norm``): ``model.encoder.state_dict()``
loads into torch's module and gives the same output. Attention is ``pydl.nn.MultiheadAttention``
(pydl's attention op); every residual add is fused with the LayerNorm after it
(``pydl.ops.add_layer_norm``; with pre-LN, also across layers into the next layer's first LN).

Decoding: the ``pydl.generation.GenerationModel`` protocol (``is_encoder_decoder``, ``init_cache``,
``encode``, ``forward_step``): the encoder runs once, each decoder layer's cross-attention keys/values
are stored once per batch item (``KVCache.set_cross``; left-padded sources are compacted first), the
decoder self-attention appends to the pre-allocated cache and runs ``pydl.ops.decode_attention``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.attention import MultiheadAttention
from ..nn.layer_norm import LayerNorm
from ..ops.layer_norm import add_layer_norm
from ._seq import (activation, all_true, cache_positions, cached_self_attention, check_ids, keep_mask,
                   merge_heads, split_heads)


def sinusoidal_positions(positions: Tensor, d_model: int) -> Tensor:
    """positions (...) int -> (..., d_model) float32: PE(p, 2i) = sin(p / 10000^(2i/d)),
    PE(p, 2i+1) = cos(p / 10000^(2i/d))."""
    i = torch.arange(0, d_model, 2, device=positions.device, dtype=torch.float32)
    inv_freq = torch.exp(i * (-math.log(10000.0) / d_model))  # (ceil(d/2),)
    ang = positions.to(torch.float32)[..., None] * inv_freq
    return torch.stack((ang.sin(), ang.cos()), dim=-1).flatten(-2)[..., :d_model]


def _ln(y: Tensor, residual: Tensor, norm: nn.LayerNorm):
    """(norm(y + residual), y + residual) in one pass."""
    return add_layer_norm(y, residual, norm.weight, norm.bias, norm.eps)


class _MLP(nn.Module):
    """torch's layer attribute names: linear1 -> activation -> dropout -> linear2."""

    def _mlp(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class TransformerEncoderLayer(_MLP):
    """Self-attention + MLP; parameters as ``torch.nn.TransformerEncoderLayer(batch_first=True)``."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, norm_first: bool,
                 layer_norm_eps: float = 1e-5, activation_name: str = "gelu"):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm_first = norm_first
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = activation(activation_name)

    def _sa(self, x: Tensor, kpm: Optional[Tensor]) -> Tensor:
        return self.dropout1(self.self_attn(x, x, x, key_padding_mask=kpm, need_weights=False)[0])

    def forward_post(self, x: Tensor, kpm: Optional[Tensor]) -> Tensor:
        x = _ln(self._sa(x, kpm), x, self.norm1)[0]
        return _ln(self.dropout2(self._mlp(x)), x, self.norm2)[0]

    def forward_pre(self, y: Tensor, h: Tensor, kpm: Optional[Tensor], next_norm: nn.LayerNorm):
        """y = norm1(h) -> (next_norm(h'), h') with h' the stream after this layer."""
        y, h = _ln(self._sa(y, kpm), h, self.norm2)
        return _ln(self.dropout2(self._mlp(y)), h, next_norm)


class TransformerDecoderLayer(_MLP):
    """Causal self-attention + cross-attention + MLP; parameters as
    ``torch.nn.TransformerDecoderLayer(batch_first=True)``."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, norm_first: bool,
                 layer_norm_eps: float = 1e-5, activation_name: str = "gelu"):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm_first = norm_first
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps)
        self.norm3 = LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = activation(activation_name)

    # self-attention / cross-attention, full sequences or through a KV cache
    def _sa(self, x: Tensor, causal: Optional[Tensor], kpm: Optional[Tensor], cache, idx: int) -> Tensor:
        if cache is None:
            o = self.self_attn(x, x, x, key_padding_mask=kpm, attn_mask=causal, is_causal=True, need_weights=False)[0]
        else:
            a = self.self_attn
            q, k, v = (split_heads(t, a.num_heads) for t in F.linear(x, a.in_proj_weight, a.in_proj_bias).chunk(3, -1))
            o = a.out_proj(merge_heads(cached_self_attention(q, k, v, cache, idx)))
        return self.dropout1(o)

    def _ca(self, x: Tensor, memory: Optional[Tensor], mkpm: Optional[Tensor], cache, idx: int) -> Tensor:
        a = self.multihead_attn
        if cache is None:
            o = a(x, memory, memory, key_padding_mask=mkpm, need_weights=False)[0]
        else:
            E, H = a.embed_dim, a.num_heads
            b = None if a.in_proj_bias is None else a.in_proj_bias[:E]
            q = split_heads(F.linear(x, a.in_proj_weight[:E], b), H)  # (N, H, T, D)
            N, _, T, D = q.shape
            # the T queries are independent: fold them into the head dim, (N, H*T, 1, D), head h*T + t
            o = cache.cross_attention(idx, q.reshape(N, H * T, 1, D).to(cache.cross_keys[idx].dtype))
            o = a.out_proj(merge_heads(o.reshape(N, H, T, -1).to(q.dtype)))
        return self.dropout2(o)

    def forward_post(self, x, memory, causal, kpm, mkpm, cache=None, idx=0) -> Tensor:
        x = _ln(self._sa(x, causal, kpm, cache, idx), x, self.norm1)[0]
        x = _ln(self._ca(x, memory, mkpm, cache, idx), x, self.norm2)[0]
        return _ln(self.dropout3(self._mlp(x)), x, self.norm3)[0]

    def forward_pre(self, y, h, memory, causal, kpm, mkpm, next_norm, cache=None, idx=0):
        y, h = _ln(self._sa(y, causal, kpm, cache, idx), h, self.norm2)
        y, h = _ln(self._ca(y, memory, mkpm, cache, idx), h, self.norm3)
        return _ln(self.dropout3(self._mlp(y)), h, next_norm)


class TransformerEncoder(nn.Module):
    """``layers`` + the final ``norm`` (as ``torch.nn.TransformerEncoder``)."""

    def __init__(self, layers, norm: nn.LayerNorm, norm_first: bool):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.norm_first = norm_first

    def forward(self, x: Tensor, src_key_padding_mask: Optional[Tensor] = None) -> Tensor:
        kpm = src_key_padding_mask
        if not self.norm_first:
            for layer in self.layers:
                x = layer.forward_post(x, kpm)
            return self.norm(x)
        h, L = x, self.layers
        y = L[0].norm1(h) if len(L) else self.norm(h)
        for i, layer in enumerate(L):
            y, h = layer.forward_pre(y, h, kpm, L[i + 1].norm1 if i + 1 < len(L) else self.norm)
        return y


class TransformerDecoder(nn.Module):
    """``layers`` + the final ``norm`` (as ``torch.nn.TransformerDecoder``)."""

    def __init__(self, layers, norm: nn.LayerNorm, norm_first: bool):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.norm_first = norm_first

    def forward(self, x: Tensor, memory: Optional[Tensor], tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, cache=None) -> Tensor:
        T = x.shape[1]
        causal = None
        if cache is None:  # True = not allowed (torch's bool attn_mask); with no padding the op's causal flag
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).triu_(1)
        args = (causal, tgt_key_padding_mask, memory_key_padding_mask)
        if not self.norm_first:
            for i, layer in enumerate(self.layers):
                x = layer.forward_post(x, memory, *args, cache=cache, idx=i)
            return self.norm(x)
        h, L = x, self.layers
        y = L[0].norm1(h) if len(L) else self.norm(h)
        for i, layer in enumerate(L):
            nxt = L[i + 1].norm1 if i + 1 < len(L) else self.norm
            y, h = layer.forward_pre(y, h, memory, *args, nxt, cache=cache, idx=i)
        return y


class Transformer(nn.Module):
    """Encoder-decoder Transformer: ``forward(src, tgt, src_key_padding_mask=None,
    tgt_key_padding_mask=None) -> logits (B, T, tgt_vocab_size)``."""

    is_encoder_decoder = True

    def __init__(self, src_vocab_size: int, tgt_vocab_size: int, d_model: int = 512, nhead: int = 8,
                 num_encoder_layers: int = 6, num_decoder_layers: int = 6, dim_feedforward: int = 2048,
                 dropout: float = 0.1, norm_first: bool = False, *, layer_norm_eps: float = 1e-5,
                 activation: str = "gelu", tie_word_embeddings: bool = False,
                 decoder_start_token_id: Optional[int] = None, eos_token_id: Optional[int] = None,
                 pad_token_id: Optional[int] = None):
        super().__init__()
        for name, v in (("src_vocab_size", src_vocab_size), ("tgt_vocab_size", tgt_vocab_size),
                        ("d_model", d_model), ("nhead", nhead), ("dim_feedforward", dim_feedforward)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"transformer: {name} must be a positive int, got {v!r}")
        if d_model % nhead:
            raise ValueError(f"transformer: d_model ({d_model}) must be divisible by nhead ({nhead})")
        self.d_model, self.nhead = d_model, nhead
        self.decoder_start_token_id, self.eos_token_id, self.pad_token_id = (decoder_start_token_id, eos_token_id,
                                                                             pad_token_id)
        self.src_embed = nn.Embedding(src_vocab_size, d_model)
        self.tgt_embed = nn.Embedding(tgt_vocab_size, d_model)
        self.dropout = nn.Dropout(dropout)
        lay = (d_model, nhead, dim_feedforward, dropout, norm_first, layer_norm_eps, activation)
        self.encoder = TransformerEncoder([TransformerEncoderLayer(*lay) for _ in range(num_encoder_layers)],
                                          LayerNorm(d_model, eps=layer_norm_eps), norm_first)
        self.decoder = TransformerDecoder([TransformerDecoderLayer(*lay) for _ in range(num_decoder_layers)],
                                          LayerNorm(d_model, eps=layer_norm_eps), norm_first)
        self.generator = nn.Linear(d_model, tgt_vocab_size)
        self.reset_parameters()
        if tie_word_embeddings:
            self.generator.weight = self.tgt_embed.weight

    def reset_parameters(self) -> None:
        """Xavier-uniform matrices (as ``torch.nn.Transformer``), zero attention biases, and N(0, 1/d_model)
        embeddings (unit variance after the sqrt(d_model) scale)."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for emb in (self.src_embed, self.tgt_embed):
            nn.init.normal_(emb.weight, 0.0, self.d_model ** -0.5)

    def example_inputs(self, batch_size: int = 2, *, src_len: int = 7, tgt_len: int = 5,
                       generator: Optional[torch.Generator] = None) -> tuple:
        """(src (B, S), tgt (B, T), src_key_padding_mask (the first row's last 2 are padding))."""
        src = torch.randint(0, self.src_embed.num_embeddings, (batch_size, src_len), generator=generator)
        tgt = torch.randint(0, self.tgt_embed.num_embeddings, (batch_size, tgt_len), generator=generator)
        pad = torch.zeros(batch_size, src_len, dtype=torch.bool)
        pad[0, src_len - min(2, src_len - 1):] = True
        dev = self.src_embed.weight.device
        return src.to(dev), tgt.to(dev), pad.to(dev)

    def _embed(self, emb: nn.Embedding, ids: Tensor, positions: Tensor) -> Tensor:
        x = emb(ids) * math.sqrt(self.d_model)
        return self.dropout(x + sinusoidal_positions(positions, self.d_model).to(x.dtype))

    def run_encoder(self, src: Tensor, src_key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """src (B, S) -> memory (B, S, d_model)."""
        check_ids("src", src)
        kpm = _padding(src_key_padding_mask, src, "src_key_padding_mask")
        return self.encoder(self._embed(self.src_embed, src, torch.arange(src.shape[1], device=src.device)), kpm)

    def run_decoder(self, tgt: Tensor, memory: Tensor, tgt_key_padding_mask: Optional[Tensor] = None,
                    memory_key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """tgt (B, T), memory (B, S, d_model) -> logits (B, T, tgt_vocab_size)."""
        check_ids("tgt", tgt)
        kpm = _padding(tgt_key_padding_mask, tgt, "tgt_key_padding_mask")
        x = self._embed(self.tgt_embed, tgt, torch.arange(tgt.shape[1], device=tgt.device))
        return self.generator(self.decoder(x, memory, kpm, memory_key_padding_mask))

    def forward(self, src: Tensor, tgt: Tensor, src_key_padding_mask: Optional[Tensor] = None,
                tgt_key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """src (B, S), tgt (B, T) int64; key padding masks (B, S) / (B, T) bool, True = padding
        -> logits (B, T, tgt_vocab_size)."""
        check_ids("src", src)
        skpm = _padding(src_key_padding_mask, src, "src_key_padding_mask")
        memory = self.run_encoder(src, skpm)
        return self.run_decoder(tgt, memory, tgt_key_padding_mask, skpm)

    # ---- KV-cache decoding (pydl.generation.GenerationModel) --------------------------------------

    def init_cache(self, batch_size: int, max_length: int, *, num_beams: int = 1, dtype=None, device=None,
                   reorderable: bool = True):
        """A ``KVCache`` for the decoder's self-attention (``batch_size`` rows, ``max_length`` positions)."""
        from ..generation.kv_cache import KVCache

        p = self.tgt_embed.weight
        return KVCache(len(self.decoder.layers), batch_size, self.nhead, max_length, self.d_model // self.nhead,
                       num_beams=num_beams, dtype=dtype or p.dtype, device=device or p.device,
                       reorderable=reorderable)

    def encode(self, input_ids: Tensor, attention_mask: Optional[Tensor], cache) -> None:
        """Run the encoder on input_ids (B, S) (attention_mask (B, S): 1 = token, 0 = padding, any
        placement) and store every decoder layer's cross-attention keys/values per batch item in
        ``cache`` (real tokens first, so the valid prefix lengths describe them)."""
        check_ids("input_ids", input_ids)
        keep = keep_mask(attention_mask, input_ids, "attention_mask")
        memory = self.run_encoder(input_ids, None if keep is None else ~keep)  # (B, S, E)
        lengths = None
        if keep is not None and not bool(keep.all()):
            order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices  # real tokens first
            memory = memory.gather(1, order[..., None].expand_as(memory))
            lengths = keep.sum(1).to(torch.int32)
        E = self.d_model
        for i, layer in enumerate(self.decoder.layers):
            a = layer.multihead_attn
            b = None if a.in_proj_bias is None else a.in_proj_bias[E:]
            k, v = F.linear(memory, a.in_proj_weight[E:], b).chunk(2, -1)
            cache.set_cross(i, split_heads(k, self.nhead).to(cache.keys[i].dtype),
                            split_heads(v, self.nhead).to(cache.values[i].dtype), lengths)

    def forward_step(self, input_ids: Tensor, cache) -> Tensor:
        """Decoder tokens input_ids (N, T) at positions ``cache.lengths + t`` -> logits (N, T, V);
        appends their self-attention keys/values and advances the cache (``encode`` ran first)."""
        check_ids("input_ids", input_ids)
        if input_ids.shape[0] != cache.batch_size:
            raise ValueError(f"transformer.forward_step: input_ids has {input_ids.shape[0]} rows, the cache "
                             f"{cache.batch_size}")
        T = input_ids.shape[1]
        x = self._embed(self.tgt_embed, input_ids, cache_positions(cache, T))
        y = self.decoder(x, None, cache=cache)
        cache.advance(T)
        return self.generator(y)


def _padding(mask: Optional[Tensor], like: Tensor, name: str) -> Optional[Tensor]:
    """A torch-convention key padding mask (True = padding) as bool, or None when nothing is padded."""
    pad = keep_mask(mask, like, name)  # nonzero / True = padding
    if pad is None:
        return None
    return None if all_true(~pad) else pad


def transformer(src_vocab_size: int, tgt_vocab_size: int, d_model: int = 512, nhead: int = 8,
                num_encoder_layers: int = 6, num_decoder_layers: int = 6, dim_feedforward: int = 2048,
                dropout: float = 0.1, norm_first: bool = False, **kwargs) -> Transformer:
    """The Vaswani encoder-decoder (base: d_model 512, 8 heads, 6 + 6 layers, MLP 2048, GELU)."""
    return Transformer(src_vocab_size, tgt_vocab_size, d_model, nhead, num_encoder_layers, num_decoder_layers,
                       dim_feedforward, dropout, norm_first, **kwargs)


__all__ = ["Transformer", "transformer", "sinusoidal_positions"]
