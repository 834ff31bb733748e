"""GPT-2: a decoder-only causal language model (Radford et al., 2019) built on pydl's ops.

    model = pydl.models.gpt.gpt2()                          # 124M: 12 layers, 768 wide, 12 heads
    model = pydl.models.gpt.gpt2(n_layer=2, n_embd=64, n_head=4, vocab_size=1000)
    logits = model(input_ids, attention_mask)               # (B, T) -> (B, T, vocab_size)

Architecture (Hugging Face ``GPT2LMHeadModel``'s math; its weights load with
``pydl.models.from_transformers``): token + learned position embeddings, ``n_layer`` pre-LN blocks
(LayerNorm -> causal multi-head self-attention -> residual add, LayerNorm -> MLP (GELU, tanh
approximation) -> residual add), a final LayerNorm and a language-model head tied to the token
embedding.

The residual stream runs through ``pydl.ops.add_layer_norm``: every residual add is fused with the
LayerNorm that follows it (the block's second LN, the next block's first LN, or the final LN), so the
stream is read once per add instead of twice. Attention is ``pydl.ops.attention`` (``is_causal``, or
one bool mask for padding); token-by-token decoding runs ``pydl.ops.decode_attention`` over a
pre-allocated ``pydl.generation.KVCache`` (the ``GenerationModel`` protocol: ``init_cache`` +
``forward_step``), so ``pydl.generation.beam_search(model, ...)`` drives it.

All three are injected blocks, keyword-only arguments of ``GPT`` / ``gpt2`` (see ``pydl.models._seq``):
``norm_layer`` (default ``pydl.nn.LayerNorm``, called ``norm_layer(n_embd, eps=layer_norm_epsilon)``;
the adds fuse only into pydl's LayerNorm), ``attention`` (``F.scaled_dot_product_attention``'s
signature) and ``decode_attention``, e.g. ``gpt2(norm_layer=torch.nn.LayerNorm,
attention=F.scaled_dot_product_attention)`` is the same model on torch's kernels.

Padding: with an ``attention_mask`` the positions are those transformers' ``generate`` computes for
left-padded prompts, ``cumsum(mask) - 1`` (0 at padding); padding tokens are never attended to.
Logits at padding positions are meaningless (but finite).

Parameter names: ``wte, wpe, h.{i}.ln_1, h.{i}.attn.c_attn, h.{i}.attn.c_proj, h.{i}.ln_2,
h.{i}.mlp.c_fc, h.{i}.mlp.c_proj, ln_f, lm_head`` (Hugging Face's, without the ``transformer.``
prefix), with ``nn.Linear`` weights: (out, in), the transpose of GPT-2's ``Conv1D`` (in, out).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..nn.layer_norm import LayerNorm
from ..ops.attention import attention
from ..ops.decode_attention import decode_attention
from ._seq import (AttentionFn, NormLayer, activation, add_norm, all_true, cache_positions, cached_self_attention,
                   causal_keep_mask, check_blocks, check_ids, check_sizes, init_weights, keep_mask, merge_heads,
                   split_heads)


@dataclasses.dataclass
class GPTConfig:
    """GPT-2's hyper-parameters, named as in transformers' ``GPT2Config`` (defaults: GPT-2 small)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: Optional[int] = None          # MLP width; None: 4 * n_embd
    activation_function: str = "gelu_new"  # transformers' name for GELU with the tanh approximation
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: Optional[int] = 50256
    eos_token_id: Optional[int] = 50256
    pad_token_id: Optional[int] = None

    def __post_init__(self):
        check_sizes("gpt2", **{n: getattr(self, n) for n in ("vocab_size", "n_positions", "n_embd", "n_layer",
                                                             "n_head")})
        if self.n_embd % self.n_head:
            raise ValueError(f"gpt2: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        activation(self.activation_function, "gpt2: activation_function")

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd


class GPTAttention(nn.Module):
    """Causal multi-head self-attention: one (E -> 3E) projection, ``attention`` (through a KV cache:
    ``decode_attention``), (E -> E) out."""

    def __init__(self, cfg: GPTConfig, layer_idx: int, attention: AttentionFn, decode_attention: AttentionFn):
        super().__init__()
        self.attention_fn, self.decode_attention_fn = attention, decode_attention
        E = cfg.n_embd
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(E, 3 * E)
        self.c_proj = nn.Linear(E, E)
        self.attn_pdrop = cfg.attn_pdrop
        self.resid_dropout = nn.Dropout(cfg.resid_pdrop)
        scale = (E // cfg.n_head) ** -0.5 if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_idx + 1)
        self.scale = scale
        self.layer_idx = layer_idx

    def _qkv(self, x: Tensor):
        q, k, v = self.c_attn(x).chunk(3, dim=-1)  # (B, T, E) each
        return split_heads(q, self.n_head), split_heads(k, self.n_head), split_heads(v, self.n_head)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """x (B, T, E); mask: None (plain causal) or bool (B, 1, T, T), True = attend -> (B, T, E)."""
        q, k, v = self._qkv(x)  # (B, H, T, D)
        p = self.attn_pdrop if self.training else 0.0
        o = self.attention_fn(q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None, scale=self.scale)
        return self.resid_dropout(self.c_proj(merge_heads(o)))

    def forward_cached(self, x: Tensor, cache) -> Tensor:
        q, k, v = self._qkv(x)
        o = cached_self_attention(q, k, v, cache, self.layer_idx, self.scale, attention=self.attention_fn,
                                  decode_attention=self.decode_attention_fn)
        return self.c_proj(merge_heads(o))


class GPTMLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.inner_dim)
        self.c_proj = nn.Linear(cfg.inner_dim, cfg.n_embd)
        self.act = activation(cfg.activation_function)
        self.dropout = nn.Dropout(cfg.resid_pdrop)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class GPTBlock(nn.Module):
    """One pre-LN block. Its input is the residual stream ``h`` **and** ``y = ln_1(h)`` (computed by the
    previous add + LN); it returns the stream after the block and ``next_ln`` of it."""

    def __init__(self, cfg: GPTConfig, layer_idx: int, *, norm_layer: NormLayer, attention: AttentionFn,
                 decode_attention: AttentionFn):
        super().__init__()
        self.ln_1 = norm_layer(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = GPTAttention(cfg, layer_idx, attention, decode_attention)
        self.ln_2 = norm_layer(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = GPTMLP(cfg)

    def forward(self, y: Tensor, h: Tensor, next_ln: nn.Module, mask: Optional[Tensor] = None, cache=None):
        """y = ln_1(h), h (B, T, E) -> (next_ln(h'), h') with h' the stream after the block."""
        a = self.attn(y, mask) if cache is None else self.attn.forward_cached(y, cache)
        y, h = add_norm(a, h, self.ln_2)  # h += attn; y = ln_2(h)
        return add_norm(self.mlp(y), h, next_ln)


class GPT(nn.Module):
    """GPT-2 language model: ``forward(input_ids, attention_mask=None) -> logits (B, T, vocab_size)``.

    ``config`` and/or ``GPTConfig``'s fields as keywords; keyword-only blocks (``pydl.models._seq``):
    ``norm_layer(n_embd, eps=layer_norm_epsilon)`` (default ``pydl.nn.LayerNorm``), ``attention``
    (default ``pydl.ops.attention``) and ``decode_attention`` (default ``pydl.ops.decode_attention``).
    """

    is_encoder_decoder = False

    def __init__(self, config: Optional[GPTConfig] = None, *, norm_layer: NormLayer = LayerNorm,
                 attention: AttentionFn = attention, decode_attention: AttentionFn = decode_attention, **kwargs):
        super().__init__()
        check_blocks("gpt2", norm_layer=norm_layer, attention=attention, decode_attention=decode_attention)
        cfg = config if config is not None else GPTConfig(**kwargs)
        if config is not None and kwargs:
            cfg = dataclasses.replace(config, **kwargs)
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.drop = nn.Dropout(cfg.embd_pdrop)
        blocks = dict(norm_layer=norm_layer, attention=attention, decode_attention=decode_attention)
        self.h = nn.ModuleList([GPTBlock(cfg, i, **blocks) for i in range(cfg.n_layer)])
        self.ln_f = norm_layer(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.reset_parameters()
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight

    @property
    def eos_token_id(self) -> Optional[int]:
        return self.config.eos_token_id

    def example_inputs(self, batch_size: int = 2, *, seq_len: int = 8,
                       generator: Optional[torch.Generator] = None) -> tuple:
        """(input_ids (B, T), attention_mask (B, T)) with the first row left-padded by 2."""
        T = min(seq_len, self.config.n_positions)
        ids = torch.randint(0, self.config.vocab_size, (batch_size, T), generator=generator)
        mask = torch.ones(batch_size, T, dtype=torch.long)
        mask[0, : min(2, T - 1)] = 0
        dev = self.wte.weight.device
        return ids.to(dev), mask.to(dev)

    def reset_parameters(self) -> None:
        """GPT-2's initialisation: N(0, 0.02) weights, zero biases, unit norms (``_seq.init_weights``), and
        the residual projections (attn.c_proj, mlp.c_proj) scaled by 1/sqrt(2 * n_layer)."""
        std = self.config.initializer_range
        init_weights(self, std)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layer))

    # ---- the full forward ----------------------------------------------------------------------

    def _stack(self, x: Tensor, mask: Optional[Tensor], cache) -> Tensor:
        """Embedded input (B, T, E) -> final-LN'd hidden states (B, T, E)."""
        h = self.drop(x)
        y = self.h[0].ln_1(h) if len(self.h) else self.ln_f(h)
        for i, block in enumerate(self.h):
            next_ln = self.h[i + 1].ln_1 if i + 1 < len(self.h) else self.ln_f
            y, h = block(y, h, next_ln, mask, cache)
        return y

    def hidden_states(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                      position_ids: Optional[Tensor] = None) -> Tensor:
        """The final LayerNorm's output (B, T, n_embd) (transformers' ``last_hidden_state``)."""
        check_ids("input_ids", input_ids)
        B, T = input_ids.shape
        if T > self.config.n_positions:
            raise ValueError(f"gpt2: sequence length {T} exceeds n_positions={self.config.n_positions}")
        keep = keep_mask(attention_mask, input_ids, "attention_mask")
        if position_ids is None:
            if keep is None:
                position_ids = torch.arange(T, device=input_ids.device)[None]  # (1, T)
            else:  # as transformers' generate: cumsum(mask) - 1, 0 at padding
                position_ids = (keep.long().cumsum(-1) - 1).masked_fill(~keep, 0)  # (B, T)
        mask = None
        if keep is not None and not all_true(keep):
            mask = causal_keep_mask(keep)[:, None]  # (B, 1, T, T)
        x = self.wte(input_ids) + self.wpe(position_ids)
        return self._stack(x, mask, None)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None) -> Tensor:
        """input_ids (B, T) int64; attention_mask (B, T) 1 = token, 0 = padding (or None) -> logits
        (B, T, vocab_size). ``position_ids`` (B, T) overrides the positions derived from the mask."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids))

    # ---- KV-cache decoding (pydl.generation.GenerationModel) --------------------------------------

    def init_cache(self, batch_size: int, max_length: int, *, num_beams: int = 1, dtype=None, device=None,
                   reorderable: bool = True):
        """A ``KVCache`` of ``batch_size`` rows for up to ``max_length`` positions (<= n_positions),
        in the model's parameter dtype and device unless given."""
        from ..generation.kv_cache import KVCache

        if max_length > self.config.n_positions:
            raise ValueError(f"gpt2: max_length ({max_length}) exceeds n_positions={self.config.n_positions}")
        p = self.wte.weight
        cfg = self.config
        return KVCache(cfg.n_layer, batch_size, cfg.n_head, max_length, cfg.n_embd // cfg.n_head,
                       num_beams=num_beams, dtype=dtype or p.dtype, device=device or p.device,
                       reorderable=reorderable)

    def forward_step(self, input_ids: Tensor, cache) -> Tensor:
        """input_ids (N, T): T new tokens per row at positions ``cache.lengths + t``; appends their
        keys/values to ``cache``, advances it, and returns their logits (N, T, vocab_size)."""
        check_ids("input_ids", input_ids)
        if input_ids.shape[0] != cache.batch_size:
            raise ValueError(f"gpt2.forward_step: input_ids has {input_ids.shape[0]} rows, the cache "
                             f"{cache.batch_size}")
        T = input_ids.shape[1]
        x = self.wte(input_ids) + self.wpe(cache_positions(cache, T))
        y = self._stack(x, None, cache)
        cache.advance(T)
        return self.lm_head(y)


def gpt2(config: Optional[GPTConfig] = None, **kwargs) -> GPT:
    """GPT-2 (124M parameters by default); keywords (``GPTConfig``'s fields, named as in
    transformers' ``GPT2Config``: vocab_size, n_positions, n_embd, n_layer, n_head, n_inner,
    activation_function, layer_norm_epsilon, *_pdrop, ...) override the defaults; the blocks
    ``norm_layer``, ``attention``, ``decode_attention`` are passed to ``GPT``."""
    return GPT(config, **kwargs)


__all__ = ["GPT", "GPTConfig", "gpt2"]
