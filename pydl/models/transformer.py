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
loads into torch's module and gives the same output. The ``pydl.nn.MultiheadAttention`` modules hold
the attention parameters; the layers project with them and call ``pydl.ops.attention`` (padding as
one bool mask read through strides, the op's causal flag when the target has no padding). Every
residual add is fused with the LayerNorm after it (``pydl.ops.add_layer_norm``; with pre-LN, also
across layers into the next layer's first LN).

Injected blocks, keyword-only arguments of ``Transformer`` / ``transformer`` (see
``pydl.models._seq``): ``norm_layer`` (default ``pydl.nn.LayerNorm``, called ``norm_layer(d_model,
eps=layer_norm_eps)`` for every LayerNorm; the adds fuse only into pydl's LayerNorm), ``attention``
(``F.scaled_dot_product_attention``'s signature; every attention of the full forward and the cached
prefill) and ``decode_attention`` (the cached decoder self-attention, one token per step). The
cached cross-attention is ``KVCache.cross_attention`` (the cache's beam layout; it runs
``pydl.ops.decode_attention`` and takes no injected function).

Decoding: the ``pydl.generation.GenerationModel`` protocol (``is_encoder_decoder``, ``init_cache``,
``encode``, ``forward_step``): the encoder runs once, each decoder layer's cross-attention keys/values
are stored once per batch item (``KVCache.set_cross``; left-padded sources are compacted first), the
decoder self-attention appends to the pre-allocated cache and runs ``decode_attention``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.attention import MultiheadAttention
from ..nn.layer_norm import LayerNorm
from ..ops.attention import attention
from ..ops.decode_attention import decode_attention
from ._seq import (AttentionFn, NormLayer, activation, add_norm, all_true, cache_positions, cached_self_attention,
                   check_blocks, check_ids, check_sizes, keep_mask, merge_heads, split_heads)


def sinusoidal_positions(positions: Tensor, d_model: int) -> Tensor:
    """positions (...) int -> (..., d_model) float32: PE(p, 2i) = sin(p / 10000^(2i/d)),
    PE(p, 2i+1) = cos(p / 10000^(2i/d))."""
    i = torch.arange(0, d_model, 2, device=positions.device, dtype=torch.float32)
    inv_freq = torch.exp(i * (-math.log(10000.0) / d_model))  # (ceil(d/2),)
    ang = positions.to(torch.float32)[..., None] * inv_freq
    return torch.stack((ang.sin(), ang.cos()), dim=-1).flatten(-2)[..., :d_model]


def _heads(a: MultiheadAttention, x: Tensor, first: int, n: int) -> list:
    """x (B, T, E) through rows [first*E, (first+n)*E) of ``a``'s packed input projection (q, k, v rows in
    that order) in one matmul -> n head views (B, H, T, D): (q, k, v), (q,) or (k, v)."""
    E = a.embed_dim
    rows = slice(first * E, (first + n) * E)
    b = None if a.in_proj_bias is None else a.in_proj_bias[rows]
    return [split_heads(t, a.num_heads) for t in F.linear(x, a.in_proj_weight[rows], b).chunk(n, -1)]


class _Layer(nn.Module):
    """torch's layer attributes, in torch's order (so its state_dict keys and order): ``self_attn``
    (+ ``multihead_attn`` with ``cross_attention``), the MLP ``linear1 -> activation -> dropout ->
    linear2``, ``norm1..normN`` and ``dropout1..dropoutN`` (N = 2, or 3 with cross-attention). The
    ``MultiheadAttention`` modules hold the attention parameters; ``attention_fn`` computes."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, norm_first: bool,
                 layer_norm_eps: float, activation_name: str, *, cross_attention: bool, norm_layer: NormLayer,
                 attention: AttentionFn):
        super().__init__()
        self.attention_fn = attention
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        if cross_attention:
            self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm_first = norm_first
        n = 3 if cross_attention else 2
        for i in range(1, n + 1):
            self.add_module(f"norm{i}", norm_layer(d_model, eps=layer_norm_eps))
        for i in range(1, n + 1):
            self.add_module(f"dropout{i}", nn.Dropout(dropout))
        self.activation = activation(activation_name)

    def _mlp(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def _attend(self, a: MultiheadAttention, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
                is_causal: bool = False) -> Tensor:
        """q (B, H, T, D), k, v (B, H, S, D), mask None or bool broadcast to (B, H, T, S) True = attend
        -> a's output projection of the attention (B, T, E); attention dropout ``a.dropout`` in training."""
        p = a.dropout if self.training else 0.0
        return a.out_proj(merge_heads(self.attention_fn(q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal)))


class TransformerEncoderLayer(_Layer):
    """Self-attention + MLP; parameters as ``torch.nn.TransformerEncoderLayer(batch_first=True)``. Masks
    (``mask``): None or bool (B, 1, 1, S), True = a real key."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, norm_first: bool,
                 layer_norm_eps: float = 1e-5, activation_name: str = "gelu", *, norm_layer: NormLayer,
                 attention: AttentionFn):
        super().__init__(d_model, nhead, dim_feedforward, dropout, norm_first, layer_norm_eps, activation_name,
                         cross_attention=False, norm_layer=norm_layer, attention=attention)

    def _sa(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        return self.dropout1(self._attend(self.self_attn, *_heads(self.self_attn, x, 0, 3), mask))

    def forward_post(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        x = add_norm(self._sa(x, mask), x, self.norm1)[0]
        return add_norm(self.dropout2(self._mlp(x)), x, self.norm2)[0]

    def forward_pre(self, y: Tensor, h: Tensor, mask: Optional[Tensor], next_norm: nn.Module):
        """y = norm1(h) -> (next_norm(h'), h') with h' the stream after this layer."""
        y, h = add_norm(self._sa(y, mask), h, self.norm2)
        return add_norm(self.dropout2(self._mlp(y)), h, next_norm)


class TransformerDecoderLayer(_Layer):
    """Causal self-attention + cross-attention + MLP; parameters as
    ``torch.nn.TransformerDecoderLayer(batch_first=True)``. Masks: ``causal`` None (the causal flag) or
    bool (B, 1, T, T), ``memory_mask`` None or bool (B, 1, 1, S); True = attend. ``layer_idx``: this
    layer's index in a ``KVCache``."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, norm_first: bool,
                 layer_norm_eps: float = 1e-5, activation_name: str = "gelu", *, layer_idx: int,
                 norm_layer: NormLayer, attention: AttentionFn, decode_attention: AttentionFn):
        super().__init__(d_model, nhead, dim_feedforward, dropout, norm_first, layer_norm_eps, activation_name,
                         cross_attention=True, norm_layer=norm_layer, attention=attention)
        self.layer_idx = layer_idx
        self.decode_attention_fn = decode_attention

    # self-attention / cross-attention, full sequences or through a KV cache
    def _sa(self, x: Tensor, causal: Optional[Tensor], cache) -> Tensor:
        a = self.self_attn
        q, k, v = _heads(a, x, 0, 3)  # (N, H, T, D)
        if cache is None:
            o = self._attend(a, q, k, v, causal, is_causal=causal is None)
        else:
            o = a.out_proj(merge_heads(cached_self_attention(q, k, v, cache, self.layer_idx,
                                                             attention=self.attention_fn,
                                                             decode_attention=self.decode_attention_fn)))
        return self.dropout1(o)

    def _ca(self, x: Tensor, memory: Optional[Tensor], memory_mask: Optional[Tensor], cache) -> Tensor:
        a = self.multihead_attn
        (q,) = _heads(a, x, 0, 1)  # (N, H, T, D)
        if cache is None:
            o = self._attend(a, q, *_heads(a, memory, 1, 2), memory_mask)
        else:
            N, H, T, D = q.shape
            # the T queries are independent: fold them into the head dim, (N, H*T, 1, D), head h*T + t
            i = self.layer_idx
            o = cache.cross_attention(i, q.reshape(N, H * T, 1, D).to(cache.cross_keys[i].dtype))
            o = a.out_proj(merge_heads(o.reshape(N, H, T, -1).to(q.dtype)))
        return self.dropout2(o)

    def forward_post(self, x, memory, causal, memory_mask, cache=None) -> Tensor:
        x = add_norm(self._sa(x, causal, cache), x, self.norm1)[0]
        x = add_norm(self._ca(x, memory, memory_mask, cache), x, self.norm2)[0]
        return add_norm(self.dropout3(self._mlp(x)), x, self.norm3)[0]

    def forward_pre(self, y, h, memory, causal, memory_mask, next_norm, cache=None):
        """y = norm1(h) -> (next_norm(h'), h') with h' the stream after this layer."""
        y, h = add_norm(self._sa(y, causal, cache), h, self.norm2)
        y, h = add_norm(self._ca(y, memory, memory_mask, cache), h, self.norm3)
        return add_norm(self.dropout3(self._mlp(y)), h, next_norm)


def _key_mask(key_padding_mask: Optional[Tensor]) -> Optional[Tensor]:
    """torch's (B, S) bool key padding mask (True = padding) -> the attention op's (B, 1, 1, S) True = attend."""
    return None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]


class _Stack(nn.Module):
    """``layers`` + the final ``norm`` (as ``torch.nn.TransformerEncoder`` / ``TransformerDecoder``)."""

    def __init__(self, layers, norm: nn.Module, norm_first: bool):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.norm_first = norm_first

    def _run(self, x: Tensor, *args, **kwargs) -> Tensor:
        """x (B, T, E) through every layer (``forward_post(x, *args, **kwargs)``, or pre-LN
        ``forward_pre(y, h, *args, next_norm, **kwargs)``: each residual add fused into the next layer's
        norm1, the last one into ``norm``) and the final norm -> (B, T, E)."""
        if not self.norm_first:
            for layer in self.layers:
                x = layer.forward_post(x, *args, **kwargs)
            return self.norm(x)
        h, L = x, self.layers
        y = L[0].norm1(h) if len(L) else self.norm(h)
        for i, layer in enumerate(L):
            y, h = layer.forward_pre(y, h, *args, L[i + 1].norm1 if i + 1 < len(L) else self.norm, **kwargs)
        return y


class TransformerEncoder(_Stack):
    """Encoder layers + final norm, as ``torch.nn.TransformerEncoder``."""

    def forward(self, x: Tensor, src_key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """x (B, S, E); src_key_padding_mask (B, S) bool, True = padding -> (B, S, E)."""
        return self._run(x, _key_mask(src_key_padding_mask))


class TransformerDecoder(_Stack):
    """Decoder layers + final norm, as ``torch.nn.TransformerDecoder``; through a ``KVCache`` with ``cache``."""

    def forward(self, x: Tensor, memory: Optional[Tensor], tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, cache=None) -> Tensor:
        """x (B, T, E), memory (B, S, E) (None with a cache); key padding masks (B, T) / (B, S) bool,
        True = padding -> (B, T, E)."""
        T = x.shape[1]
        causal = None  # no target padding (or a cache): the op's causal flag
        if cache is None and tgt_key_padding_mask is not None:
            allowed = torch.ones(T, T, dtype=torch.bool, device=x.device).tril_()  # (T, T) key j <= query i
            causal = allowed & _key_mask(tgt_key_padding_mask)  # (B, 1, T, T)
        return self._run(x, memory, causal, _key_mask(memory_key_padding_mask), cache=cache)


class Transformer(nn.Module):
    """Encoder-decoder Transformer: ``forward(src, tgt, src_key_padding_mask=None,
    tgt_key_padding_mask=None) -> logits (B, T, tgt_vocab_size)``.

    Keyword-only blocks (``pydl.models._seq``): ``norm_layer(d_model, eps=layer_norm_eps)`` (default
    ``pydl.nn.LayerNorm``), ``attention`` (default ``pydl.ops.attention``) and ``decode_attention``
    (default ``pydl.ops.decode_attention``).
    """

    is_encoder_decoder = True

    def __init__(self, src_vocab_size: int, tgt_vocab_size: int, d_model: int = 512, nhead: int = 8,
                 num_encoder_layers: int = 6, num_decoder_layers: int = 6, dim_feedforward: int = 2048,
                 dropout: float = 0.1, norm_first: bool = False, *, layer_norm_eps: float = 1e-5,
                 activation: str = "gelu", tie_word_embeddings: bool = False,
                 decoder_start_token_id: Optional[int] = None, eos_token_id: Optional[int] = None,
                 pad_token_id: Optional[int] = None, norm_layer: NormLayer = LayerNorm,
                 attention: AttentionFn = attention, decode_attention: AttentionFn = decode_attention):
        super().__init__()
        check_blocks("transformer", norm_layer=norm_layer, attention=attention, decode_attention=decode_attention)
        check_sizes("transformer", src_vocab_size=src_vocab_size, tgt_vocab_size=tgt_vocab_size, d_model=d_model,
                    nhead=nhead, dim_feedforward=dim_feedforward)
        if d_model % nhead:
            raise ValueError(f"transformer: d_model ({d_model}) must be divisible by nhead ({nhead})")
        self.d_model, self.nhead = d_model, nhead
        self.decoder_start_token_id, self.eos_token_id, self.pad_token_id = (decoder_start_token_id, eos_token_id,
                                                                             pad_token_id)
        self.src_embed = nn.Embedding(src_vocab_size, d_model)
        self.tgt_embed = nn.Embedding(tgt_vocab_size, d_model)
        self.dropout = nn.Dropout(dropout)
        lay = (d_model, nhead, dim_feedforward, dropout, norm_first, layer_norm_eps, activation)
        blocks = dict(norm_layer=norm_layer, attention=attention)
        self.encoder = TransformerEncoder([TransformerEncoderLayer(*lay, **blocks) for _ in range(num_encoder_layers)],
                                          norm_layer(d_model, eps=layer_norm_eps), norm_first)
        self.decoder = TransformerDecoder([TransformerDecoderLayer(*lay, layer_idx=i, decode_attention=decode_attention,
                                                                   **blocks) for i in range(num_decoder_layers)],
                                          norm_layer(d_model, eps=layer_norm_eps), norm_first)
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
        mkpm = _padding(memory_key_padding_mask, memory[..., 0], "memory_key_padding_mask")
        x = self._embed(self.tgt_embed, tgt, torch.arange(tgt.shape[1], device=tgt.device))
        return self.generator(self.decoder(x, memory, kpm, mkpm))

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
        for i, layer in enumerate(self.decoder.layers):
            k, v = _heads(layer.multihead_attn, memory, 1, 2)  # (B, H, S, D)
            cache.set_cross(i, k.to(cache.keys[i].dtype), v.to(cache.values[i].dtype), lengths)

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
    """The Vaswani encoder-decoder (base: d_model 512, 8 heads, 6 + 6 layers, MLP 2048, GELU); the other
    keywords (layer_norm_eps, ..., the blocks norm_layer, attention, decode_attention) go to ``Transformer``."""
    return Transformer(src_vocab_size, tgt_vocab_size, d_model, nhead, num_encoder_layers, num_decoder_layers,
                       dim_feedforward, dropout, norm_first, **kwargs)


__all__ = ["Transformer", "transformer", "sinusoidal_positions"]
