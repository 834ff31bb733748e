"""``python -m pydl.train``: the course's training recipe on offline data, one process or torchrun.

    python -m pydl.train --model mlp --data digits --out runs/mlp
    torchrun --nproc-per-node 2 -m pydl.train --model mlp --data digits --out runs/mlp-ddp

or from Python::

    from pydl.train import TrainConfig, train
    metrics = train(TrainConfig(model="mlp", out="runs/mlp", epochs=30))

Modules: ``data`` (digits, chars corpus, synthetic; augmentation), ``recipe`` (AdamW, warm-up +
cosine, label smoothing, AMP, clipping; per-model defaults), ``loop`` (epochs, validation, best
checkpoint, test once, resume), ``distributed`` (torchrun/DDP), ``report`` (metrics.json, curves).
"""

from __future__ import annotations

__all__ = ["TrainConfig", "train", "main"]


def __getattr__(name):  # lazy: importing pydl.train costs nothing until it is used
    if name in ("TrainConfig", "train"):
        from . import loop

        return getattr(loop, name)
    if name == "main":
        from .__main__ import main

        return main
    raise AttributeError(f"module 'pydl.train' has no attribute {name!r}")
