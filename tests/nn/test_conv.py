"""pydl.nn.Conv2d: a drop-in nn.Conv2d (constructor, state_dict, outputs and gradients) for every
padding mode; the triton backend under the interpreter."""

from __future__ import annotations

import os

os.environ.setdefault("PYDL_CONV2D_AUTOTUNE", "0")  # table tiles in tests (pydl/triton/conv2d.py)

import pytest  # noqa: E402
import torch  # noqa: E402

from pydl.nn.conv import Conv2d  # noqa: E402

CTORS = [
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=(2, 3), stride=(2, 1), padding="valid", bias=False),
    dict(in_channels=4, out_channels=4, kernel_size=2, padding="same", dilation=2, groups=2),
    dict(in_channels=4, out_channels=8, kernel_size=3, padding=2, padding_mode="reflect"),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=(1, 2), padding_mode="replicate", stride=2),
    dict(in_channels=4, out_channels=6, kernel_size=4, padding="same", padding_mode="circular"),
    dict(in_channels=4, out_channels=8, kernel_size=3, padding=1, groups=4),                 # depthwise
]


def _pair(kw, dtype=torch.float32):
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(**kw, dtype=dtype)
    mod = Conv2d(**kw, dtype=dtype)
    mod.load_state_dict(ref.state_dict())
    return ref, mod


@pytest.mark.parametrize("kw", CTORS, ids=str)
def test_drop_in_for_nn_conv2d(kw):
    ref, mod = _pair(kw)
    assert isinstance(mod, torch.nn.Conv2d) and repr(mod).replace("Conv2d", "", 1) == repr(ref).replace("Conv2d", "", 1)
    assert list(mod.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 4, 9, 8, requires_grad=True)
    out, want = mod(x), ref(x)
    torch.testing.assert_close(out, want)
    dy = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *mod.parameters()], dy)
    exp = torch.autograd.grad(want, [x, *ref.parameters()], dy)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_torch_checkpoint_loads_unchanged():
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    mine = torch.nn.Sequential(Conv2d(3, 8, 3), torch.nn.ReLU(), Conv2d(8, 4, 1))
    assert mine.load_state_dict(ref.state_dict()).missing_keys == []
    x = torch.randn(1, 3, 10, 10)
    torch.testing.assert_close(mine(x), ref(x))


@pytest.mark.triton
@pytest.mark.parametrize("kw", [CTORS[1], CTORS[3]], ids=["valid-nobias", "reflect"])
def test_triton_backend(kw, triton_device):
    ref, mod = _pair(kw)
    ref, mod = ref.to(triton_device), mod.to(triton_device)
    mod.backend = "triton"
    x = torch.randn(1, 4, 6, 7, device=triton_device, requires_grad=True)
    out, want = mod(x), ref(x)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-5)
    dy = torch.randn_like(out)
    for g, e in zip(torch.autograd.grad(out, [x, *mod.parameters()], dy),
                    torch.autograd.grad(want, [x, *ref.parameters()], dy)):
        torch.testing.assert_close(g, e, atol=5e-5, rtol=1e-5)
