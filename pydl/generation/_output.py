"""The result of ``beam_search`` / ``greedy_search``: the fields of Hugging Face's
``GenerateBeam*Output`` / ``Generate*Output`` that pydl reproduces."""

from __future__ import annotations

import dataclasses
from typing import Optional

from torch import Tensor


@dataclasses.dataclass
class GenerationOutput:
    """sequences (B*num_return_sequences, T) int64: prompt included (decoder-only) or from the decoder
    start token (encoder-decoder), padded with the pad id (see ``beam_search``);
    sequences_scores (B*num_return_sequences,) float32: length-penalised sum of log-probs of each
    returned hypothesis (None for greedy search, as in transformers);
    beam_indices (B*num_return_sequences, T - T0) int32: for each generated token, the row
    (b*K + beam) it was taken from, -1 past a hypothesis' end (None for greedy search)."""

    sequences: Tensor
    sequences_scores: Optional[Tensor] = None
    beam_indices: Optional[Tensor] = None

    def __getitem__(self, key):  # output["sequences"], like transformers' ModelOutput
        return getattr(self, key)
