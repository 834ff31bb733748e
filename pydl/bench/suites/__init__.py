"""Suite registry and the types a suite speaks in.

A suite is a module with ``NAME``, ``PROVIDERS`` (names, baselines included), ``OPS`` and
``run(cfg: SuiteConfig) -> list[Record]``. It times its ops and returns raw records; the
derived metrics (GB/s, % of ceiling, speed-ups) are filled in by ``pydl.bench.report``.
Suites are imported lazily, so a broken suite cannot break the others or the CLI.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, Optional

import torch

from ..timing import Measurement, TimingPolicy

# name -> module path; add a line per suite.
_SUITES = {
    "layer_norm": "pydl.bench.suites.layer_norm",
}

TIME_LIMIT_NOTE = "not run: --time-limit-s reached"

# Record.status values.
OK, MISMATCH, SKIPPED, ERROR = "ok", "mismatch", "skipped", "error"
STATUSES = (OK, MISMATCH, SKIPPED, ERROR)

EAGER, COMPILE = "torch-eager", "torch-compile"  # the baseline providers every suite names so


@dataclass
class SuiteConfig:
    device: torch.device
    dtypes: list                      # torch.dtype
    modes: list                       # subset of ("fwd", "bwd", "fwd+bwd")
    quick: bool
    policy: TimingPolicy
    shapes: Optional[list] = None     # override: list of tuples, e.g. [(M, N), ...]
    providers: Optional[list] = None  # filter: provider names to run (others not listed at all)
    ops: Optional[list] = None        # filter: op names to run
    log: Callable[[str], None] = field(default=lambda msg: None)
    seed: int = 0
    deadline: Optional[float] = None  # time.monotonic() after which remaining points are skipped

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


@dataclass
class Record:
    """One measured (or refused) point: op x provider x mode x shape x dtype on one device."""

    op: str
    provider: str
    mode: str
    shape: str                 # "MxN"
    dtype: str                 # "bfloat16"
    device: str                # "cuda" / "cpu"
    bytes_moved: int           # the op's minimal traffic (see the suite's byte formulas)
    status: str = OK
    note: str = ""
    measurement: Optional[Measurement] = None


def names() -> list:
    return list(_SUITES)


def get(name: str) -> ModuleType:
    if name not in _SUITES:
        raise KeyError(f"unknown suite {name!r}; known: {', '.join(_SUITES)}")
    return importlib.import_module(_SUITES[name])
