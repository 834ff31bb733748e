"""pydl.generation.KVCache: in-place append, lengths, reorder without reallocation, beam expansion,
row views, and cross-attention served per batch item (not copied per beam)."""

from __future__ import annotations

import pytest
import torch

from pydl.generation import KVCache
from pydl.generation.kv_cache import repeat_rows
from pydl.ops.decode_attention import decode_attention_ref


def _cache(N=6, K=3, L=2, H=2, Lmax=8, D=4):
    return KVCache(L, N, H, Lmax, D, num_beams=K)


def test_append_advance_lengths():
    torch.manual_seed(0)
    c = _cache()
    k, v = torch.randn(6, 2, 3, 4), torch.randn(6, 2, 3, 4)
    kb, vb = c.append(0, k, v)
    assert kb is c.keys[0] and vb is c.values[0]
    c.advance(3)
    assert c.lengths.dtype == torch.int32 and c.lengths.tolist() == [3] * 6 and c.filled == 3
    torch.testing.assert_close(c.keys[0][:, :, :3], k)
    k1 = torch.randn(6, 2, 1, 4)
    c.append(0, k1, k1)
    torch.testing.assert_close(c.keys[0][:, :, 3:4], k1)
    # per-row lengths: each row writes at its own position
    c.set_lengths(torch.tensor([1, 2, 3, 1, 2, 3], dtype=torch.int32))
    k2 = torch.randn(6, 2, 1, 4)
    c.append(1, k2, k2)
    for n, p in enumerate([1, 2, 3, 1, 2, 3]):
        torch.testing.assert_close(c.keys[1][n, :, p], k2[n, :, 0])


def test_reorder_gathers_in_place_without_allocation():
    torch.manual_seed(1)
    c = _cache()
    k = torch.randn(6, 2, 5, 4)
    for i in range(2):
        c.append(i, k * (i + 1), -k)
    c.advance(5)
    c.set_lengths(torch.tensor([5, 5, 5, 4, 4, 4], dtype=torch.int32))
    ptrs = {t.data_ptr() for t in c.keys + c.values + c._scratch_k + c._scratch_v}
    idx = torch.tensor([2, 2, 0, 4, 3, 3])
    for _ in range(3):  # ping-pong between the two buffers
        before = [t[:, :, :5].clone() for t in c.keys]
        lens = c.lengths.clone()
        c.reorder(idx)
        for i in range(2):
            torch.testing.assert_close(c.keys[i][:, :, :5], before[i][idx])
        assert torch.equal(c.lengths, lens[idx])
        assert {t.data_ptr() for t in c.keys + c.values + c._scratch_k + c._scratch_v} == ptrs
    with pytest.raises(ValueError, match="beam_idx"):
        c.reorder(torch.tensor([0, 1]))


def test_rows_view_and_expand_beams():
    torch.manual_seed(2)
    c = _cache()
    view = c.rows(2)  # prefill the B = 2 batch items
    k = torch.randn(2, 2, 3, 4)
    for i in range(2):
        view.append(i, k, k + 1)
    view.advance(3)
    view.set_lengths(torch.tensor([3, 2], dtype=torch.int32))
    assert c.lengths[:2].tolist() == [3, 2] and c.filled == 3
    c.expand_beams_(3)
    assert c.lengths.tolist() == [3, 3, 3, 2, 2, 2]
    for n in range(6):
        torch.testing.assert_close(c.keys[1][n, :, :3], k[n // 3])
        torch.testing.assert_close(c.values[0][n, :, :3], k[n // 3] + 1)


def test_overflow_and_bad_shapes():
    c = _cache(Lmax=4)
    with pytest.raises(ValueError, match="max_length"):
        c.append(0, torch.randn(6, 2, 5, 4), torch.randn(6, 2, 5, 4))
    with pytest.raises(ValueError, match="k must have shape"):
        c.append(0, torch.randn(5, 2, 1, 4), torch.randn(5, 2, 1, 4))
    with pytest.raises(ValueError, match="num_beams"):
        KVCache(1, 5, 2, 4, 4, num_beams=2)
    with pytest.raises(ValueError, match="max_length"):
        KVCache(1, 4, 2, 0, 4)
    with pytest.raises(RuntimeError, match="reorderable"):
        KVCache(1, 2, 1, 4, 4, reorderable=False).reorder(torch.tensor([1, 0]))


@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2)])
def test_cross_attention_serves_beams_from_one_copy(H, Hkv):
    torch.manual_seed(3)
    B, K, S, D = 2, 3, 7, 8
    c = KVCache(1, B * K, H, 4, D, num_beams=K)
    k, v = torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    lengths = torch.tensor([7, 5], dtype=torch.int32)
    c.set_cross(0, k, v, lengths)
    assert c.cross_keys[0] is k  # stored per batch item, not per beam
    q = torch.randn(B * K, H, 1, D)
    out = c.cross_attention(0, q)
    ref = decode_attention_ref(q, k.repeat_interleave(K, 0), v.repeat_interleave(K, 0),
                               lengths.repeat_interleave(K))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_repeat_rows_is_a_view_for_one_item():
    t = torch.randn(1, 3, 4)
    r = repeat_rows(t, 5)
    assert r.shape == (5, 3, 4) and r.data_ptr() == t.data_ptr() and r.stride(0) == 0
    t2 = torch.randn(2, 3)
    assert torch.equal(repeat_rows(t2, 2), t2.repeat_interleave(2, 0))
