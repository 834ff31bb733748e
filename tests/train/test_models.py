"""Small conv nets learn digits well above chance; a tiny GPT lowers its validation loss on the
shipped corpus (the model zoo's own models, small configs)."""

from __future__ import annotations

import math

import pytest

from .conftest import read_metrics, run_cli

# Tiny configs, a few hundred steps' worth of samples. ConvNeXt downsamples 32x: 32 x 32 inputs.
CONVS = {
    "convnext_tiny": ["--image-size", "32", "--epochs", "2", "--batch-size", "32", "--steps-per-epoch", "20",
                      "--lr", "4e-3", "--warmup", "0.25", "--model-kw", "depths=1,1,1,1", "dims=8,16,24,32"],
    "resnet18": ["--image-size", "16", "--epochs", "4", "--lr", "1e-2", "--warmup", "0.5",
                 "--model-kw", "layers=1,1,1,1", "widths=16,16,24,32", "stem_width=16"],
}


@pytest.mark.parametrize("model", sorted(CONVS))
def test_small_conv_net_learns_digits(model, tmp_path):
    assert run_cli(["--model", model, "--out", str(tmp_path), *CONVS[model]]) == 0
    m = read_metrics(tmp_path)
    assert m["test_accuracy"] > 0.5, m["test_accuracy"]  # chance is 0.1
    assert m["val_loss"][-1] < m["val_loss"][0]


def test_gpt_lowers_validation_loss_on_the_corpus(tmp_path):
    args = ["--model", "gpt2", "--out", str(tmp_path), "--epochs", "2", "--steps-per-epoch", "12",
            "--block-size", "32", "--batch-size", "16", "--lr", "3e-3", "--warmup", "0.25",
            "--model-kw", "n_embd=32", "n_layer=1", "n_head=2"]
    assert run_cli(args) == 0
    m = read_metrics(tmp_path)
    vocab = 75  # distinct characters of persuasion.txt
    assert m["task"] == "lm" and {"val_loss", "test_loss", "test_perplexity"} <= set(m)
    assert m["val_loss"][1] < m["val_loss"][0] < math.log(vocab) + 0.5
    assert m["test_perplexity"] == pytest.approx(math.exp(m["test_loss"]))
    assert m["test_perplexity"] < vocab
