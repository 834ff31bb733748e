"""Argument checks and resolution: what Hugging Face ``generate`` derives from its arguments and the
model's ``generation_config`` (special ids, lengths, the logit processors beam search applies).

Length conventions (as transformers' ``generate``): ``max_length`` counts the whole decoder sequence
(the prompt for a decoder-only model, the decoder start token for an encoder-decoder);
``max_new_tokens`` wins over it and is added to the decoder prompt length (left padding included);
neither given -> the model's ``generation_config.max_length`` if set, else 20 new tokens (for Hugging
Face models capped at ``config.max_position_embeddings``). EOS is banned while the decoder sequence is
shorter than ``min_length`` = prompt length + ``min_new_tokens`` (or the generation config's
``min_length`` when ``min_new_tokens`` is 0).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import List, Optional

import torch
from torch import Tensor

# generation_config fields whose logit processors / stopping criteria this package does not reproduce:
# a Hugging Face model whose config sets one is refused rather than silently decoded differently.
_UNSUPPORTED = (
    ("repetition_penalty", lambda v: v is not None and v != 1.0),
    ("encoder_repetition_penalty", lambda v: v is not None and v != 1.0),
    ("no_repeat_ngram_size", lambda v: v is not None and v > 0),
    ("encoder_no_repeat_ngram_size", lambda v: v is not None and v > 0),
    ("bad_words_ids", lambda v: v is not None),
    ("sequence_bias", lambda v: v is not None),
    ("exponential_decay_length_penalty", lambda v: v is not None),
    ("remove_invalid_values", lambda v: v is True),
    ("renormalize_logits", lambda v: v is True),
    ("guidance_scale", lambda v: v is not None and v != 1),
    ("suppress_tokens", lambda v: v is not None),
    ("begin_suppress_tokens", lambda v: v is not None),
    ("watermarking_config", lambda v: v is not None),
    ("max_time", lambda v: v is not None),
    ("stop_strings", lambda v: v is not None),
)


@dataclasses.dataclass
class Settings:
    """Everything the search loops need, resolved. Shapes: B batch items, T0 decoder prompt length."""

    kind: str                           # "hf_causal" | "hf_seq2seq" | "pydl" | "callable"
    is_encoder_decoder: bool
    decoder_input_ids: Tensor           # (B, T0) int64: the prompt, or the start token (enc-dec)
    attention_mask: Optional[Tensor]    # (B, T0) decoder-only prompt mask / (B, S) encoder mask
    encoder_input_ids: Optional[Tensor]  # (B, S) (enc-dec)
    max_length: int                     # absolute decoder length at which generation stops
    min_length: int                     # EOS banned while cur_len < min_length
    eos: Optional[List[int]]
    eos_tensor: Optional[Tensor]        # (n_eos,) int64
    pad: Optional[int]
    forced_bos: Optional[int]
    forced_eos: Optional[int]
    num_beams: int = 1
    num_return_sequences: int = 1
    length_penalty: float = 1.0
    early_stopping: object = False

    @property
    def batch_size(self) -> int:
        return self.decoder_input_ids.shape[0]

    @property
    def prompt_len(self) -> int:
        return self.decoder_input_ids.shape[1]


def model_kind(model) -> str:
    """"hf_causal" / "hf_seq2seq" for a transformers PreTrainedModel, "pydl" for the KV-cache protocol
    (``init_cache`` + ``forward_step``), "callable" for any other callable; TypeError otherwise."""
    import sys

    tf = sys.modules.get("transformers")  # never imported here: an HF model means it already is
    if tf is not None and isinstance(model, tf.PreTrainedModel):
        return "hf_seq2seq" if getattr(model.config, "is_encoder_decoder", False) else "hf_causal"
    if callable(getattr(model, "init_cache", None)) and callable(getattr(model, "forward_step", None)):
        return "pydl"
    if callable(model):
        return "callable"
    raise TypeError(f"model must be a transformers PreTrainedModel, a model with init_cache/forward_step "
                    f"(pydl.generation.GenerationModel) or a callable (input_ids, attention_mask) -> logits, "
                    f"got {type(model).__name__}")


def _check_int(name: str, v, lo: int, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__} ({v!r})")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")


def _check_ids(name: str, t) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (torch.long), got dtype {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must have shape (batch_size, sequence_length), got shape {tuple(t.shape)}")
    if t.shape[0] < 1 or t.shape[1] < 1:
        raise ValueError(f"{name} must be non-empty (batch_size >= 1, sequence_length >= 1), got shape "
                         f"{tuple(t.shape)}")
    return t.long()


def _ids_list(name: str, v) -> Optional[List[int]]:
    if v is None:
        return None
    if isinstance(v, Tensor):
        v = v.reshape(-1).tolist()
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return [int(v)]
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, numbers.Integral) and not isinstance(x, bool)
                                                  for x in v):
        return [int(x) for x in v]
    raise TypeError(f"{name} must be None, an int or a non-empty list of ints, got {v!r}")


def _gen_attr(cfg, name):
    return None if cfg is None else getattr(cfg, name, None)


def resolve(model, input_ids, attention_mask, *, num_beams=1, max_new_tokens=None, max_length=None,
            min_new_tokens=0, length_penalty=1.0, early_stopping=False, num_return_sequences=1,
            eos_token_id=None, pad_token_id=None, decoder_start_token_id=None) -> Settings:
    """Check every argument (ValueError / TypeError naming it) and resolve them to ``Settings``."""
    kind = model_kind(model)
    _check_int("num_beams", num_beams, 1)
    _check_int("num_return_sequences", num_return_sequences, 1)
    if num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences ({num_return_sequences}) must be <= num_beams ({num_beams})")
    _check_int("max_new_tokens", max_new_tokens, 1, allow_none=True)
    _check_int("max_length", max_length, 1, allow_none=True)
    _check_int("min_new_tokens", min_new_tokens, 0)
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, numbers.Real):
        raise TypeError(f"length_penalty must be a float, got {length_penalty!r}")
    if not (isinstance(early_stopping, bool) or early_stopping == "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    input_ids = _check_ids("input_ids", input_ids)
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor):
            raise TypeError(f"attention_mask must be None or a Tensor, got {type(attention_mask).__name__}")
        if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
            raise TypeError(f"attention_mask must be an integer or bool tensor of 0/1, got dtype {attention_mask.dtype}")
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got "
                             f"{tuple(attention_mask.shape)}")
        attention_mask = attention_mask.to(device=input_ids.device, dtype=torch.long)

    hf = kind.startswith("hf")
    gc = getattr(model, "generation_config", None) if hf else None
    is_ed = kind == "hf_seq2seq" or (kind == "pydl" and bool(getattr(model, "is_encoder_decoder", False)))
    if hf:
        for name, bad in _UNSUPPORTED:
            val = _gen_attr(gc, name)
            if bad(val):
                raise NotImplementedError(f"model.generation_config.{name}={val!r}: this logit processor / "
                                          f"stopping criterion is not implemented by pydl.generation")

    eos = _ids_list("eos_token_id", eos_token_id if eos_token_id is not None else _gen_attr(gc, "eos_token_id"))
    pad = pad_token_id if pad_token_id is not None else _gen_attr(gc, "pad_token_id")
    _check_int("pad_token_id", pad, 0, allow_none=True)
    if pad is None and eos is not None:
        pad = eos[0]  # transformers does the same
    device = input_ids.device
    eos_tensor = None if eos is None else torch.tensor(eos, dtype=torch.long, device=device)

    encoder_ids = None
    if is_ed:
        start = decoder_start_token_id
        if start is None:
            start = _gen_attr(gc, "decoder_start_token_id")
        if start is None:
            start = _gen_attr(gc, "bos_token_id")
        if start is None and kind == "pydl":
            start = getattr(model, "decoder_start_token_id", None)
        if start is None:
            raise ValueError("decoder_start_token_id must be given for an encoder-decoder model (its "
                             "generation_config sets neither decoder_start_token_id nor bos_token_id)")
        _check_int("decoder_start_token_id", start, 0)
        encoder_ids = input_ids
        decoder_ids = torch.full((input_ids.shape[0], 1), int(start), dtype=torch.long, device=device)
    else:
        decoder_ids = input_ids
        if attention_mask is None and kind == "hf_causal" and pad is not None:
            # transformers infers the mask from pad tokens when pad is present and is not an EOS id
            if bool((input_ids == pad).any()) and (eos is None or pad not in eos):
                attention_mask = input_ids.ne(pad).long()

    T0 = decoder_ids.shape[1]
    if max_new_tokens is not None:
        max_len = max_new_tokens + T0
    elif max_length is not None:
        max_len = max_length
    elif _gen_attr(gc, "max_length") is not None:
        max_len = int(gc.max_length)
    else:
        max_len = 20 + T0
        cap = getattr(getattr(model, "config", None), "max_position_embeddings", None) if hf else None
        if cap is not None:
            max_len = min(max_len, int(cap))
    if T0 >= max_len:
        name = "decoder_input_ids" if is_ed else "input_ids"
        raise ValueError(f"max_length ({max_len}) must be greater than the length of {name} ({T0}): "
                         f"increase max_new_tokens / max_length")
    if min_new_tokens:
        min_len = T0 + min_new_tokens
    else:
        mnt = _gen_attr(gc, "min_new_tokens")
        min_len = T0 + mnt if mnt else int(_gen_attr(gc, "min_length") or 0)

    forced_bos = _gen_attr(gc, "forced_bos_token_id")
    forced_eos = _gen_attr(gc, "forced_eos_token_id")
    if isinstance(forced_eos, (list, tuple)):
        forced_eos = list(forced_eos)
    return Settings(kind=kind, is_encoder_decoder=is_ed, decoder_input_ids=decoder_ids,
                    attention_mask=attention_mask, encoder_input_ids=encoder_ids, max_length=int(max_len),
                    min_length=int(min_len), eos=eos, eos_tensor=eos_tensor, pad=None if pad is None else int(pad),
                    forced_bos=forced_bos, forced_eos=forced_eos, num_beams=int(num_beams),
                    num_return_sequences=int(num_return_sequences), length_penalty=float(length_penalty),
                    early_stopping=early_stopping)


def step_logits(logits: Tensor, s: Settings, cur_len: int) -> tuple:
    """Apply the logit processors Hugging Face's beam search / greedy search would apply at this step.

    logits (N, V) float32 raw logits; cur_len = decoder length before this step's token.
    Returns (logits', banned): ``banned`` is the int64 id tensor (or None) that
    ``pydl.ops.beam_search_step`` sets to -inf after its log_softmax (EOS before ``min_length``); the
    forced-token processors (not expressible by banned ids) are applied here in torch: the row becomes
    -inf except 0 at the forced id (beam search: HF applies them to the log-probs; a log_softmax of that
    row is the row itself, so the op's own normalization leaves it exact).
    Greedy search: HF applies the same processors to the raw logits; the top-1 of their log_softmax is
    the same token.
    """
    banned = s.eos_tensor if (s.eos_tensor is not None and cur_len < s.min_length) else None
    forced = None
    if s.forced_bos is not None and cur_len == 1:
        forced = s.forced_bos
    if s.forced_eos is not None and cur_len == s.max_length - 1:
        forced = s.forced_eos  # applied after forced_bos in HF's processor order
    if forced is not None:
        out = torch.full_like(logits, float("-inf"))
        out[:, forced] = 0.0
        return out, None  # the forced row overrides the min-length mask (HF's processor order)
    return logits, banned
