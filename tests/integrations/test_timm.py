"""pydl.patch on timm models (random init, nothing downloaded): ConvNeXt-T, ResNet-50 and ViT-Tiny give
the unpatched outputs and gradients in train and eval mode, unpatch restores every module type, and
the patched models run channels_last, in bfloat16 and under torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch

import pydl
from pydl.models._timm import import_timm
from tests.utils.patching import check_patch

try:
    timm = import_timm()
except ImportError as exc:  # pragma: no cover - timm is a test dependency
    pytest.skip(f"timm is not importable: {exc}", allow_module_level=True)


@pytest.fixture(autouse=True)
def _one_thread():
    """Small inputs through big models: one thread is as fast and avoids OpenMP stalls on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10, **kw)


def _image(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(3))


CASES = {  # name: (create_model keywords, image size, expected replacements per family)
    "convnext_tiny": ({}, 64, {"conv2d": 4, "depthwise_conv2d": 18, "layer_norm": 23}),
    "resnet50": ({}, 64, {"conv2d": 53}),
    "vit_tiny_patch16_224": ({"img_size": 64, "depth": 4}, 64, {"conv2d": 1, "layer_norm": 9, "attention": 4}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_patch_matches_unpatched(name):
    kw, size, counts = CASES[name]
    report = check_patch(_model(name, **kw), (_image(size),), atol=2e-4, rtol=2e-4)
    assert report.counts() == counts
    assert report.skipped == []


def test_vit_attention_runs_pydl_and_keeps_isinstance():
    model = _model("vit_tiny_patch16_224", img_size=32, depth=1)
    attn = model.blocks[0].attn
    pydl.patch(model)
    assert isinstance(attn, timm.layers.Attention) and type(attn).__mro__[1].__module__ == "pydl.integrations.timm"
    assert isinstance(model.blocks[0].norm1, pydl.nn.LayerNorm)
    pydl.unpatch(model)
    assert type(attn) is timm.layers.Attention


def test_convnext_channels_last_and_bfloat16():
    model = _model("convnext_tiny").eval()
    x = _image(64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = model(x)
        pydl.patch(model, ops=["layer_norm", "depthwise_conv2d"])
        torch.testing.assert_close(model(x), want, atol=2e-4, rtol=2e-4)
        model.to(torch.bfloat16)  # after the patch: the swapped modules follow .to() as any module
        got = model(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.15, rtol=0.1)
    pydl.unpatch(model)


def test_patched_vit_compiles_fullgraph():
    model = _model("vit_tiny_patch16_224", img_size=32, depth=2).eval()
    x = _image(32)
    with torch.no_grad():
        want = model(x)
        pydl.patch(model)
        torch._dynamo.reset()
        got = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    pydl.unpatch(model)
