"""Generation: beam search and greedy search with Hugging Face ``generate``'s exact results, over
transformers models, pydl models with a pre-allocated ``KVCache`` (the ``GenerationModel`` protocol)
and plain ``(input_ids, attention_mask) -> logits`` callables.

    out = pydl.generation.beam_search(model, input_ids, attention_mask, num_beams=4, max_new_tokens=32)
    out.sequences, out.sequences_scores, out.beam_indices

The per-step top-k over K x V goes through ``pydl.ops.beam_search_step`` (one read of the logits).
"""

from ._models import GenerationModel
from ._output import GenerationOutput
from .beam_search import beam_search
from .greedy import greedy_search
from .kv_cache import KVCache

__all__ = ["beam_search", "greedy_search", "KVCache", "GenerationOutput", "GenerationModel"]
