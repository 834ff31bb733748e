"""Complete models built from pydl's ops, and the registry that names them.

    model = pydl.models.create("convnext_tiny", num_classes=10)
    pydl.models.list()            # every registered name, sorted
    pydl.models.list("resnet*")   # fnmatch pattern

Adding a model is one line in ``_MODELS`` below: its name, the ``"module:function"`` in
``pydl.models`` that builds it (imported on first ``create``, so importing ``pydl.models`` stays
cheap), and the keyword arguments of a *small* instance (``small_config(name)``: what the tests
and smoke runs build; the registry test runs every name through it, so a new line is covered
automatically). User code registers its own at runtime with ``register(name)`` (a decorator).

The model protocol the tests rely on: a registered model is an ``nn.Module`` whose
``example_inputs(batch_size=2, *, generator=None) -> tuple`` returns positional arguments of a
small valid forward call on the model's device (images 32×32 for the CNNs, a few tokens for the
language models).
"""

from __future__ import annotations

import builtins
import difflib
import fnmatch
import importlib
from typing import Callable, Optional, Union

from torch import nn

_S = dict  # readability of the table below

# name -> ("module:function", small config). One line per name; keep families together.
_MODELS: dict = {
    "mlp": ("mlp:mlp", _S(in_features=64, hidden=[32, 32], out_features=10)),
    "resnet18": ("resnet:resnet18", _S(num_classes=10, layers=(1, 1, 1, 1), widths=(8, 16, 24, 32), stem_width=8)),
    "resnet34": ("resnet:resnet34", _S(num_classes=10, layers=(1, 2, 1, 1), widths=(8, 16, 24, 32), stem_width=8)),
    "resnet50": ("resnet:resnet50", _S(num_classes=10, layers=(1, 1, 2, 1), widths=(8, 16, 24, 32), stem_width=8)),
    "convnext_tiny": ("convnext:convnext_tiny", _S(num_classes=10, depths=(1, 1, 2, 1), dims=(16, 32, 48, 64))),
    "convnext_small": ("convnext:convnext_small", _S(num_classes=10, depths=(1, 1, 3, 1), dims=(16, 32, 48, 64))),
    "convnext_base": ("convnext:convnext_base", _S(num_classes=10, depths=(1, 1, 3, 1), dims=(32, 64, 96, 128))),
    "transformer": ("transformer:transformer", _S(src_vocab_size=50, tgt_vocab_size=60, d_model=32, nhead=4,
                                                  num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64)),
    "gpt2": ("gpt:gpt2", _S(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4)),
    "bert": ("bert:bert", _S(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=32)),
    "bert_mlm": ("bert:bert_mlm", _S(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32)),
}
# runtime registrations: name -> (factory callable, small config)
_RUNTIME: dict = {}


def _entry(name: str) -> tuple:
    if name in _RUNTIME:
        return _RUNTIME[name]
    if name in _MODELS:
        return _MODELS[name]
    close = difflib.get_close_matches(str(name), list_models(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"pydl.models: unknown model name {name!r}{hint} (known: {', '.join(list_models())})")


def _factory(spec: Union[str, Callable]) -> Callable:
    if callable(spec):
        return spec
    module, _, fn = spec.partition(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), fn)


def create(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with ``kwargs`` (the family's keyword arguments).

    pydl ships no weights: ``pretrained=True`` is refused. Load a timm checkpoint with
    ``model.load_state_dict(timm_model.state_dict())`` (the CNNs), or convert a Hugging Face model
    with ``from_transformers``.
    """
    spec, _ = _entry(name)
    if pretrained:
        raise ValueError(f"pydl.models.create({name!r}): pretrained=True is not supported (pydl ships no "
                         "weights); load a timm state_dict with load_state_dict instead")
    return _factory(spec)(**kwargs)


def list_models(pattern: Optional[str] = None) -> builtins.list:
    """The registered names, sorted; ``pattern`` filters them (fnmatch, e.g. "convnext*")."""
    names = sorted(set(_MODELS) | set(_RUNTIME))
    return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]


list = list_models  # the public name (pydl.models.list()); list_models avoids shadowing inside


def small_config(name: str) -> dict:
    """Keyword arguments that build a small instance of ``name`` (tests, smoke runs)."""
    return dict(_entry(name)[1])


def register(name: str, factory: Optional[Callable] = None, *, small: Optional[dict] = None):
    """Register ``factory(**kwargs) -> nn.Module`` under ``name``; usable as ``@register("my_net")``.

    ``small``: the small config (default: no arguments). Re-registering a name replaces it.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"pydl.models.register: name must be a non-empty str, got {name!r}")

    def deco(fn: Callable) -> Callable:
        if not callable(fn):
            raise TypeError(f"pydl.models.register({name!r}): factory must be callable, got {fn!r}")
        _RUNTIME[name] = (fn, dict(small or {}))
        return fn

    return deco if factory is None else deco(factory)


from .convert import from_transformers, to_transformers  # noqa: E402 - transformers is imported on call

__all__ = ["create", "from_transformers", "list", "list_models", "register", "small_config", "to_transformers"]
