"""``pydl.patch(model)``: pydl's operators swapped into a model the user already has.

    report = pydl.patch(model, verify=sample)     # plain torch, timm or Hugging Face model
    print(report)                                  # what was replaced, what was skipped, and why
    pydl.unpatch(model)                            # every module back as it was

How a module is swapped: **its class, in place**. The module object stays where it is (so its
parent, hooks, parameters, buffers, state_dict keys, device, dtype and train/eval flag are
untouched and nothing is copied), and its ``__class__`` becomes a pydl class whose ``forward``
runs pydl's op: ``pydl.nn.LayerNorm`` for an ``nn.LayerNorm``; for a subclass (timm's
``LayerNorm``, ``LayerNorm2d``, ...) a class deriving from both, so ``isinstance`` checks against
the original class keep holding. ``unpatch`` sets the original class back and removes what the
patch added. A patched module records this in its ``__dict__`` (``_pydl_patch``), so patching twice
is a no-op, ``copy.deepcopy`` of a patched model can be unpatched, and DDP wrapping done after the
patch sees ordinary modules. (Pickling a whole patched model, rather than its state_dict, needs the
classes importable: unpatch first.)

Families (``ops=``; default all):

    layer_norm        nn.LayerNorm (and subclasses that keep its forward), timm LayerNorm/LayerNorm2d
    layer_norm_gelu   an nn.LayerNorm directly followed by nn.GELU in an nn.Sequential: one fused
                      kernel in the LayerNorm, the GELU then passes its input through
    rms_norm          nn.RMSNorm; Hugging Face's LlamaRMSNorm family
    depthwise_conv2d  nn.Conv2d with groups == in_channels (channel multiplier allowed)
    conv2d            every other nn.Conv2d
    attention         nn.MultiheadAttention, timm's ViT Attention, Hugging Face models (their
                      attention implementation is set to "pydl")

The library-specific rules come from ``pydl.integrations.timm`` / ``.transformers``; they are
consulted only when the user has imported that library already (pydl imports neither itself).
A subclass that overrides ``forward`` with semantics pydl does not know is skipped, with the reason.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from .nn.attention import MultiheadAttention
from .nn.conv import Conv2d
from .nn.depthwise_conv2d import DepthwiseConv2d
from .nn.layer_norm import LayerNorm, LayerNormGELU
from .nn.rms_norm import RMSNorm

FAMILIES = ("layer_norm", "layer_norm_gelu", "rms_norm", "depthwise_conv2d", "conv2d", "attention")
_RECORD = "_pydl_patch"  # the instance attribute a patched module carries
_MISSING = object()


# ---- what a rule says -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Swap:
    """How one module instance changes: ``cls`` becomes its class (None: keep it), ``attrs`` are set
    on it (their previous values restored by unpatch), ``call = (method, arg)`` is called on it
    (``undo = (method, arg)`` reverses it). ``new`` names the result in the report."""

    cls: Optional[type] = None
    attrs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    call: Optional[tuple] = None
    undo: Optional[tuple] = None
    new: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Rule:
    """``replace(module)`` -> a ``Swap``, or a string: the reason it is skipped; ``None``: not this rule's."""

    family: str
    replace: Callable[[nn.Module], Union[Swap, str, None]]


@dataclasses.dataclass(frozen=True)
class _Record:
    cls: type                      # the class before the patch
    attrs: Mapping[str, Any]       # attribute -> value before (or _MISSING)
    undo: Optional[tuple]


# ---- the report -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Replaced:
    name: str        # qualified module name ("" = the model itself)
    old_type: str
    new_type: str
    family: str


@dataclasses.dataclass(frozen=True)
class Skipped:
    name: str
    type: str
    reason: str


@dataclasses.dataclass
class PatchReport:
    """What ``pydl.patch`` did: ``replaced`` and ``skipped`` modules, and with ``verify`` the largest
    absolute difference between the model's outputs before and after (``max_abs_diff``)."""

    replaced: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)
    max_abs_diff: Optional[float] = None

    def counts(self) -> dict:
        """family -> number of modules replaced."""
        out: dict = {}
        for r in self.replaced:
            out[r.family] = out.get(r.family, 0) + 1
        return out

    def __str__(self) -> str:
        fams = ", ".join(f"{f} {n}" for f, n in self.counts().items()) or "nothing"
        lines = [f"pydl.patch: replaced {len(self.replaced)} modules ({fams}); skipped {len(self.skipped)}"]
        lines += [f"  skipped {s.name or '<model>'} ({s.type}): {s.reason}" for s in self.skipped]
        if self.max_abs_diff is not None:
            lines.append(f"  max |output difference| = {self.max_abs_diff:.3g}")
        return "\n".join(lines)


# ---- classes ----------------------------------------------------------------------------------

_MIXED: dict = {}


def mixed_class(pydl_cls: type, original: type) -> type:
    """The class a patched ``original`` instance gets: ``pydl_cls`` itself when ``original`` is the
    torch class pydl_cls derives from, else a class deriving from both (pydl's forward first), so
    ``isinstance(module, original)`` still holds."""
    if issubclass(pydl_cls, original):
        return pydl_cls
    key = (pydl_cls, original)
    if key not in _MIXED:
        _MIXED[key] = type(original.__name__, (pydl_cls, original),
                           {"__module__": original.__module__, "__qualname__": original.__qualname__,
                            "_pydl_original_class": original, "_pydl_class": pydl_cls})
    return _MIXED[key]


def _describe(cls: type) -> str:
    base = cls.__dict__.get("_pydl_class", cls)
    return f"{base.__module__}.{base.__qualname__}"


def keeps_forward(module: nn.Module, base: type, *methods: str) -> bool:
    """True when ``module``'s class is ``base`` or a subclass that does not override ``forward`` (or
    ``methods``): its semantics are then ``base``'s."""
    cls = type(module)
    return isinstance(module, base) and all(getattr(cls, m) is getattr(base, m) for m in ("forward",) + methods)


def is_pydl_module(module: nn.Module) -> bool:
    """A module of pydl's own (pydl.nn, or a class derived from one): it runs pydl's ops already."""
    return any(c.__module__.startswith("pydl.nn.") for c in type(module).__mro__)


# ---- the generic rules (plain torch) ----------------------------------------------------------

def _torch_class(torch_cls: type, pydl_cls: type) -> Callable:
    """The rule for ``torch_cls`` and its subclasses that keep its forward: the class becomes ``pydl_cls``
    (mixed with the subclass); a subclass with a forward of its own is skipped."""

    def replace(module: nn.Module):
        if not isinstance(module, torch_cls):
            return None
        if not keeps_forward(module, torch_cls):
            return (f"{type(module).__qualname__} overrides {torch_cls.__name__}.forward; pydl does not know "
                    f"its semantics")
        return Swap(mixed_class(pydl_cls, type(module)))
    return replace


def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups == conv.in_channels and conv.out_channels % conv.in_channels == 0


def _conv_skip_reason(module: nn.Module) -> Optional[str]:
    if not keeps_forward(module, nn.Conv2d, "_conv_forward"):
        return f"{type(module).__qualname__} overrides nn.Conv2d's forward; pydl does not know its semantics"
    if not module.weight.is_floating_point():
        return f"weight dtype {module.weight.dtype} is not a floating-point dtype"
    return None


def _depthwise_conv2d(module: nn.Module):
    if not isinstance(module, nn.Conv2d) or not _is_depthwise(module):
        return None
    reason = _conv_skip_reason(module)
    return reason or Swap(mixed_class(DepthwiseConv2d, type(module)),
                          {"multiplier": module.out_channels // module.in_channels})


def _conv2d(module: nn.Module):
    if not isinstance(module, nn.Conv2d) or _is_depthwise(module):
        return None
    return _conv_skip_reason(module) or Swap(mixed_class(Conv2d, type(module)))


_GENERIC = (Rule("layer_norm", _torch_class(nn.LayerNorm, LayerNorm)),
            Rule("rms_norm", _torch_class(nn.RMSNorm, RMSNorm)),
            Rule("depthwise_conv2d", _depthwise_conv2d), Rule("conv2d", _conv2d),
            Rule("attention", _torch_class(nn.MultiheadAttention, MultiheadAttention)))


def _rules(families: frozenset) -> list:
    """Integration rules first (they know library classes), then the generic ones."""
    rules: list = []
    if "timm" in sys.modules:
        from .integrations import timm as timm_integration

        rules += timm_integration.patch_rules()
    if "transformers" in sys.modules:
        from .integrations import transformers as hf_integration

        rules += hf_integration.patch_rules()
    return [r for r in rules + list(_GENERIC) if r.family in families]


# ---- LayerNorm + GELU in a Sequential ---------------------------------------------------------

class _FusedIntoNorm(nn.Module):
    """The class of an nn.GELU whose activation the preceding LayerNorm computes: identity."""

    def forward(self, x: Tensor) -> Tensor:
        return x


def _fusions(model: nn.Module, families: frozenset) -> list:
    """[(norm name, norm, gelu name, gelu)]: an unpatched norm the layer_norm rules would take, directly
    followed by an exact nn.GELU, inside an nn.Sequential."""
    if "layer_norm_gelu" not in families:
        return []
    out = []
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        items = list(seq._modules.items())
        for (n1, norm), (n2, act) in zip(items, items[1:]):
            if (type(act) is nn.GELU and type(norm) is nn.LayerNorm and _RECORD not in norm.__dict__
                    and _RECORD not in act.__dict__):
                prefix = f"{seq_name}." if seq_name else ""
                out.append((prefix + n1, norm, prefix + n2, act))
    return out


# ---- applying and undoing ---------------------------------------------------------------------

def _apply(module: nn.Module, swap: Swap) -> None:
    before = {k: module.__dict__.get(k, _MISSING) for k in swap.attrs}
    old_cls = type(module)
    if swap.call is not None:
        getattr(module, swap.call[0])(swap.call[1])
    for k, v in swap.attrs.items():
        object.__setattr__(module, k, v)
    if swap.cls is not None:
        module.__class__ = swap.cls
    module.__dict__[_RECORD] = _Record(old_cls, before, swap.undo)


def _undo(module: nn.Module) -> None:
    rec = module.__dict__.pop(_RECORD)
    module.__class__ = rec.cls
    for k, v in rec.attrs.items():
        if v is _MISSING:
            module.__dict__.pop(k, None)
        else:
            object.__setattr__(module, k, v)
    if rec.undo is not None:
        getattr(module, rec.undo[0])(rec.undo[1])


def unpatch(model: nn.Module) -> int:
    """Undo every ``pydl.patch`` in ``model``: each patched module gets its original class and
    attributes back. Returns how many modules were restored (0 for an unpatched model)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"pydl.unpatch: model must be a torch.nn.Module, got {type(model).__name__}")
    patched = [m for m in model.modules() if _RECORD in m.__dict__]
    for m in reversed(patched):
        _undo(m)
    return len(patched)


# ---- verify -----------------------------------------------------------------------------------

def _tensors(out) -> list:
    """The tensors of a model output (a tensor, tuple/list, dict or Hugging Face ModelOutput), in order."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []


def _run(model: nn.Module, sample) -> list:
    """The model's output tensors on ``sample`` in eval mode (no dropout, no BN-statistics update), no
    autograd; every module's train/eval flag restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(sample, Mapping):
                out = model(**sample)
            elif isinstance(sample, (tuple, list)):
                out = model(*sample)
            else:
                out = model(sample)
    finally:
        for m, training in flags:
            m.training = training
    return [t.detach() for t in _tensors(out)]


def _max_abs_diff(before: list, after: list) -> float:
    if len(before) != len(after) or any(a.shape != b.shape for a, b in zip(before, after)):
        return math.inf
    worst = 0.0
    for b, a in zip(before, after):
        if not (b.is_floating_point() or b.is_complex()):
            worst = max(worst, 0.0 if torch.equal(a, b) else math.inf)
            continue
        b64, a64 = b.double(), a.double()
        same_nan = torch.isnan(b64) & torch.isnan(a64)
        same_inf = torch.isinf(b64) & (a64 == b64)
        d = (a64 - b64).abs().masked_fill(same_nan | same_inf, 0.0).nan_to_num(nan=math.inf)
        if d.numel():
            worst = max(worst, float(d.max()))
    return worst


# ---- patch ------------------------------------------------------------------------------------

def _families(ops: Optional[Iterable[str]]) -> frozenset:
    if ops is None:
        return frozenset(FAMILIES)
    if isinstance(ops, str):
        ops = (ops,)
    try:
        chosen = frozenset(ops)
    except TypeError:
        raise TypeError(f"pydl.patch: ops must be None or an iterable of family names, got "
                        f"{type(ops).__name__}") from None
    unknown = sorted(str(o) for o in chosen - set(FAMILIES))
    if unknown:
        raise ValueError(f"pydl.patch: unknown ops {unknown}; the families are {list(FAMILIES)}")
    return chosen


def patch(model: nn.Module, *, ops: Optional[Iterable[str]] = None, verify=None,
          atol: Optional[float] = None) -> PatchReport:
    """Swap pydl's operators into ``model`` in place and say what changed.

    ops: the families to patch (``FAMILIES``; None = all). verify: inputs to run the model on before
    and after — a tensor (``model(x)``), a tuple/list (``model(*v)``) or a dict (``model(**v)``) —;
    the run is in eval mode under no_grad and the modules' train/eval flags are restored.
    ``report.max_abs_diff`` is the largest absolute difference of any output element (inf if the
    output structure changed). atol (needs ``verify``): a bound on it; above it the patch is undone
    and ValueError raised. Modules already patched are left alone (patching twice is a no-op).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"pydl.patch: model must be a torch.nn.Module, got {type(model).__name__}")
    families = _families(ops)
    if atol is not None:
        if verify is None:
            raise ValueError("pydl.patch: atol needs verify (inputs to compare the outputs on)")
        if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not atol >= 0:
            raise ValueError(f"pydl.patch: atol must be a number >= 0, got {atol!r}")
    before = _run(model, verify) if verify is not None else None

    report = PatchReport()
    rules = _rules(families)
    changed: list = []

    def swap(name: str, module: nn.Module, s: Swap, family: str) -> None:
        old = type(module)
        _apply(module, s)
        changed.append(module)
        report.replaced.append(Replaced(name, f"{old.__module__}.{old.__qualname__}",
                                        s.new or _describe(type(module)), family))

    for norm_name, norm, act_name, act in _fusions(model, families):
        approx = act.approximate
        swap(norm_name, norm, Swap(mixed_class(LayerNormGELU, type(norm)),
                                   {"approximate": approx, "_activation": approx}), "layer_norm_gelu")
        swap(act_name, act, Swap(mixed_class(_FusedIntoNorm, type(act)),
                                 new=f"identity (the GELU is computed by {norm_name})"), "layer_norm_gelu")

    for name, module in model.named_modules():
        if _RECORD in module.__dict__ or is_pydl_module(module):
            continue
        for rule in rules:
            outcome = rule.replace(module)
            if outcome is None:
                continue
            if isinstance(outcome, str):
                report.skipped.append(Skipped(name, f"{type(module).__module__}.{type(module).__qualname__}",
                                              outcome))
            else:
                swap(name, module, outcome, rule.family)
            break

    if before is not None:
        report.max_abs_diff = _max_abs_diff(before, _run(model, verify))
        if atol is not None and not report.max_abs_diff <= atol:
            for m in reversed(changed):
                _undo(m)
            raise ValueError(f"pydl.patch: the outputs moved by {report.max_abs_diff:.3g} > atol={atol}; "
                             f"the model was left unpatched")
    return report


__all__ = ["FAMILIES", "PatchReport", "Replaced", "Rule", "Skipped", "Swap", "keeps_forward", "mixed_class",
           "patch", "unpatch"]
