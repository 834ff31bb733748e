"""``python -m pydl.train``: the digits MLP target, the output layout, clear errors for bad flags."""

from __future__ import annotations

import time

import pytest
import torch

from pydl.train.__main__ import config_from_args, parse_model_kw

from .conftest import read_metrics, run_cli


def test_mlp_digits_reaches_90_percent_in_under_a_minute(tmp_path):
    t0 = time.perf_counter()
    assert run_cli(["--model", "mlp", "--data", "digits", "--out", str(tmp_path)]) == 0
    wall = time.perf_counter() - t0
    m = read_metrics(tmp_path)
    assert m["test_accuracy"] >= 0.90, m["test_accuracy"]
    assert wall < 60, wall
    # the layout the issue asks for
    assert m["epochs"] == 30 and len(m["train_loss"]) == len(m["val_accuracy"]) == 30
    assert m["best_epoch"] == 1 + max(range(30), key=lambda i: (m["val_accuracy"][i], -m["val_loss"][i]))
    assert m["best_val_accuracy"] == max(m["val_accuracy"])
    for f in ("metrics.json", "checkpoint.pt", "best.pt", "curves.png"):
        assert (tmp_path / f).is_file(), f
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "epoch"} <= set(ckpt)
    assert ckpt["epoch"] == 30 and len(ckpt["rng"]) == 1
    # the warm-up + cosine schedule ends at the floor
    assert m["lr"][-1] == pytest.approx(2e-3 * 0.01, rel=1e-6)


def test_per_model_defaults_and_overrides():
    cfg = config_from_args(["--model", "convnext_tiny", "--out", "x"])
    assert (cfg.data, cfg.augment, cfg.drop_path, cfg.label_smoothing) == ("digits", ["crop"], 0.1, 0.1)
    cfg = config_from_args(["--model", "resnet18", "--out", "x", "--augment", "crop,flip", "--lr", "1e-3",
                            "--amp", "--model-kw", "layers=1,1,1,1", "stem_width=8"])
    assert cfg.augment == ["crop", "flip"] and cfg.lr == 1e-3 and cfg.amp == "auto" and cfg.drop_path == 0
    assert cfg.model_kw == {"layers": [1, 1, 1, 1], "stem_width": 8}
    cfg = config_from_args(["--model", "gpt2", "--out", "x"])
    assert cfg.data == "chars" and cfg.label_smoothing == 0


def test_model_kw_parsing():
    assert parse_model_kw(["depths=1,1,1,1", "dims=16,32", "drop_rate=0.1", "act=gelu", "flag=true"]) == {
        "depths": [1, 1, 1, 1], "dims": [16, 32], "drop_rate": 0.1, "act": "gelu", "flag": True}
    assert parse_model_kw(['{"n_layer": 2, "n_head": 4}', "n_embd=64"]) == {"n_layer": 2, "n_head": 4, "n_embd": 64}
    assert parse_model_kw(["hidden=[128, 64]", "one=5,"]) == {"hidden": [128, 64], "one": [5]}
    for bad in (["n_layer"], ["=3"], ["{not json"], ["[1, 2]x=3"]):
        with pytest.raises(ValueError, match="--model-kw"):
            parse_model_kw(bad)


@pytest.mark.parametrize("args, message", [
    (["--model", "bert"], "not trainable"),
    (["--model", "mlp", "--epochs", "0"], "--epochs must be > 0"),
    (["--model", "mlp", "--label-smoothing", "1.5"], r"--label-smoothing must be in \[0, 1\)"),
    (["--model", "mlp", "--lr", "-1"], "--lr must be > 0"),
    (["--model", "mlp", "--augment", "blur"], "unknown augmentation"),
    (["--model", "mlp", "--data", "imagenet"], "invalid choice"),
    (["--model", "mlp", "--model-kw", "hidden"], "KEY=VALUE"),
    (["--model", "mlp", "--amp", "fp8"], "invalid choice"),
    (["--model", "mlp", "--batch-size", "nine"], "invalid int"),
])
def test_bad_flags_are_refused_by_the_parser(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli([*args, "--out", "unused"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message.replace("\\", "") in err, err


@pytest.mark.parametrize("args, message", [
    (["--model", "mlp", "--data", "chars"], "language model"),
    (["--model", "gpt2", "--data", "digits"], "needs --data chars"),
    (["--model", "mlp", "--augment", "crop"], "MLP takes flat features"),
    (["--model", "mlp", "--model-kw", "no_such_kw=1"], "does not take these keywords"),
    (["--model", "mlp", "--drop-path", "0.1"], "does not take these keywords"),
    (["--model", "mlp", "--batch-size", "4096"], "larger than the training split"),
    (["--model", "mlp", "--resume", "/nonexistent/ckpt.pt"], "no checkpoint file"),
    (["--model", "mlp", "--device", "tpu"], "--device 'tpu'"),
])
def test_bad_settings_give_a_clear_error(args, message, tmp_path, capsys):
    assert run_cli([*args, "--out", str(tmp_path), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m pydl.train: error:") and message in err, err
