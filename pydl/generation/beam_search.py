"""Beam search with Hugging Face ``generate(num_beams=K, do_sample=False)``'s exact results.

State per batch item b (shapes with B items, K beams, C = max(2, 1 + n_eos) * K candidates, Lmax the
max length, G = Lmax - T0 generated positions):

    running_seqs    (B, K, Lmax) int64    the K live beams (prompt + tokens so far)
    running_scores  (B, K) float32        their summed log-probs; at the start beam 0 = 0, others -1e9
                                          (all beams hold the same prompt: only beam 0 is alive)
    running_bidx    (B, K, G) int32       for each generated token, the row (b*K + beam) it came from
    done_seqs / done_scores / done_bidx   the K best finished hypotheses (scores length-penalised,
    done_flags (B, K) bool                -1e9 where none yet)

One step (transformers' order of operations, re-implemented):
 1. ``pydl.ops.beam_search_step(logits (B*K, V), running_scores, C)``: the C best (score, token, beam)
    of log_softmax(logits) + running_scores over K x V (EOS banned before ``min_length``; forced-token
    processors applied in torch first, see _config.step_logits).
 2. A candidate "finishes" when its token is an EOS id or the sequence reaches ``max_length``.
 3. The next live beams: the K best candidates after adding -1e9 to the finishing ones.
 4. Finished hypotheses: only the first K candidates may finish; their score is
    sum_logprobs / (generated_length ** length_penalty), generated_length = cur_len + 1 - T0 (the new
    token, EOS included, counts; the prompt does not). Blocked (-1e9 added) when early_stopping is True
    and the item already has K finished, or when the item's early-stop heuristic says no improvement
    is possible. Merged with the previous finished K and the top K kept.
 5. Early-stop heuristic per item: improvement is still possible while the best running score
    divided by (L ** length_penalty) beats the worst finished score, with L = cur_len - T0 (the new
    length), or Lmax - T0 when early_stopping == "never" and length_penalty > 0. Stop when no item
    can improve, or (early_stopping True) every item has K finished, or every candidate finished.

Output (``GenerationOutput``): the top ``num_return_sequences`` finished hypotheses per item, cut to
the longest one (T0 + its generated length); positions past a shorter hypothesis' end hold the pad id,
or, exactly as transformers does (its ``pad_token_id or eos_token_id[0]``), the first EOS id when the
pad id is 0, and -1 when no EOS id is set.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops.beam_search_step import beam_search_step as _beam_search_step
from ._config import Settings, resolve, step_logits
from ._models import make_decoder
from ._output import GenerationOutput

_NEG = -1.0e9  # transformers' "impossible" score (a finite number: float arithmetic on it matters)


def _take(t: Tensor, idx: Tensor) -> Tensor:
    """t (B, M, ...) gathered along dim 1 by idx (B, n) -> (B, n, ...)."""
    while idx.dim() < t.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(t, idx, dim=1)


def beam_search(model, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *, num_beams: int,
                max_new_tokens: Optional[int] = None, max_length: Optional[int] = None, min_new_tokens: int = 0,
                length_penalty: float = 1.0, early_stopping=False, num_return_sequences: int = 1,
                eos_token_id=None, pad_token_id: Optional[int] = None,
                decoder_start_token_id: Optional[int] = None) -> GenerationOutput:
    """Beam search, token for token what transformers' ``generate(num_beams=K, do_sample=False,
    return_dict_in_generate=True, output_scores=True)`` returns for the same model and inputs.

    model: a transformers ``PreTrainedModel`` (causal LM or encoder-decoder; unset ids come from its
        ``generation_config``), a ``GenerationModel`` (pydl KV-cache protocol), or a callable
        ``(input_ids (N, L), attention_mask (N, L)) -> logits (N, L, V)``.
    input_ids (B, T) int64: the prompts (left-padded, with ``attention_mask``) or the encoder inputs.
    attention_mask (B, T) 0/1 or None.
    num_beams K >= 1 (K == 1 is greedy search, as in transformers); num_return_sequences <= K.
    max_new_tokens / max_length / min_new_tokens: see pydl.generation._config.
    length_penalty: exponent of the generated length dividing a finished hypothesis' log-prob sum.
    early_stopping: True (stop an item once it has K finished), False (stop when the heuristic says the
        best live beam cannot win any more), "never" (the canonical bound).
    eos_token_id: int or list of ints; pad_token_id (default: the first EOS id);
    decoder_start_token_id: encoder-decoder models only.

    Returns GenerationOutput(sequences (B*R, T'), sequences_scores (B*R,), beam_indices (B*R, T'-T0)).
    """
    s = resolve(model, input_ids, attention_mask, num_beams=num_beams, max_new_tokens=max_new_tokens,
                max_length=max_length, min_new_tokens=min_new_tokens, length_penalty=length_penalty,
                early_stopping=early_stopping, num_return_sequences=num_return_sequences,
                eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                decoder_start_token_id=decoder_start_token_id)
    if s.num_beams == 1:
        from .greedy import _greedy

        return _greedy(model, s)
    with torch.inference_mode():
        return _beam(model, s)


def _fill_value(s: Settings) -> int:
    if s.eos is None:
        return -1
    return s.pad if s.pad else s.eos[0]  # transformers: `pad_token_id or eos_token_id[0]`


def _beam(model, s: Settings) -> GenerationOutput:
    B, K, T0, Lmax = s.batch_size, s.num_beams, s.prompt_len, s.max_length
    G = Lmax - T0
    dev = s.decoder_input_ids.device
    n_eos = 0 if s.eos is None else len(s.eos)
    C = max(2, 1 + n_eos) * K
    top_k_mask = torch.arange(C, device=dev) < K  # (C,): only the K best candidates may finish
    lp, es = s.length_penalty, s.early_stopping

    running_seqs = torch.full((B, K, Lmax), _fill_value(s), dtype=torch.int64, device=dev)
    running_seqs[:, :, :T0] = s.decoder_input_ids[:, None, :]
    done_seqs = running_seqs.clone()
    running_scores = torch.zeros((B, K), dtype=torch.float32, device=dev)
    running_scores[:, 1:] = _NEG
    done_scores = torch.full((B, K), _NEG, dtype=torch.float32, device=dev)
    done_flags = torch.zeros((B, K), dtype=torch.bool, device=dev)
    can_improve = torch.ones((B, 1), dtype=torch.bool, device=dev)
    running_bidx = torch.full((B, K, G), -1, dtype=torch.int32, device=dev)
    done_bidx = running_bidx.clone()
    row_offset = (torch.arange(B, device=dev) * K)[:, None]  # (B, 1)

    dec = make_decoder(model, s)
    logits = dec.start(K).repeat_interleave(K, dim=0)  # (B*K, V): every beam holds the prompt
    beam_idx = None
    cur_len = T0
    while True:
        if beam_idx is not None:
            logits = dec.step(running_seqs[:, :, :cur_len].reshape(B * K, cur_len), beam_idx)  # (B*K, V)
        logits, banned = step_logits(logits, s, cur_len)
        # 1. the C best continuations over K x V, sorted descending: (B, C) each
        cand_scores, cand_tokens, cand_beams = _beam_search_step(logits, running_scores, C, banned_tokens=banned)
        cand_seqs = _take(running_seqs, cand_beams)  # (B, C, Lmax)
        cand_seqs[:, :, cur_len] = cand_tokens
        cand_bidx = _take(running_bidx, cand_beams)  # (B, C, G)
        cand_bidx[:, :, cur_len - T0] = (cand_beams + row_offset).to(torch.int32)
        # 2. which candidates finish
        finishes = torch.zeros_like(cand_tokens, dtype=torch.bool) if s.eos_tensor is None else \
            torch.isin(cand_tokens, s.eos_tensor)
        if cur_len + 1 >= Lmax:
            finishes = torch.ones_like(finishes)
        # 3. the K live beams for the next step
        live_scores = cand_scores + finishes.to(torch.float32) * _NEG
        keep = torch.topk(live_scores, K, dim=1).indices  # (B, K)
        running_seqs = _take(cand_seqs, keep)
        running_scores = _take(live_scores, keep)
        running_bidx = _take(cand_bidx, keep)
        # 4. finished hypotheses
        new_done = finishes & top_k_mask[None, :]
        fin = cand_scores / ((cur_len + 1 - T0) ** lp)
        full = torch.all(done_flags, dim=-1, keepdim=True) & (es is True)
        fin += full.to(torch.float32) * _NEG
        fin += (~can_improve).to(torch.float32) * _NEG
        fin += (~new_done) * _NEG
        merged_scores = torch.cat((done_scores, fin), dim=1)  # (B, K + C)
        best = torch.topk(merged_scores, K, dim=1).indices  # (B, K)
        done_seqs = _take(torch.cat((done_seqs, cand_seqs), dim=1), best)
        done_scores = _take(merged_scores, best)
        done_bidx = _take(torch.cat((done_bidx, cand_bidx), dim=1), best)
        done_flags = _take(torch.cat((done_flags, new_done), dim=1), best)
        # next step's cache reorder: row n continues row beam_idx[n]
        beam_idx = running_bidx[:, :, cur_len - T0].reshape(B * K).to(torch.int64)
        cur_len += 1
        # 5. early-stop heuristic and the loop condition
        hyp_len = Lmax - T0 if (es == "never" and lp > 0.0) else cur_len - T0
        best_running = running_scores[:, :1] / (hyp_len ** lp)
        worst_done = torch.where(done_flags, torch.min(done_scores, dim=1, keepdim=True)[0], _NEG)
        can_improve = can_improve & torch.any(best_running > worst_done, dim=-1, keepdim=True)
        go_on = bool(torch.any(can_improve)) and not (es is True and bool(torch.all(done_flags))) \
            and not bool(torch.all(finishes))
        if not go_on:
            break

    R = s.num_return_sequences
    seqs = done_seqs[:, :R].reshape(B * R, Lmax)
    scores = done_scores[:, :R].reshape(B * R)
    bidx = done_bidx[:, :R].reshape(B * R, G)
    gen_len = int((bidx + 1).bool().sum(dim=1).max())
    return GenerationOutput(sequences=seqs[:, :T0 + gen_len], sequences_scores=scores, beam_indices=bidx[:, :gen_len])
