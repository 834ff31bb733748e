"""The training recipe, assembled from torch's own pieces (nothing here re-implements them):

- ``torch.optim.AdamW``, weight decay on weight matrices/kernels only (not on biases, norms or
  embeddings' 1-d parameters);
- warm-up then cosine decay, stepped per optimizer step: ``LinearLR`` then ``CosineAnnealingLR``
  chained by ``SequentialLR``;
- ``nn.CrossEntropyLoss(label_smoothing=...)`` (soft targets when mixup/cutmix is on);
- ``torch.amp.autocast`` (bf16 or fp16) with ``torch.amp.GradScaler`` (active for fp16 only);
- gradient clipping by global norm (``clip_grad_norm_``);
- stochastic depth lives in the models (``drop_path_rate``).

Per-model defaults (``DEFAULTS``) are what ``python -m pydl.train`` uses for a flag left unset.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

# Family of each trainable model name (by prefix), and what the trainer feeds it.
FAMILIES = {"mlp": "mlp", "resnet": "conv", "convnext": "conv", "gpt2": "lm"}

# Flag defaults per family. warmup is in epochs (fractions allowed).
DEFAULTS = {
    "mlp": dict(data="digits", epochs=30, batch_size=64, lr=2e-3, weight_decay=0.05,
                label_smoothing=0.1, drop_path=0.0, warmup=1.0, augment="none",
                model_kw={"hidden": [256, 256]}),
    "conv": dict(data="digits", epochs=12, batch_size=64, lr=2e-3, weight_decay=0.05,
                 label_smoothing=0.1, drop_path=0.1, warmup=1.0, augment="crop", model_kw={}),
    "lm": dict(data="chars", epochs=2, batch_size=32, lr=1e-3, weight_decay=0.1,
               label_smoothing=0.0, drop_path=0.0, warmup=0.1, augment="none",
               model_kw={"n_embd": 128, "n_layer": 4, "n_head": 4}),
}


def family_of(model: str) -> str:
    for prefix, fam in FAMILIES.items():
        if model == prefix or model.startswith(prefix):
            return fam
    raise ValueError(
        f"--model {model!r} is not trainable by pydl.train: it trains mlp, resnet*, convnext* "
        "(image classifiers) and gpt2 (character-level language model)")


def defaults_for(model: str) -> dict:
    d = dict(DEFAULTS[family_of(model)])
    if model.startswith("resnet"):
        d["drop_path"] = 0.0  # stochastic depth is the ConvNeXt recipe's; opt in with --drop-path
    return d


def model_kwargs(model: str, bundle, *, drop_path: float, block_size: int, user_kw: dict,
                 drop_path_set: bool) -> dict:
    """Constructor keywords for ``pydl.models.create(model, **kw)``: what the data dictates
    (input size, classes, vocabulary) + the family defaults, overridden by ``--model-kw``."""
    fam = family_of(model)
    kw = dict(DEFAULTS[fam]["model_kw"])
    if fam == "mlp":
        kw.update(in_features=bundle.input_shape[0], out_features=bundle.num_classes)
    elif fam == "conv":
        kw.update(num_classes=bundle.num_classes, in_chans=bundle.input_shape[0])
    else:
        kw.update(vocab_size=bundle.vocab_size, n_positions=block_size)
    if drop_path > 0 or drop_path_set:
        kw["drop_path_rate"] = drop_path
    kw.update(user_kw)
    return kw


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_optimizer(model: nn.Module, *, lr: float, weight_decay: float,
                   betas=(0.9, 0.999)) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)


def make_scheduler(optimizer, *, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.01):
    """Linear warm-up from 1 % of the peak lr, then cosine decay to ``min_lr_ratio`` x peak."""
    base = optimizer.param_groups[0]["lr"]
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, total_steps - warmup_steps), eta_min=base * min_lr_ratio)
    if warmup_steps <= 0:
        return cosine
    warm = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, end_factor=1.0,
                                             total_iters=warmup_steps)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, cosine], milestones=[warmup_steps])


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """``--amp``: off | bf16 | fp16 | auto (bf16 where supported, else fp16 on CUDA)."""
    if amp == "off":
        return None
    if amp == "auto":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.amp.autocast(device_type=device.type, dtype=dtype)


def make_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    # Loss scaling is needed for fp16 only; a disabled scaler still has a state_dict to save.
    return torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)


def make_loss(label_smoothing: float) -> nn.Module:
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
