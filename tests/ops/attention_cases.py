"""Shared pieces of the attention tests: a call described as an :class:`AttnCase`, its inputs
(random, optionally as transposed views of (B, N, H, D) projections), and ``check_case``, which
compares pydl's output and every gradient with the float64 reference under the 2x rule of
tests/tolerances.py (torch's SDPA in the same dtype is the low-precision yardstick)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

from pydl.ops.attention import attention, attention_ref
from tests.utils.checks import assert_grads_close, grads
from tests.tolerances import assert_close_to_ref


@dataclasses.dataclass(frozen=True)
class AttnCase:
    """One attention call: (B, H, Hkv, Nq, Nk, E, Ev) plus flags; ``mask`` names a mask form."""

    B: int = 2
    H: int = 2
    Hkv: int = 2
    Nq: int = 17
    Nk: int = 17
    E: int = 32
    EV: int = 32
    causal: bool = False
    mask: Optional[str] = None
    gqa: bool = False
    projected: bool = False  # q/k/v as transposed views of (B, N, H, D) tensors

    def id(self) -> str:
        parts = [f"b{self.B}h{self.H}kv{self.Hkv}", f"q{self.Nq}k{self.Nk}", f"e{self.E}v{self.EV}"]
        parts += [p for p, on in (("causal", self.causal), ("gqa", self.gqa), ("proj", self.projected)) if on]
        return "-".join(parts + ([self.mask] if self.mask else []))


def _heads(B, N, H, D, dtype, device, projected) -> torch.Tensor:
    if projected:  # (B, N, H, D) memory, the layout linear projections produce
        return torch.randn(B, N, H, D).to(dtype=dtype, device=device).transpose(1, 2).detach().requires_grad_()
    return torch.randn(B, H, N, D).to(dtype=dtype, device=device).requires_grad_()


def make_mask(form: Optional[str], c: AttnCase, dtype, device) -> Optional[torch.Tensor]:
    """Masks in every form SDPA takes: bool / additive, each broadcast shape, stride-0 views."""
    if form is None:
        return None
    Nq, Nk = c.Nq, c.Nk
    if form == "bool2d":  # (Nq, Nk), one fully masked row
        m = torch.rand(Nq, Nk) > 0.3
        m[Nq // 2] = False
    elif form == "keypad":  # (B, 1, 1, Nk) key padding: the last keys of batch 0 ignored
        m = torch.ones(c.B, 1, 1, Nk, dtype=torch.bool)
        m[0, ..., max(1, Nk - 5):] = False
    elif form == "bool_full":
        m = torch.rand(c.B, c.H, Nq, Nk) > 0.5
    elif form == "add2d":
        m = torch.randn(Nq, Nk)
        m[:, Nk // 3] = float("-inf")
    elif form == "add_heads":  # (1, H, Nq, Nk)
        m = torch.randn(1, c.H, Nq, Nk)
    elif form == "add_expanded":  # a stride-0 view (B, H, Nq, Nk) of one (Nk,) row
        m = torch.randn(Nk).expand(c.B, c.H, Nq, Nk)
    elif form == "add_all_inf_row":  # a fully masked row, additive
        m = torch.randn(c.B, 1, Nq, Nk)
        m[:, :, 0] = float("-inf")
    else:
        raise ValueError(form)
    if m.dtype == torch.bool:
        return m.to(device)
    return m.to(dtype=dtype, device=device)


def make_inputs(c: AttnCase, dtype, device) -> tuple:
    q = _heads(c.B, c.Nq, c.H, c.E, dtype, device, c.projected)
    k = _heads(c.B, c.Nk, c.Hkv, c.E, dtype, device, c.projected)
    v = _heads(c.B, c.Nk, c.Hkv, c.EV, dtype, device, c.projected)
    return q, k, v, make_mask(c.mask, c, dtype, device)


def sdpa_kwargs(c: AttnCase, mask) -> dict:
    return dict(attn_mask=mask, is_causal=c.causal, enable_gqa=c.gqa)


def float64_leaves(tensors) -> list:
    """Fresh float64 leaves with the values of ``tensors`` (reference gradients in float64)."""
    return [t.detach().double().requires_grad_() for t in tensors]


def check_case(c: AttnCase, dtype, device, backend: str, *, mask_grad: bool = False, scale=None) -> None:
    """pydl(backend) vs the float64 reference: output, dq, dk, dv (and d mask when mask_grad)."""
    q, k, v, mask = make_inputs(c, dtype, device)
    if mask_grad:
        mask = mask.detach().requires_grad_()
    kw = dict(sdpa_kwargs(c, mask), scale=scale)
    out = attention(q, k, v, **kw, backend=backend)
    leaves = [("q", q), ("k", k), ("v", v)] + ([("mask", mask)] if mask_grad else [])
    tensors = [t for _, t in leaves]
    exact = float64_leaves(tensors)  # the reference and its gradients in float64, unrounded
    ref = attention_ref(*exact[:3], **dict(kw, attn_mask=exact[3] if mask_grad else mask))
    tout = F.scaled_dot_product_attention(q, k, v, **kw)
    assert out.shape == tout.shape and out.dtype == dtype and out.device == q.device
    assert_close_to_ref(out, ref, tout, dtype=dtype, name=f"attention {c.id()} out")
    do = torch.randn(out.shape).to(dtype=dtype, device=device)
    got = grads([out], tensors, [do])
    want = grads([ref], exact, [do.double()])
    tgot = grads([tout], tensors, [do])
    assert_grads_close(leaves, got, want, tgot, label=f"attention {c.id()}",
                       scales={"mask": 1.0})
