"""Suite registry (and, re-exported from ``pydl.bench.core``, the types a suite speaks in).

A suite is a module that defines ``SUITE``, a ``pydl.bench.core.Suite`` declaration: its ops,
shapes, work formula, providers, inputs, output names and tolerances. ``core.run(SUITE, cfg)``
(or ``SUITE.run(cfg)``) probes, gates, times and returns raw records; the derived metrics
(GB/s, % of ceiling, speed-ups) are filled in by ``pydl.bench.report``.
Suites are imported lazily, so a broken suite cannot break the others or the CLI.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..core import (COMPILE, EAGER, ERROR, MISMATCH, MODES, OK, SKIPPED, STATUSES,  # noqa: F401
                    TIME_LIMIT_NOTE, Provider, Record, Suite, SuiteConfig, Unsupported)

# name -> module path; add a line per suite.
_SUITES = {
    "layer_norm": "pydl.bench.suites.layer_norm",
    "overhead": "pydl.bench.suites.overhead",
    "attention": "pydl.bench.suites.attention",
    "decode_attention": "pydl.bench.suites.decode_attention",
    "depthwise_conv2d": "pydl.bench.suites.depthwise_conv2d",
    "beam_search": "pydl.bench.suites.beam_search",
    "generate": "pydl.bench.suites.generate",
    "conv2d": "pydl.bench.suites.conv2d",
    "models": "pydl.bench.suites.models",
}


def names() -> list:
    return list(_SUITES)


def get(name: str) -> ModuleType:
    if name not in _SUITES:
        raise KeyError(f"unknown suite {name!r}; known: {', '.join(_SUITES)}")
    return importlib.import_module(_SUITES[name])
