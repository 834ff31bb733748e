"""pydl.models' registry: every registered name builds (small config), runs forward and backward
on its own example inputs; names, patterns, errors, runtime registration."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pydl.models as models


def _floats(out) -> list:
    """The floating tensors of a model output (tensor, tuple/list, dict or a ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _floats(o)]
    return []


@pytest.mark.parametrize("name", models.list())
def test_every_registered_model_runs_forward_and_backward(name):
    torch.manual_seed(0)
    model = models.create(name, **models.small_config(name))
    assert isinstance(model, nn.Module)
    assert hasattr(model, "example_inputs"), f"{name}: a registered model defines example_inputs()"
    inputs = model.example_inputs(2, generator=torch.Generator().manual_seed(0))
    outs = _floats(model(*inputs))
    assert outs, f"{name}: the forward returned no floating tensor"
    for o in outs:
        assert o.shape[0] == 2 and torch.isfinite(o).all(), name
    sum(o.float().square().mean() for o in outs).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads, f"{name}: no parameter received a gradient"
    assert all(torch.isfinite(g).all() for g in grads), name
    assert any(g.abs().max() > 0 for g in grads), name


def test_names_and_patterns():
    names = models.list()
    assert names == sorted(names) and models.list is models.list_models
    assert {"mlp", "resnet18", "resnet34", "resnet50", "convnext_tiny", "convnext_small",
            "convnext_base"} <= set(names)
    assert models.list("resnet*") == ["resnet18", "resnet34", "resnet50"]
    assert models.list("no_such*") == []


def test_unknown_name_and_pretrained_are_refused():
    with pytest.raises(ValueError, match="unknown model name 'resnet5'.*resnet50"):
        models.create("resnet5")
    with pytest.raises(ValueError, match="pretrained"):
        models.create("resnet18", pretrained=True)
    with pytest.raises(TypeError):  # the family's own keyword check
        models.create("resnet18", no_such_kwarg=1)


def test_register_at_runtime():
    @models.register("tiny_linear_test", small={"n": 3})
    def tiny_linear(n: int = 5) -> nn.Module:
        return nn.Linear(n, 2)

    try:
        assert "tiny_linear_test" in models.list()
        assert models.create("tiny_linear_test").in_features == 5
        assert models.create("tiny_linear_test", **models.small_config("tiny_linear_test")).in_features == 3
    finally:
        models._RUNTIME.pop("tiny_linear_test")
    assert "tiny_linear_test" not in models.list()
    with pytest.raises(ValueError):
        models.register("")


def test_create_passes_family_keywords():
    m = models.create("resnet18", num_classes=7, in_chans=1)
    assert m.fc.out_features == 7 and m.conv1.in_channels == 1
    assert models.create("mlp", in_features=4, hidden=3, out_features=2)(torch.randn(5, 4)).shape == (5, 2)
