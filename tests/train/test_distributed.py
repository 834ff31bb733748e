"""Data parallelism: the ranks' batches together are the single-process global batches, and a
real 2-process ``torchrun`` run on gloo matches the single-process run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pydl.train import distributed as dist_mod

from .conftest import read_metrics, run_cli

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--model", "mlp", "--data", "digits", "--epochs", "3", "--model-kw", "hidden=64",
        "--batch-size", "64"]


@pytest.mark.parametrize("n, world", [(1257, 2), (1279, 2), (100, 4), (64, 1)])
def test_rank_batches_partition_the_global_batches(n, world):
    one = dist_mod.train_batches(n, 32, dist_mod.DistInfo(), seed=3, epoch=5)
    ranks = [dist_mod.train_batches(n, 32, dist_mod.DistInfo(rank=r, world_size=world), seed=3, epoch=5)
             for r in range(world)]
    assert all(len(r) == len(one) == n // 32 for r in ranks)
    for k, batch in enumerate(one):
        assert sorted(torch.cat([r[k] for r in ranks]).tolist()) == sorted(batch.tolist())
    # evaluation shards cover the split exactly once
    shards = [torch.cat(dist_mod.eval_batches(n, 7, dist_mod.DistInfo(rank=r, world_size=world)))
              for r in range(world)]
    assert sorted(torch.cat(shards).tolist()) == list(range(n))


def test_torchrun_two_processes_on_gloo_match_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_cli([*ARGS, "--out", str(one)]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "pydl.train", *ARGS, "--out", str(two), "--device", "cpu", "--progress", "off"]
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = read_metrics(one), read_metrics(two)
    assert b["world_size"] == 2 and b["dist_backend"] == "gloo" and a["world_size"] == 1
    # same global batches and the same mean gradient: equal up to float summation order
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    assert abs(b["test_accuracy"] - a["test_accuracy"]) <= 1 / 360 + 1e-9
    assert r.stdout.count("test accuracy") == 1  # rank 0 alone reports
