"""Importing timm / transformers next to a CPU torch (tests and the benchmark suites only; pydl
itself never imports either).

timm imports torchvision. A torchvision wheel built for another torch (the registry's is built
for the CUDA torch) cannot load its native library ``torchvision/_C.so`` against the CPU torch,
and its import then dies registering fake kernels for ``torchvision::nms`` / ``torchvision::qnms``,
ops that were never defined. ``import_timm()`` tries to load that library first; only if it does
not load are the two schemas defined (torchvision's own signatures), so the Python side imports
and timm's models (which never call those ops) work.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os

import torch

_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor",
}
_LIBS: list = []  # keep the torch.library.Library objects alive


def _prepare_torchvision() -> None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    libs = glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so"))
    try:
        if libs:
            torch.ops.load_library(libs[0])
            return
    except OSError:
        pass
    missing = [n for n in _SCHEMAS if not torch._C._jit_get_schemas_for_operator(f"torchvision::{n}")]
    if missing:
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for name in missing:
            lib.define(name + _SCHEMAS[name])
        _LIBS.append(lib)


def import_timm():
    """``import timm`` (raises ImportError when it is not installed), torchvision made importable first."""
    if importlib.util.find_spec("timm") is None:
        raise ImportError("timm is not installed (pip install timm torch==<your torch>)")
    if "torchvision" not in __import__("sys").modules:
        _prepare_torchvision()
    return importlib.import_module("timm")


def import_transformers():
    """``import transformers`` (ImportError when it is not installed), torchvision made importable
    first (transformers probes it for its image utilities)."""
    if importlib.util.find_spec("transformers") is None:
        raise ImportError("transformers is not installed (pip install transformers torch==<your torch>)")
    if "torchvision" not in __import__("sys").modules:
        _prepare_torchvision()
    return importlib.import_module("transformers")
