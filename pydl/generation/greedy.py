"""Greedy search with Hugging Face ``generate(do_sample=False, num_beams=1)``'s exact results.

Each step takes the top-1 of the (processed) next-token logits through ``pydl.ops.beam_search_step``
with one beam of score 0 (the top-1 of log_softmax is the argmax of the logits; ties: the lower id,
like ``torch.argmax``). Rows that produced an EOS id are finished: from then on they receive the pad
id (a model step still runs for them, as in transformers). Stops when every row is finished or the
sequence reaches ``max_length``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops.beam_search_step import beam_search_step as _beam_search_step
from ._config import Settings, resolve, step_logits
from ._models import make_decoder
from ._output import GenerationOutput


def greedy_search(model, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *,
                  max_new_tokens: Optional[int] = None, max_length: Optional[int] = None, min_new_tokens: int = 0,
                  eos_token_id=None, pad_token_id: Optional[int] = None,
                  decoder_start_token_id: Optional[int] = None) -> GenerationOutput:
    """Greedy decoding; arguments as ``beam_search`` less the beam ones.

    Returns GenerationOutput(sequences (B, T') int64, sequences_scores=None, beam_indices=None), as
    transformers' ``generate(do_sample=False, num_beams=1, return_dict_in_generate=True)``.
    """
    s = resolve(model, input_ids, attention_mask, num_beams=1, max_new_tokens=max_new_tokens,
                max_length=max_length, min_new_tokens=min_new_tokens, eos_token_id=eos_token_id,
                pad_token_id=pad_token_id, decoder_start_token_id=decoder_start_token_id)
    return _greedy(model, s)


def _greedy(model, s: Settings) -> GenerationOutput:
    with torch.inference_mode():
        B, dev = s.batch_size, s.decoder_input_ids.device
        zero = torch.zeros((B, 1), dtype=torch.float32, device=dev)  # one beam of score 0
        seqs = s.decoder_input_ids
        unfinished = torch.ones(B, dtype=torch.bool, device=dev)
        dec = make_decoder(model, s)
        logits = dec.start(1)  # (B, V)
        while True:
            logits, banned = step_logits(logits, s, seqs.shape[1])
            _, tokens, _ = _beam_search_step(logits, zero, 1, banned_tokens=banned)  # (B, 1)
            tokens = tokens[:, 0]
            if s.eos_tensor is not None:
                tokens = torch.where(unfinished, tokens, s.pad)
                unfinished = unfinished & ~torch.isin(tokens, s.eos_tensor)
            seqs = torch.cat([seqs, tokens[:, None]], dim=1)  # (B, L + 1)
            if seqs.shape[1] >= s.max_length or not bool(unfinished.any()):
                break
            logits = dec.step(seqs, None)
        return GenerationOutput(sequences=seqs)
