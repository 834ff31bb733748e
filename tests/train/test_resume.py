"""``--resume`` from a mid-run checkpoint ends with exactly the metrics of an uninterrupted run
(data order, augmentation and stochastic depth RNG, optimizer, schedule all restored)."""

from __future__ import annotations

import torch

from .conftest import read_metrics, run_cli

ARGS = ["--model", "convnext_tiny", "--epochs", "3", "--steps-per-epoch", "4", "--image-size", "32",
        "--augment", "crop,flip", "--drop-path", "0.2", "--model-kw", "depths=1,1,1,1", "dims=8,16,24,32"]
KEYS = ("train_loss", "val_loss", "val_accuracy", "lr", "best_epoch", "test_accuracy", "test_loss")


def test_resume_matches_an_uninterrupted_run(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_cli([*ARGS, "--out", str(full)]) == 0
    assert run_cli([*ARGS, "--out", str(part), "--stop-after", "1"]) == 0
    stopped = read_metrics(part)
    assert stopped["epochs"] == 1 and stopped["stopped_after_epoch"] == 1 and "test_accuracy" not in stopped
    assert run_cli([*ARGS, "--out", str(part), "--resume", str(part / "checkpoint.pt")]) == 0
    a, b = read_metrics(full), read_metrics(part)
    for k in KEYS:
        assert a[k] == b[k], (k, a[k], b[k])  # bitwise: same floats
    wa = torch.load(full / "checkpoint.pt", weights_only=True)["model"]
    wb = torch.load(part / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_refuses_different_settings(tmp_path, capsys):
    assert run_cli([*ARGS, "--out", str(tmp_path), "--stop-after", "1"]) == 0
    assert run_cli([*ARGS, "--out", str(tmp_path), "--resume", str(tmp_path), "--lr", "1e-2"]) == 2
    assert "settings differ from the checkpoint's (lr:" in capsys.readouterr().err
