"""pydl.models.mlp: structure, the He / Xavier initialisations and what they do to a deep ReLU net."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pydl.models.mlp import MLP, init_linear, mlp


def test_structure_and_shapes():
    m = mlp(64, [32, 16], 10)
    kinds = [type(x) for x in m]
    assert kinds == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert [(x.in_features, x.out_features) for x in m if isinstance(x, nn.Linear)] == [(64, 32), (32, 16), (16, 10)]
    assert mlp(5, 7, 3)(torch.randn(4, 5)).shape == (4, 3)          # an int hidden: one hidden layer
    assert mlp(64, 8, 3)(torch.randn(4, 8, 8)).shape == (4, 3)       # an 8×8 image is flattened
    assert mlp(6, 8, 3)(torch.randn(2, 5, 6)).shape == (2, 5, 3)     # (..., in_features) kept
    assert set(m.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}


def test_bad_arguments():
    with pytest.raises(ValueError, match="init"):
        mlp(4, 4, 4, init="uniform")
    with pytest.raises(ValueError, match="widths"):
        mlp(4, [4, 0], 4)


@pytest.mark.parametrize("init,std", [("kaiming", lambda fi, fo: math.sqrt(2 / fi)),
                                      ("xavier", lambda fi, fo: math.sqrt(2 / (fi + fo)))])
def test_weight_statistics(init, std):
    layer = nn.Linear(400, 300)
    init_linear(layer, init, torch.Generator().manual_seed(0))
    w = layer.weight
    assert torch.all(layer.bias == 0)
    assert abs(w.mean().item()) < 3 * std(400, 300) / math.sqrt(w.numel())
    assert w.std().item() == pytest.approx(std(400, 300), rel=0.01)


def _second_moments(model: MLP, x: torch.Tensor) -> list:
    """E[y²] of every Linear's output (the pre-activations) on the batch x."""
    out = []
    with torch.no_grad():
        for layer in model:
            x = layer(x)
            if isinstance(layer, nn.Linear):
                out.append(x.square().mean().item())
    return out


def _per_layer_gain(init: str, seeds=range(4), width: int = 256, depth: int = 20) -> float:
    """The geometric-mean factor by which E[y²] changes per layer, averaged over nets (seeds).

    One net's E[y_l²] performs a random walk in log (its weights are shared by the whole batch;
    ~0.14 per layer at width 256), so the test looks at the mean per-layer log gain, whose
    expectation is log 1 = 0 under He init and log 1/2 under Xavier on ReLU."""
    x = torch.randn(256, width, generator=torch.Generator().manual_seed(0))
    logs = []
    for seed in seeds:
        q = _second_moments(MLP(width, [width] * (depth - 1), width, init,
                                generator=torch.Generator().manual_seed(seed)), x)
        logs.append(math.log(q[-1] / q[0]) / (depth - 1))
    return math.exp(sum(logs) / len(logs))


def test_kaiming_preserves_the_activation_scale_through_depth():
    """He init on ReLU: E[y_l²] is the same at every depth (per-layer gain 1 ± 0.06); Xavier on
    the same nets halves it per layer (the factor 1/2 ReLU takes)."""
    x = torch.randn(1024, 512, generator=torch.Generator().manual_seed(0))
    first = _second_moments(MLP(512, [512], 512, "kaiming", generator=torch.Generator().manual_seed(1)), x)
    assert first[0] == pytest.approx(2.0, rel=0.1)  # fan_in·Var(W)·E[x²] = 512·(2/512)·1
    assert _per_layer_gain("kaiming") == pytest.approx(1.0, abs=0.06)
    assert _per_layer_gain("xavier") == pytest.approx(0.5, abs=0.05)


def test_gradients_flow_with_kaiming():
    """The backward pass keeps its scale too: hidden weight-gradient norms of a 20-layer He net
    stay within 5× of each other. Under Xavier the forward signal halves per layer, so the output,
    the loss and every gradient end up ~2^-20 as large."""
    def norms(init):
        m = MLP(256, [256] * 19, 256, init, generator=torch.Generator().manual_seed(2))
        x = torch.randn(512, 256, generator=torch.Generator().manual_seed(3))
        m(x).square().mean().backward()
        return [layer.weight.grad.norm().item() for layer in m if isinstance(layer, nn.Linear)][1:-1]

    he, xa = norms("kaiming"), norms("xavier")
    assert max(he) / min(he) < 5
    assert max(xa) < 1e-4 * min(he)
