"""The image-classifier ops of the ``models`` suite (ConvNeXt-T, ResNet-50, ViT-S/16, inference and
``.train``): shapes, inputs, the models and FLOPs. The suite's shared call path is in ``models.py``;
this module is one of its two model families (the other: ``_models_lm.py``).

A shape is {B, S, cl}: a (B, 3, S, S) image, channels_last inputs and 4-D weights when cl = 1, NCHW
when cl = 0 (timm's default layout). Inputs: ``(x, *params)``, x in the cell's dtype (the autocast
dtype), params float32 under timm's names (pydl's models use the same ones); output ``(logits (B,
1000),)``. ViT's position embeddings depend on S: its model is built for the image size of the call.
"""

from __future__ import annotations

import functools

import torch

from ..core import shape_dims

KEYS = ("B", "S", "cl")
NUM_CLASSES = 1000
N_DATA = 1  # x precedes the parameters
OUT_NAMES = ("logits",)
SIZED = ("vit_small_patch16_224",)  # models built for the input's size (img_size)


def shape(b: int, s: int = 224, cl: int = 1) -> dict:
    return {"B": b, "S": s, "cl": cl}


def dims(sh) -> tuple:
    """(B, S, cl) of a shape dict, tuple or "B=..,S=..[,cl=0|1]" string (cl default 1)."""
    return shape_dims(sh, KEYS, "models", {"cl": 1})


def _timm():
    from pydl.models._timm import import_timm  # lazily: the harness runs without timm

    return import_timm()


def model_config(name: str, data: tuple, params: tuple):
    """The image size a call's model is built for (ViT), None for models that take any size."""
    return data[0].shape[-1] if name in SIZED else None


def meta_model(which: str, name: str, cfg) -> torch.nn.Module:
    """pydl.models.create(name) (``which`` "pydl") or timm.create_model(name) ("ref"), no storage;
    ``cfg``: ``model_config``'s image size."""
    if which == "pydl":
        import pydl.models

        with torch.device("meta"):
            return pydl.models.create(name, num_classes=NUM_CLASSES)
    kw = {"img_size": cfg} if cfg is not None else {}
    with torch.device("meta"):
        return _timm().create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kw)


@functools.lru_cache(maxsize=None)
def param_names(name: str, cfg=None) -> tuple:
    """timm's parameter names, in the inputs' order (the same for every image size)."""
    return tuple(n for n, _ in meta_model("ref", name, None).named_parameters())


def grad_names(name: str) -> tuple:
    return ("dx",) + tuple("d" + n for n in param_names(name))


def binding(which: str, names: tuple) -> list:
    """[(the model's parameter name, transposed?)]: pydl's and timm's names agree."""
    return [(n, False) for n in names]


def forward(which: str, mod: torch.nn.Module, data: tuple, params: dict) -> tuple:
    return (torch.func.functional_call(mod, params, data),)


def amp_dtype(data: tuple) -> torch.dtype:
    return data[0].dtype


def make_inputs(name: str, sh, dtype: torch.dtype, device: torch.device, seed: int, train: bool):
    """(x, *parameters), (dlogits,) for train ops else (). x (B, 3, S, S) in ``dtype``; parameters
    float32, the timm model's randomised (``pydl.models._common.randomize_``), 4-D ones channels_last
    when cl = 1."""
    from pydl.models._common import randomize_

    b, s, cl = dims(sh)
    g = torch.Generator().manual_seed(seed)
    model = randomize_(meta_model("ref", name, s if name in SIZED else None).to_empty(device="cpu"), g)
    fmt = torch.channels_last if cl else torch.contiguous_format
    params = [p.detach().to(device).contiguous(memory_format=fmt if p.dim() == 4 else torch.contiguous_format)
              for p in model.parameters()]
    x = torch.randn(b, 3, s, s, generator=g).to(device=device, dtype=dtype).contiguous(memory_format=fmt)
    grads = (torch.randn(b, NUM_CLASSES, generator=g).to(device=device, dtype=dtype),) if train else ()
    return (x, *params), grads


@functools.lru_cache(maxsize=None)
def flops_per_image(name: str, s: int) -> int:
    """Forward FLOPs of one (3, s, s) image (2 per multiply-add), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    model = meta_model("ref", name, s if name in SIZED else None).eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.empty(1, 3, s, s, device="meta"))
    return int(fc.get_total_flops())


def flops(name: str, sh) -> int:
    """Forward FLOPs of one call: B images."""
    b, s, _ = dims(sh)
    return b * flops_per_image(name, s)
