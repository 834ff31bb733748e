"""Helpers shared by the model families (not public)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def example_image(model: nn.Module, batch_size: int, channels: int, size: int,
                  generator: Optional[torch.Generator] = None) -> tuple:
    """((batch_size, channels, size, size),): a random image batch on the model's device and dtype."""
    p = next(model.parameters())
    x = torch.randn(batch_size, channels, size, size, generator=generator)  # CPU generator, then moved
    return (x.to(device=p.device, dtype=p.dtype),)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomize_(model: nn.Module, generator: Optional[torch.Generator] = None) -> nn.Module:
    """Fill every parameter and buffer of ``model`` in place with random values that keep
    activations O(1) (tests and benchmarks compare models on these, not on near-identity inits):
    weights N(0, 1/fan_in), norm scales 1 ± 0.1, biases and BN means ± 0.1, BN variances
    U(0.5, 1.5), layer scales ``gamma`` U(0.2, 1). Drawn on the CPU (``generator``), then copied."""
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            leaf = name.rsplit(".", 1)[-1]
            if not t.is_floating_point():
                t.fill_(3)  # num_batches_tracked
                continue
            r = torch.empty(t.shape, dtype=torch.float32)
            if leaf == "running_var":
                r.uniform_(0.5, 1.5, generator=generator)
            elif leaf == "gamma":
                r.uniform_(0.2, 1.0, generator=generator)
            elif t.dim() >= 2:  # conv / linear weight
                r.normal_(0.0, 1.0 / (t[0].numel() ** 0.5), generator=generator)
            elif leaf == "weight":  # norm scales
                r.normal_(1.0, 0.1, generator=generator)
            else:  # biases, running_mean
                r.normal_(0.0, 0.1, generator=generator)
            t.copy_(r)
    return model
