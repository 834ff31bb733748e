"""pydl.nn.RMSNorm is a drop-in for torch.nn.RMSNorm: constructor, parameters, state_dict,
extra_repr, outputs and gradients (the kernels themselves are tested in tests/ops)."""

from __future__ import annotations

import inspect

import pytest
import torch

import pydl

SHAPES = [8, (4, 8), (1,), 97]


@pytest.mark.parametrize("eps", [None, 1e-6])
@pytest.mark.parametrize("elementwise_affine", [True, False])
@pytest.mark.parametrize("normalized_shape", SHAPES, ids=str)
def test_rms_norm_is_a_drop_in(normalized_shape, elementwise_affine, eps):
    torch.manual_seed(0)
    theirs = torch.nn.RMSNorm(normalized_shape, eps=eps, elementwise_affine=elementwise_affine,
                              dtype=torch.float64)
    ours = pydl.nn.RMSNorm(normalized_shape, eps=eps, elementwise_affine=elementwise_affine,
                           dtype=torch.float64)
    assert isinstance(ours, torch.nn.RMSNorm)
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    if elementwise_affine:
        with torch.no_grad():
            theirs.weight.normal_()
    ours.load_state_dict(theirs.state_dict())
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
    x = torch.randn(3, 5, *shape, dtype=torch.float64, requires_grad=True)
    y, want = ours(x), theirs(x)
    torch.testing.assert_close(y, want)
    g = torch.randn_like(y)
    params = [p for p in ours.parameters()]
    got = torch.autograd.grad(y, [x, *params], g)
    ref = torch.autograd.grad(want, [x, *theirs.parameters()], g)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


def test_rms_norm_default_eps_is_the_dtypes():
    """eps=None gives torch's results: its kernels use the accumulation type's epsilon (float32's
    for bfloat16/float16 too, not finfo(x.dtype).eps as its docs say)."""
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x = torch.randn(4, 16, dtype=dtype) * 1e-4  # small enough that eps matters
        m = pydl.nn.RMSNorm(16, dtype=dtype)
        torch.testing.assert_close(m(x), torch.nn.RMSNorm(16, dtype=dtype)(x))


def test_rms_norm_constructor_signature_matches_torch():
    assert (inspect.signature(pydl.nn.RMSNorm.__init__).parameters.keys()
            == inspect.signature(torch.nn.RMSNorm.__init__).parameters.keys())


def test_rms_norm_wrong_trailing_shape_is_an_error():
    m = pydl.nn.RMSNorm((4, 8))
    with pytest.raises(ValueError, match="normalized_shape"):
        m(torch.randn(2, 8, 4))
