"""pydl.nn.DepthwiseConv2d: nn.Conv2d(groups=C)'s parameters, state_dict and outputs (forward and
backward), checkpoints loading both ways, padding modes, from_conv, channels_last, bad arguments."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pydl.nn import DepthwiseConv2d


@pytest.mark.parametrize("kw", [dict(kernel_size=7, padding=3), dict(kernel_size=(3, 5), stride=2, padding=(1, 2)),
                                dict(kernel_size=4, padding="same", bias=False), dict(kernel_size=3, multiplier=2,
                                                                                     dilation=2, padding=2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_nn_conv2d(kw, channels_last, device):
    C, m = 6, kw.get("multiplier", 1)
    ref = torch.nn.Conv2d(C, C * m, kw["kernel_size"], stride=kw.get("stride", 1), padding=kw.get("padding", 0),
                          dilation=kw.get("dilation", 1), groups=C, bias=kw.get("bias", True)).to(device)
    mod = DepthwiseConv2d(C, **kw).to(device)
    assert set(mod.state_dict()) == set(ref.state_dict())
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(2, C, 15, 14, device=device)
    if channels_last:
        x, mod, ref = x.contiguous(memory_format=torch.channels_last), mod.to(memory_format=torch.channels_last), \
            ref.to(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = mod(xa), ref(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    assert ya.is_contiguous(memory_format=torch.channels_last) == yb.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(yb)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mod.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
    if ref.bias is not None:
        torch.testing.assert_close(mod.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4)


def test_checkpoint_round_trip_and_repr():
    mod = DepthwiseConv2d(8, 7, padding=3)
    ref = torch.nn.Conv2d(8, 8, 7, padding=3, groups=8)
    ref.load_state_dict(mod.state_dict())
    assert repr(mod).replace("DepthwiseConv2d", "Conv2d") == repr(ref)
    assert mod.weight.shape == (8, 1, 7, 7) and sum(p.numel() for p in mod.parameters()) == 8 * 49 + 8


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_modes(mode):
    ref = torch.nn.Conv2d(4, 4, 5, padding=2, groups=4, padding_mode=mode)
    mod = DepthwiseConv2d(4, 5, padding=2, padding_mode=mode)
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(mod(x), ref(x), rtol=1e-5, atol=1e-5)


def test_from_conv_shares_parameters():
    ref = torch.nn.Conv2d(5, 10, 3, padding=1, groups=5)
    mod = DepthwiseConv2d.from_conv(ref)
    assert mod.weight is ref.weight and mod.multiplier == 2
    x = torch.randn(1, 5, 6, 6)
    torch.testing.assert_close(mod(x), F.conv2d(x, ref.weight, ref.bias, padding=1, groups=5))
    with pytest.raises(ValueError, match="not depthwise"):
        DepthwiseConv2d.from_conv(torch.nn.Conv2d(4, 4, 3))


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiplier"):
        DepthwiseConv2d(4, 3, multiplier=0)
    with pytest.raises(ValueError, match="channels"):
        DepthwiseConv2d(4, 3)(torch.randn(1, 3, 8, 8))
