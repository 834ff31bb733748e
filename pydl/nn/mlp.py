"""``Mlp``: the two-layer feed-forward block of ConvNeXt and Transformers, fc1 -> act -> fc2.

Parameter names ``fc1``/``fc2`` are timm's (``timm.layers.Mlp``), so a ConvNeXt or ViT block's
state_dict loads unchanged. The layers are injected: ``linear_layer(in, out, bias=...)`` and
``act_layer()`` (a module factory), so a fused kernel replaces either without touching the model.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor, nn


class Mlp(nn.Module):
    """(..., in_features) -> (..., out_features): fc2(drop(act(fc1(x)))).

    hidden_features / out_features default to in_features. ``drop`` is dropout after the
    activation and after fc2 (timm's ``drop``); 0 means no dropout modules at all.
    """

    def __init__(self, in_features: int, hidden_features: Optional[int] = None,
                 out_features: Optional[int] = None, act_layer: Callable[[], nn.Module] = nn.GELU,
                 bias: bool = True, drop: float = 0.0,
                 linear_layer: Callable[..., nn.Module] = nn.Linear):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = linear_layer(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.fc2 = linear_layer(hidden_features, out_features, bias=bias)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))
