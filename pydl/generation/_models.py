"""Model adapters: one interface over Hugging Face causal LMs and encoder-decoders, pydl models with a
KV cache, and plain logits callables.

Every adapter is used as::

    logits = dec.start(num_beams)            # (B, V) float32: next-token logits after the prompt,
                                             # one row per batch item (all K beams share the prompt)
    logits = dec.step(sequences, beam_idx)   # sequences (N, L) int64 (N = B*K rows, beam-major, the
                                             # last column is the token just chosen); beam_idx (N,)
                                             # int64: row n continues row beam_idx[n] (None: no
                                             # reorder) -> (N, V) float32

The prompt runs once per batch item (not K times): ``start`` prefills B rows and the caches are then
expanded to B*K rows. Hugging Face models keep their own ``DynamicCache`` (reordered with its own
``reorder_cache``, which reallocates: that is transformers' cache, not pydl's); pydl models use
``KVCache`` (in-place reorder, see kv_cache.py).
"""

from __future__ import annotations

import inspect
from typing import Optional, Protocol, runtime_checkable

import torch
from torch import Tensor

from ._config import Settings
from .kv_cache import KVCache, repeat_rows


@runtime_checkable
class GenerationModel(Protocol):
    """The protocol a pydl model implements to be decoded with its own pre-allocated ``KVCache``.

    ``init_cache(batch_size, max_length, *, num_beams=1) -> KVCache``: a cache of ``batch_size`` rows
    (batch items x beams) holding up to ``max_length`` positions per row, lengths 0.

    ``forward_step(input_ids, cache) -> logits``: input_ids (N, T) int64 with N = cache.batch_size;
    token t of row n sits at position ``cache.lengths[n] + t``. The model appends the tokens'
    keys/values (``cache.append``), attends causally over ``[0, lengths[n] + t]`` (T = 1:
    ``pydl.ops.decode_attention(q, k_cache, v_cache, cache.lengths + 1)``), advances the cache
    (``cache.advance(T)``) and returns logits (N, T, V). The generator calls it with T > 1 only on an
    empty cache (the prefill; prompts are right-aligned first, so left padding never reaches the model)
    and with T = 1 afterwards.

    Encoder-decoder models also set ``is_encoder_decoder = True`` and implement
    ``encode(input_ids (B, S), attention_mask (B, S) or None, cache) -> None``, which runs the encoder
    once and stores each layer's cross-attention keys/values per batch item with ``cache.set_cross``
    (served to all beams by ``cache.cross_attention``); ``forward_step`` then takes decoder tokens.
    """

    def init_cache(self, batch_size: int, max_length: int, *, num_beams: int = 1) -> KVCache: ...

    def forward_step(self, input_ids: Tensor, cache: KVCache) -> Tensor: ...


def _last_logits(out) -> Tensor:
    logits = out.logits if hasattr(out, "logits") else out
    return logits[:, -1, :].to(dtype=torch.float32, copy=True)  # (N, V)


class _HFCausal:
    """A transformers decoder-only LM. Positions as transformers computes them for left-padded
    prompts: cumsum(attention_mask) - 1 (0 at pads), + 1 per generated token; an all-ones mask is
    dropped (transformers passes None then)."""

    def __init__(self, model, s: Settings):
        from transformers import DynamicCache

        self.m, self.s = model, s
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.cache = DynamicCache(config=model.config)
        self.mask = s.attention_mask
        ids = s.decoder_input_ids
        if self.mask is not None:
            self.pos = (self.mask.cumsum(-1) - 1).masked_fill(self.mask == 0, 0)  # (B, T0)
            if bool((self.mask == 1).all()):
                self.mask = None
        else:
            self.pos = torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)

    def _forward(self, ids, pos, **kw):
        kw[self.cache_kw] = self.cache
        out = self.m(input_ids=ids, attention_mask=self.mask, position_ids=pos, use_cache=True, return_dict=True,
                     **kw)
        return _last_logits(out)

    def start(self, num_beams: int) -> Tensor:
        logits = self._forward(self.s.decoder_input_ids, self.pos, **self.keep)  # (B, V)
        if num_beams > 1:
            self.cache.batch_repeat_interleave(num_beams)
            if self.mask is not None:
                self.mask = self.mask.repeat_interleave(num_beams, dim=0)
        self.next_pos = self.pos[:, -1:].repeat_interleave(num_beams, dim=0) + 1  # (N, 1)
        return logits

    def step(self, sequences: Tensor, beam_idx: Optional[Tensor]) -> Tensor:
        if beam_idx is not None:
            self.cache.reorder_cache(beam_idx)
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=-1)
        logits = self._forward(sequences[:, -1:], self.next_pos)
        self.next_pos = self.next_pos + 1
        return logits


class _HFSeq2Seq:
    """A transformers encoder-decoder. The encoder runs once on the B inputs; the first decoder step
    runs on B rows (every beam holds just the start token), filling an ``EncoderDecoderCache``. Then:
    the self-attention cache is repeated to B*K rows; the cross-attention keys/values are expanded
    to B*K rows **once** (a zero-copy stride-0 view when B == 1; a single copy otherwise, as
    transformers' attention needs one key row per query row) and are never reordered (the beams of an
    item share them; transformers copies them on every step). The encoder output itself is never
    copied: once every layer's cross-attention cache is filled, transformers reads the encoder states
    only for their batch size, dtype and device, so later steps get a stride-0 view of them."""

    def __init__(self, model, s: Settings):
        self.m, self.s = model, s
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.mask = s.attention_mask  # encoder mask (B, S) or None

    def start(self, num_beams: int) -> Tensor:
        from transformers import DynamicCache, EncoderDecoderCache

        m, s = self.m, self.s
        enc = m.get_encoder()(input_ids=s.encoder_input_ids, attention_mask=self.mask, return_dict=True)
        self.cache = EncoderDecoderCache(DynamicCache(config=m.config), DynamicCache(config=m.config))
        self.enc = enc
        out = m(encoder_outputs=enc, attention_mask=self.mask, decoder_input_ids=s.decoder_input_ids,
                use_cache=True, return_dict=True, **{self.cache_kw: self.cache})
        logits = _last_logits(out)  # (B, V)
        K = num_beams
        self.cache.self_attention_cache.batch_repeat_interleave(K)
        for layer in self.cache.cross_attention_cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.keys, layer.values = repeat_rows(layer.keys, K), repeat_rows(layer.values, K)
        h = enc.last_hidden_state  # (B, S, D)
        filled = all(self.cache.is_updated.get(i, False) for i in range(len(self.cache.cross_attention_cache)))
        N = h.shape[0] * K
        if filled:  # values unread from now on: a stride-0 view with the right batch size
            h_next = h[:1].expand(N, -1, -1) if K > 1 else h
        else:
            h_next = repeat_rows(h, K)
        self.enc_next = type(enc)(last_hidden_state=h_next)
        self.mask_next = None if self.mask is None else repeat_rows(self.mask, K)
        return logits

    def step(self, sequences: Tensor, beam_idx: Optional[Tensor]) -> Tensor:
        if beam_idx is not None:
            self.cache.self_attention_cache.reorder_cache(beam_idx)  # not the per-item cross cache
        out = self.m(encoder_outputs=self.enc_next, attention_mask=self.mask_next,
                     decoder_input_ids=sequences[:, -1:], use_cache=True, return_dict=True,
                     **{self.cache_kw: self.cache})
        return _last_logits(out)


def _right_align(ids: Tensor, mask: Optional[Tensor]):
    """Left (or any) padding -> each row's real tokens first, in order: (ids' (B, T), lengths (B,))."""
    B, T = ids.shape
    if mask is None:
        return ids, torch.full((B,), T, dtype=torch.int32, device=ids.device)
    order = torch.sort((mask == 0).to(torch.int8), dim=1, stable=True).indices  # real tokens first
    return ids.gather(1, order), mask.sum(1).to(torch.int32)


class _PydlModel:
    """A model implementing ``GenerationModel``, decoded with its pre-allocated ``KVCache``."""

    def __init__(self, model, s: Settings):
        self.m, self.s = model, s

    def start(self, num_beams: int) -> Tensor:
        m, s = self.m, self.s
        B = s.batch_size
        self.cache = cache = m.init_cache(B * num_beams, s.max_length, num_beams=num_beams)
        if not isinstance(cache, KVCache):
            raise TypeError(f"model.init_cache must return a pydl.generation.KVCache, got {type(cache).__name__}")
        if s.is_encoder_decoder:
            m.encode(s.encoder_input_ids, s.attention_mask, cache)
            ids, lengths = s.decoder_input_ids, None
        else:
            ids, lengths = _right_align(s.decoder_input_ids, s.attention_mask)
        view = cache.rows(B)
        logits = m.forward_step(ids, view)  # (B, T0, V)
        if lengths is not None and ids.shape[1] > 1:
            view.set_lengths(lengths)  # roll back the padding tail: those positions get overwritten
            last = logits[torch.arange(B, device=logits.device), lengths.to(torch.int64) - 1]  # (B, V)
        else:
            last = logits[:, -1]
        cache.expand_beams_(num_beams)
        return last.to(dtype=torch.float32, copy=True)

    def step(self, sequences: Tensor, beam_idx: Optional[Tensor]) -> Tensor:
        if beam_idx is not None:
            self.cache.reorder(beam_idx)
        return _last_logits(self.m.forward_step(sequences[:, -1:], self.cache))


class _Callable:
    """Any ``fn(input_ids (N, L), attention_mask (N, L)) -> logits (N, L, V)``: no cache, the whole
    prefix is recomputed each step. The mask is the prompt's (ones if none was given) plus ones for the
    generated tokens."""

    def __init__(self, fn, s: Settings):
        self.fn, self.s = fn, s
        ids = s.decoder_input_ids
        self.mask = s.attention_mask if s.attention_mask is not None else torch.ones_like(ids)

    def _call(self, ids, mask) -> Tensor:
        out = self.fn(ids, mask)
        logits = out.logits if hasattr(out, "logits") else out
        if not isinstance(logits, Tensor) or logits.dim() != 3 or logits.shape[:2] != ids.shape:
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"model (a callable) must return logits of shape (batch, length, vocab) = "
                             f"({ids.shape[0]}, {ids.shape[1]}, V), got {got}")
        return logits[:, -1, :].to(dtype=torch.float32, copy=True)

    def start(self, num_beams: int) -> Tensor:
        if self.s.is_encoder_decoder:
            raise TypeError("a plain callable model is decoder-only")
        logits = self._call(self.s.decoder_input_ids, self.mask)
        self.mask = self.mask.repeat_interleave(num_beams, dim=0)
        return logits

    def step(self, sequences: Tensor, beam_idx: Optional[Tensor]) -> Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=-1)
        return self._call(sequences, self.mask)


def make_decoder(model, s: Settings):
    """The adapter for ``s.kind``."""
    return {"hf_causal": _HFCausal, "hf_seq2seq": _HFSeq2Seq, "pydl": _PydlModel, "callable": _Callable}[s.kind](
        model, s)
