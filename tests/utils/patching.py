"""The shared check of ``pydl.patch`` on any model: same outputs and gradients as the unpatched model
(train and eval), parameters shared (never copied), state_dict keys unchanged, patching twice a
no-op, and ``unpatch`` restoring every module's exact type."""

from __future__ import annotations

import copy

import torch

import pydl
from pydl.patch import _tensors

from .modes import assert_same


def outputs_and_grads(model: torch.nn.Module, inputs, *, train: bool, seed: int = 0):
    """(output tensors, {parameter name: grad}) of ``model(*inputs)`` (a dict: ``model(**inputs)``) with
    a fixed-seed random upstream gradient on every floating output."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    outs = [t for t in _tensors(out) if t.is_floating_point()]
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return [o.detach() for o in outs], grads


def check_patch(model: torch.nn.Module, inputs, *, atol: float, rtol: float, modes=(False, True),
                **patch_kw) -> pydl.PatchReport:
    """Patch ``model`` in place and check it against an unpatched deep copy; returns the report.
    ``modes``: the train flags to compare in (False = eval). The model ends unpatched."""
    reference = copy.deepcopy(model)
    types = [type(m) for m in model.modules()]
    params = {n: id(p) for n, p in model.named_parameters()}
    keys = list(model.state_dict())

    report = pydl.patch(model, **patch_kw)
    assert report.replaced, "pydl.patch replaced nothing"
    assert {n: id(p) for n, p in model.named_parameters()} == params, "parameters were copied"
    assert list(model.state_dict()) == keys, "state_dict keys changed"
    for train in modes:
        want, want_g = outputs_and_grads(reference, inputs, train=train)
        got, got_g = outputs_and_grads(model, inputs, train=train)
        what = "train" if train else "eval"
        assert len(got) == len(want)
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same(a, b, f"output {i} ({what})", atol=atol, rtol=rtol)
        assert got_g.keys() == want_g.keys()
        for name in want_g:
            assert_same(got_g[name], want_g[name], f"grad {name} ({what})", atol=atol, rtol=rtol)

    again = pydl.patch(model, **patch_kw)
    assert again.replaced == [] and again.skipped == report.skipped, "patching twice changed something"
    assert pydl.unpatch(model) == len(report.replaced)
    assert [type(m) for m in model.modules()] == types, "unpatch did not restore the module types"
    assert not any("_pydl_patch" in m.__dict__ for m in model.modules())
    return report
