"""The offline data: a fixed stratified digits split, the shipped corpus, batched augmentation."""

from __future__ import annotations

import hashlib

import pytest
import torch

from pydl.train import data


def test_digits_split_is_fixed_disjoint_and_stratified():
    a = data.load_digits(flatten=True, split_seed=0)
    b = data.load_digits(flatten=True, split_seed=0)
    assert a.sizes() == {"train": 1257, "val": 180, "test": 360}
    assert torch.equal(a.test.x, b.test.x) and torch.equal(a.train.y, b.train.y)
    rows = {tuple(r.tolist()) for s in (a.train, a.val) for r in s.x}
    assert not any(tuple(r.tolist()) in rows for r in a.test.x[:50])  # no test image in train/val
    for split in (a.val, a.test):
        counts = torch.bincount(split.y, minlength=10)
        assert counts.min() >= 0.8 * counts.float().mean()
    c = data.load_digits(flatten=True, split_seed=1)
    assert not torch.equal(a.test.y, c.test.y)
    conv = data.load_digits(flatten=False, image_size=32)
    assert conv.train.x.shape == (1257, 1, 32, 32) and conv.input_shape == (1, 32, 32)
    assert abs(float(conv.train.x.mean())) < 1e-4  # standardised with the train statistics


def test_corpus_is_the_documented_text():
    raw = data.CORPUS_FILE.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == "726513a6c18bb678427bcbcf7c72d0d20816a67c25b0471b26ddcabf3ebac140"
    assert (data.DATA_DIR / "README.md").read_text().count("public domain") >= 1
    b = data.load_chars(block_size=64, seed=0)
    assert b.vocab_size == len(b.meta["vocab"]) == 75
    x, y = b.train.batch(torch.tensor([0, 5]))
    assert x.shape == y.shape == (2, 64) and torch.equal(x[:, 1:], y[:, :-1])
    n = len(b.train)
    b.train.set_epoch(3)
    assert len(b.train) == n and 0 <= b.train.offset < 64
    b.train.batch(torch.tensor([n - 1]))  # the last window fits at every offset
    assert sum(b.sizes().values()) * 64 <= b.meta["characters"]


def test_batched_augmentation_moves_each_image_independently():
    torch.manual_seed(0)
    x = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(64, 3, 1, 1)
    out = data.random_crop(x, 1)
    assert out.shape == x.shape
    assert len({tuple(o[0].flatten().tolist()) for o in out}) > 4  # different shifts per sample
    assert torch.equal(out[:, 0], out[:, 1])  # channels move together
    f = data.random_hflip(x)
    flipped = (f == x.flip(-1)).flatten(1).all(1)
    assert 10 < int(flipped.sum()) < 54
    with pytest.raises(ValueError, match="unknown augmentation"):
        data.make_augment(["rotate"], 32)


def test_mixup_uses_the_ecosystem_implementation():
    try:
        mix, smoothed = data.make_mixup(0.8, 1.0, 0.1, 10)
    except ImportError as exc:
        pytest.skip(f"neither timm nor torchvision importable: {exc}")
    x, y = torch.randn(8, 1, 16, 16), torch.arange(8) % 10
    xm, ym = mix(x, y)
    assert xm.shape == x.shape and ym.shape == (8, 10)
    assert torch.allclose(ym.sum(1), torch.ones(8))
