"""A tiny model implementing ``pydl.generation.GenerationModel``: GPT-2's math on a Hugging Face GPT-2's
weights, with pydl's ``KVCache`` and ``pydl.ops.decode_attention`` — so its beam search must equal
transformers' ``generate`` on the same weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pydl.generation import KVCache
from pydl.ops import decode_attention


class PydlGPT2:
    def __init__(self, hf_model):
        self.t = hf_model.transformer
        self.lm_head = hf_model.lm_head
        cfg = hf_model.config
        self.E, self.H = cfg.n_embd, cfg.n_head
        self.D = self.E // self.H

    def init_cache(self, batch_size, max_length, *, num_beams=1):
        w = self.t.wte.weight
        return KVCache(len(self.t.h), batch_size, self.H, max_length, self.D, num_beams=num_beams,
                       dtype=w.dtype, device=w.device)

    def forward_step(self, input_ids, cache):
        N, T = input_ids.shape
        if T > 1:
            assert bool((cache.lengths == 0).all()), "prefill only on an empty cache"
        pos = cache.lengths.long()[:, None] + torch.arange(T)  # (N, T)
        h = self.t.wte(input_ids) + self.t.wpe(pos)  # (N, T, E)
        for i, blk in enumerate(self.t.h):
            q, k, v = blk.attn.c_attn(blk.ln_1(h)).split(self.E, dim=2)
            q, k, v = (x.view(N, T, self.H, self.D).transpose(1, 2) for x in (q, k, v))  # (N, H, T, D)
            kc, vc = cache.append(i, k, v)
            if T == 1:
                o = decode_attention(q, kc, vc, cache.lengths + 1)  # (N, H, 1, D)
            else:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + blk.attn.c_proj(o.transpose(1, 2).reshape(N, T, self.E))
            h = h + blk.mlp(blk.ln_2(h))
        cache.advance(T)
        return self.lm_head(self.t.ln_f(h))  # (N, T, V)
