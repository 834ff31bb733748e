"""ResNet-18/34/50 and ConvNeXt-T/S/B against timm (random init, nothing downloaded).

State_dicts load both ways with strict=True; parameter counts are the published ones; in eval
and train mode the logits, every parameter gradient and the input gradient equal timm's (fp32:
relative error 1e-4 in norm). Runs under channels_last and bf16 autocast.

Speed: the full-size models are built on the meta device (instant), then materialised with
random values (much faster than their trunc-normal init), once per module.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pydl.models as models
from pydl.models._common import randomize_

EXPECTED_M = {"resnet18": 11.69, "resnet34": 21.80, "resnet50": 25.56,
              "convnext_tiny": 28.59, "convnext_small": 50.22, "convnext_base": 88.59}
NAMES = list(EXPECTED_M)
IMAGE = {"resnet18": 64, "resnet34": 32, "resnet50": 64, "convnext_tiny": 64, "convnext_small": 32,
         "convnext_base": 32}
RTOL = 1e-4  # fp32, relative error in norm (different summation orders, pydl's LayerNorm kernel)


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    return randomize_(model, torch.Generator().manual_seed(seed))


def _materialise(model: nn.Module) -> nn.Module:
    return model.to_empty(device="cpu")


_PAIRS: dict = {}


def pair(timm, name: str):
    """(timm model, pydl model) with identical random weights, built once per name."""
    if name not in _PAIRS:
        with torch.device("meta"):
            t = timm.create_model(name, pretrained=False)
            p = models.create(name)
        t = _randomize(_materialise(t), seed=len(name))
        p = _materialise(p)
        p.load_state_dict(t.state_dict(), strict=True)  # timm -> pydl
        _PAIRS[name] = (t, p)
    return _PAIRS[name]


@pytest.fixture(scope="module", autouse=True)
def _free_pairs():
    yield
    _PAIRS.clear()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _run(model: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    """(logits, {param name: grad}, input grad) of one forward + backward with upstream dy."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    out.backward(dy)
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}, x.grad


def _inputs(name: str, batch: int = 0, num_classes: int = 1000):
    batch = batch or (1 if name in ("convnext_small", "convnext_base") else 2)
    g = torch.Generator().manual_seed(1)
    s = IMAGE[name]
    return torch.randn(batch, 3, s, s, generator=g), torch.randn(batch, num_classes, generator=g)


@pytest.mark.parametrize("name", NAMES)
def test_keys_shapes_and_parameter_counts_equal_timm(timm, name):
    with torch.device("meta"):
        t = timm.create_model(name, pretrained=False)
        p = models.create(name)
    ts, ps = t.state_dict(), p.state_dict()
    assert list(ps) == list(ts)  # same keys, same order
    assert {k: tuple(v.shape) for k, v in ps.items()} == {k: tuple(v.shape) for k, v in ts.items()}
    n = sum(q.numel() for q in p.parameters())
    assert n == sum(q.numel() for q in t.parameters())
    assert round(n / 1e6, 2) == EXPECTED_M[name]


@pytest.mark.parametrize("name", NAMES)
def test_eval_outputs_and_gradients_equal_timm(timm, name):
    t, p = pair(timm, name)
    t.eval(), p.eval()
    x, dy = _inputs(name)
    yt, gt, xt = _run(t, x, dy)
    yp, gp, xp = _run(p, x, dy)
    assert yt.abs().max() > 0.1  # not trivially small logits
    assert _rel(yp, yt) < RTOL
    assert _rel(xp, xt) < RTOL
    assert gp.keys() == gt.keys()
    bad = {k: _rel(gp[k], gt[k]) for k in gt if _rel(gp[k], gt[k]) > 10 * RTOL}  # grads: deeper sums
    assert not bad, bad
    # and back: pydl's state_dict loads into timm (strict) and gives the same logits
    t.load_state_dict(p.state_dict(), strict=True)
    with torch.no_grad():
        assert _rel(t(x), yt) == 0.0


@pytest.mark.parametrize("name", ["resnet18"])
def test_train_mode_equals_timm(timm, name):
    """Batch statistics in BN (and their running-stat updates), dropout/drop-path off.

    Train-mode BN over a tiny batch (the last stage sees 3·2·2 values per channel) is badly
    conditioned, so two fp32 runs differ by ~1e-3 in the gradients; as DESIGN §7 has it, pydl's
    error against timm in float64 must be at most 2× timm's own fp32 error (plus a floor)."""
    t, p = pair(timm, name)
    t64 = copy.deepcopy(t).double()
    t.train(), p.train(), t64.train()
    x, dy = _inputs(name, batch=3)
    y64, g64, x64 = _run(t64, x.double(), dy.double())
    yt, gt, xt = _run(t, x, dy)
    yp, gp, xp = _run(p, x, dy)
    assert _rel(yp, y64) <= 2 * _rel(yt, y64) + 1e-5
    assert _rel(xp, x64) <= 2 * _rel(xt, x64) + 1e-5
    bad = {k: (_rel(gp[k], g64[k]), _rel(gt[k], g64[k])) for k in g64
           if _rel(gp[k], g64[k]) > 2 * _rel(gt[k], g64[k]) + 1e-5}
    assert not bad, bad
    for (k, bt), (_, bp) in zip(t.named_buffers(), p.named_buffers()):
        assert torch.allclose(bp.float(), bt.float(), rtol=1e-4, atol=1e-6), k
    t.eval(), p.eval()


@pytest.mark.parametrize("name", ["resnet50", "convnext_tiny"])
def test_channels_last_end_to_end(timm, name):
    """pydl turns the input channels_last at the stem; every block then hands NHWC-strided tensors on.
    An NCHW model (channels_last=False), a channels_last-converted model and input agree."""
    _, p = pair(timm, name)
    p.eval()
    x, _ = _inputs(name)
    layouts = []
    blocks = [m for m in p.modules() if type(m).__name__ in ("ConvNeXtBlock", "Bottleneck", "BasicBlock")]
    hooks = [b.register_forward_hook(lambda m, i, o: layouts.append(o.is_contiguous(memory_format=torch.channels_last)))
             for b in blocks]
    with torch.no_grad():
        y = p(x)
    for h in hooks:
        h.remove()
    assert len(layouts) == len(blocks) and all(layouts)
    with torch.no_grad():
        p.channels_last = False
        try:
            y_nchw = p(x)
        finally:
            p.channels_last = True
        y_cl = p(x.contiguous(memory_format=torch.channels_last))
    assert _rel(y_nchw, y) < RTOL and _rel(y_cl, y) < RTOL


@pytest.mark.parametrize("name", ["resnet18", "convnext_tiny"])
def test_bf16_autocast_close_to_timm(timm, name):
    """Under CPU bf16 autocast pydl is as close to the fp32 result as timm is (2× + a floor), and
    its backward runs."""
    t, p = pair(timm, name)
    t.eval(), p.eval()
    x, dy = _inputs(name)
    x = x[:, :, :32, :32]  # CPU bf16 GEMMs are slow without AMX: a small image
    with torch.no_grad():
        ref = t(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yt, yp = t(x), p(x)
    assert yp.dtype == yt.dtype
    assert _rel(yp.float(), ref) <= 2 * _rel(yt.float(), ref) + 2e-2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, grads, xg = _run(p, x, dy)
    assert torch.isfinite(xg).all() and all(torch.isfinite(g).all() for g in grads.values())


def test_timm_keywords_num_classes_in_chans(timm):
    for name in ("resnet18", "convnext_tiny"):
        with torch.device("meta"):
            t = timm.create_model(name, pretrained=False, num_classes=10, in_chans=1)
            p = models.create(name, num_classes=10, in_chans=1)
        assert {k: v.shape for k, v in p.state_dict().items()} == {k: v.shape for k, v in t.state_dict().items()}
    small = {"resnet18": dict(layers=(1, 1, 1, 1)), "convnext_tiny": dict(depths=(1, 1, 1, 1))}
    for name, kw in small.items():
        feats = models.create(name, num_classes=0, **kw).eval()
        assert feats(torch.randn(2, 3, 32, 32)).shape == (2, feats.num_features)


def test_drop_path_is_stochastic_in_train_only():
    torch.manual_seed(0)
    m = models.create("convnext_tiny", num_classes=10, depths=(1, 1, 2, 1), dims=(16, 32, 48, 64),
                      drop_path_rate=0.5, ls_init_value=1.0)
    ref = models.create("convnext_tiny", num_classes=10, depths=(1, 1, 2, 1), dims=(16, 32, 48, 64))
    ref.load_state_dict(m.state_dict())
    rates = [b.drop_path.p for s in m.stages for b in s.blocks if hasattr(b.drop_path, "p")]
    assert rates == pytest.approx([0.5 * k / 4 for k in range(1, 5)])  # linear in depth, first block 0
    x = torch.randn(4, 3, 32, 32)
    m.eval(), ref.eval()
    with torch.no_grad():
        assert torch.equal(m(x), ref(x))
        m.train(), ref.train()
        assert not torch.allclose(m(x), ref(x))


def test_zero_init_last_and_init_statistics():
    torch.manual_seed(0)
    r = models.create("resnet18", num_classes=10, layers=(1, 1, 1, 1))
    assert all(b.bn2.weight.abs().max() == 0 for b in r.modules() if type(b).__name__ == "BasicBlock")
    c = models.create("convnext_tiny", num_classes=10, depths=(1, 1, 1, 1), dims=(64, 64, 64, 64))
    w = c.stages[0].blocks[0].mlp.fc1.weight
    assert abs(w.std().item() - 0.02) < 0.002 and w.abs().max() <= 2.0  # trunc_normal_(std=.02), cut at ±2
    assert torch.all(c.stages[0].blocks[0].gamma == 1e-6)
