"""pydl.patch / pydl.unpatch on plain torch models: what is replaced, what is skipped and why, same
outputs and gradients, parameters shared, unpatch exact, the argument checks, and the torch modes
(bf16, deepcopy, torch.compile(fullgraph=True))."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pydl
import pydl.nn
from pydl.patch import FAMILIES
from tests.utils.checks import assert_error_mentions
from tests.utils.patching import check_patch


class CustomNorm(nn.LayerNorm):
    """A LayerNorm subclass with its own semantics: must be skipped."""

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps) * 2


class PlainSubclassNorm(nn.LayerNorm):
    """A subclass that keeps nn.LayerNorm's forward: patched, and stays an instance of its class."""


class Toy(nn.Module):
    """(N, 3, 9, 9) images -> (N, 6) features through every family pydl.patch knows."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)                                  # dense conv
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8, padding_mode="reflect")  # depthwise, multiplier 2
        self.head = nn.Sequential(nn.LayerNorm(16), nn.GELU(approximate="tanh"), nn.Linear(16, 16))  # fused
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.rms = nn.RMSNorm(16)
        self.sub = PlainSubclassNorm(16)
        self.custom = CustomNorm(16)
        self.out = nn.Linear(16, 6)

    def forward(self, x):
        t = self.dw(F.relu(self.stem(x))).flatten(2).transpose(1, 2)   # (N, 81, 16)
        t = self.head(t)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        t = self.custom(self.sub(self.rms(t)))
        return self.out(t.mean(1))


def _toy(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    return Toy()


def _x(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 9, 9, generator=torch.Generator().manual_seed(1))


def test_every_family_replaced_outputs_and_grads_equal():
    report = check_patch(_toy(), (_x(),), atol=1e-5, rtol=1e-5)
    got = {(r.name, r.family) for r in report.replaced}
    assert got == {("stem", "conv2d"), ("dw", "depthwise_conv2d"), ("head.0", "layer_norm_gelu"),
                   ("head.1", "layer_norm_gelu"), ("attn", "attention"), ("rms", "rms_norm"),
                   ("sub", "layer_norm")}
    assert [(s.name, "overrides" in s.reason) for s in report.skipped] == [("custom", True)]
    assert "replaced 7 modules" in str(report) and "custom" in str(report)


def test_swapped_classes_keep_isinstance_and_run_pydl():
    model = _toy()
    pydl.patch(model)
    assert isinstance(model.stem, pydl.nn.Conv2d) and isinstance(model.stem, nn.Conv2d)
    assert isinstance(model.dw, pydl.nn.DepthwiseConv2d) and model.dw.multiplier == 2
    assert isinstance(model.head[0], pydl.nn.LayerNormGELU) and model.head[0].approximate == "tanh"
    assert isinstance(model.head[1], nn.GELU)          # absorbed: still a GELU to isinstance checks
    x = torch.randn(3, 16)
    assert torch.equal(model.head[1](x), x)            # ... whose activation the norm computes
    assert isinstance(model.sub, PlainSubclassNorm) and isinstance(model.sub, pydl.nn.LayerNorm)
    assert type(model.custom) is CustomNorm
    assert isinstance(model.attn, pydl.nn.MultiheadAttention) and isinstance(model.rms, pydl.nn.RMSNorm)
    pydl.unpatch(model)
    assert type(model.head[1]) is nn.GELU and type(model.stem) is nn.Conv2d and "multiplier" not in vars(model.dw)


def test_ops_selects_families():
    model = _toy()
    report = pydl.patch(model, ops=["conv2d", "depthwise_conv2d"])
    assert {r.family for r in report.replaced} == {"conv2d", "depthwise_conv2d"}
    assert type(model.head[0]) is nn.LayerNorm
    assert pydl.patch(model, ops="layer_norm").counts() == {"layer_norm": 2}  # head.0 unfused, sub
    assert pydl.unpatch(model) == 4


def test_verify_reports_the_difference_and_atol_guards():
    model = _toy()
    report = pydl.patch(model, verify=_x(), atol=1e-4)
    assert report.max_abs_diff is not None and 0 <= report.max_abs_diff <= 1e-4
    pydl.unpatch(model)


def test_atol_exceeded_raises_and_leaves_the_model_unpatched(monkeypatch):
    model = _toy()
    types = [type(m) for m in model.modules()]
    monkeypatch.setattr(pydl.nn.LayerNorm, "forward", lambda self, x: torch.zeros_like(x))  # a broken one
    with pytest.raises(ValueError) as e:
        pydl.patch(model, verify=_x(), atol=1e-3)
    assert_error_mentions(e, "atol", "unpatched")
    assert [type(m) for m in model.modules()] == types
    assert not any("_pydl_patch" in vars(m) for m in model.modules())


def test_verify_takes_tuples_and_dicts_and_restores_modes():
    class TwoIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(5)
            self.drop = nn.Dropout(0.5)

        def forward(self, a, b=None):
            return {"y": self.drop(self.norm(a + b)), "n": torch.tensor(3)}

    a, b = torch.randn(4, 5), torch.randn(4, 5)
    for sample in ((a, b), {"a": a, "b": b}):
        model = TwoIn().train()
        model.norm.eval()   # a per-module flag that must survive the verify run
        report = pydl.patch(model, verify=sample)
        assert report.max_abs_diff < 1e-5
        assert model.training and model.drop.training and not model.norm.training
        pydl.unpatch(model)


def test_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        pydl.patch(torch.randn(3))
    with pytest.raises(TypeError, match="model"):
        pydl.unpatch("not a module")
    with pytest.raises(ValueError) as e:
        pydl.patch(_toy(), ops=["layer_norm", "softmax"])
    assert_error_mentions(e, "ops", "softmax", *FAMILIES)
    with pytest.raises(TypeError, match="ops"):
        pydl.patch(_toy(), ops=3)
    with pytest.raises(ValueError, match="verify"):
        pydl.patch(_toy(), atol=1e-3)
    with pytest.raises(ValueError, match="atol"):
        pydl.patch(_toy(), verify=_x(), atol=-1.0)


def test_pydl_modules_are_left_alone():
    model = nn.Sequential(pydl.nn.LayerNorm(8), nn.GELU(), pydl.nn.Conv2d(8, 8, 1))
    report = pydl.patch(model)
    assert report.replaced == [] and report.skipped == []


def test_deepcopy_of_a_patched_model_unpatches():
    model = _toy()
    pydl.patch(model)
    clone = copy.deepcopy(model)
    assert pydl.unpatch(clone) == 7
    assert type(clone.stem) is nn.Conv2d and isinstance(model.stem, pydl.nn.Conv2d)
    torch.testing.assert_close(clone(_x()), model(_x()), atol=1e-5, rtol=1e-5)


def test_patch_in_bfloat16():
    model = _toy().to(torch.bfloat16)
    x = _x().to(torch.bfloat16)
    want = model(x)
    report = pydl.patch(model)
    assert len(report.replaced) == 7
    got = model(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)


def test_patched_model_compiles_fullgraph():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                          nn.Flatten(2), nn.Unflatten(1, (8,)), nn.LayerNorm(81), nn.GELU(), nn.RMSNorm(81))
    x = _x()
    want = model(x)
    pydl.patch(model)
    torch._dynamo.reset()
    got = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_patch_on_the_device_under_test(device):
    """A model already on the device (a GPU in scripts/gpu_check.sh): patched in place, same answers;
    bf16 autocast on CUDA as a training step would run it."""
    model = _toy().to(device)
    x = _x().to(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with amp:
        want = model(x)
    pydl.patch(model)
    assert all(p.device.type == device.type for p in model.parameters())
    with amp:
        got = model(x)
    tol = 5e-2 if device.type == "cuda" else 1e-5
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    pydl.unpatch(model)

