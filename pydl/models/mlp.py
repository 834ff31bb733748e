"""The ReLU multilayer perceptron, with the two classic initialisations.

Why the variances (biases are 0, inputs to a layer have second moment ``q = E[x²]``):
a unit of ``y = W x`` sums ``fan_in`` independent products, so ``Var(y) = fan_in · Var(W) · q``.

- **He / Kaiming** (He et al., 2015), for ReLU: if the pre-activation ``y`` of the previous layer is
  symmetric with variance ``v``, ReLU keeps half of it: ``q = E[relu(y)²] = v / 2``. So
  ``Var(y') = fan_in · Var(W) · v / 2``, and the variance is preserved layer after layer iff
  ``Var(W) = 2 / fan_in`` (normal, std ``sqrt(2 / fan_in)``) — the "gain 2" that makes deep ReLU
  nets trainable from scratch.
- **Xavier / Glorot** (Glorot & Bengio, 2010), for a linear (or tanh-near-0) unit: preserving the
  forward variance wants ``Var(W) = 1 / fan_in``, preserving the backward (gradient) variance
  ``1 / fan_out``; the compromise ``Var(W) = 2 / (fan_in + fan_out)`` (normal). Under ReLU it loses
  the factor 1/2 per layer: activations shrink by ~2× per square layer.

``tests/models/test_mlp.py`` checks both statements on a deep net.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

INITS = ("kaiming", "xavier")


def init_linear(layer: nn.Linear, init: str = "kaiming", generator: Optional[torch.Generator] = None) -> None:
    """He (std sqrt(2/fan_in)) or Xavier (std sqrt(2/(fan_in+fan_out))) normal weights, zero bias."""
    fan_out, fan_in = layer.weight.shape
    if init == "kaiming":
        std = math.sqrt(2.0 / fan_in)
    elif init == "xavier":
        std = math.sqrt(2.0 / (fan_in + fan_out))
    else:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    with torch.no_grad():
        layer.weight.normal_(0.0, std, generator=generator)
        if layer.bias is not None:
            layer.bias.zero_()


class MLP(nn.Sequential):
    """Linear → ReLU → … → Linear: (..., in_features) -> (..., out_features).

    hidden: the width of each hidden layer (an int: one hidden layer). An input (N, d1, d2, ...)
    whose trailing dims do not end in in_features but multiply to it (an image) is flattened
    first. Submodules are numbered like ``nn.Sequential`` (``0`` Linear, ``1`` ReLU, ``2`` Linear,
    …). ``linear_layer`` / ``act_layer`` are factories (nn.Linear's constructor / no arguments).
    """

    def __init__(self, in_features: int, hidden: Union[int, Sequence[int]], out_features: int,
                 init: str = "kaiming", bias: bool = True,
                 linear_layer: Callable[..., nn.Module] = nn.Linear,
                 act_layer: Callable[[], nn.Module] = nn.ReLU,
                 generator: Optional[torch.Generator] = None):
        if init not in INITS:
            raise ValueError(f"MLP: init must be one of {INITS}, got {init!r}")
        widths = [hidden] if isinstance(hidden, int) else list(hidden)
        if any(not isinstance(w, int) or w < 1 for w in widths) or in_features < 1 or out_features < 1:
            raise ValueError(f"MLP: widths must be positive ints, got in={in_features} hidden={hidden!r} "
                             f"out={out_features}")
        dims = [in_features, *widths, out_features]
        layers = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(linear_layer(a, b, bias=bias))
            if i < len(dims) - 2:
                layers.append(act_layer())
        super().__init__(*layers)
        self.in_features, self.out_features, self.init = in_features, out_features, init
        for m in self:
            if isinstance(m, nn.Linear):
                init_linear(m, init, generator)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() > 2 and x.shape[-1] != self.in_features and math.prod(x.shape[1:]) == self.in_features:
            x = x.flatten(1)  # (N, d1, d2, ...) -> (N, in_features)
        return super().forward(x)

    def example_inputs(self, batch_size: int = 2, *, generator: Optional[torch.Generator] = None) -> tuple:
        """Forward arguments of a small random batch: ((batch_size, in_features),)."""
        p = next(self.parameters())
        return (torch.randn(batch_size, self.in_features, generator=generator).to(p.device, p.dtype),)


def mlp(in_features: int, hidden: Union[int, Sequence[int]], out_features: int, init: str = "kaiming",
        **kwargs) -> MLP:
    """A ReLU MLP with He ("kaiming") or Xavier initialisation; see ``MLP``."""
    return MLP(in_features, hidden, out_features, init=init, **kwargs)
