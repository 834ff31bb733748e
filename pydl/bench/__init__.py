"""pydl's microbenchmark harness: ``python -m pydl.bench --help``.

- ``timing``: CUDA-event / wall-clock timing with warm-up, L2 flush and time-boxed reps.
- ``ceilings``: the machine's copy bandwidth and matmul rate, measured in the same run.
- ``suites``: one module per op family (``suites/layer_norm.py``) and the registry.
- ``report``: the long-format CSV, markdown report, plots and ``--compare``.

Importing this package has no side effects and does not import ``pydl.ops``.
"""

from .timing import Measurement, TimingPolicy, time_fn

__all__ = ["Measurement", "TimingPolicy", "time_fn", "main"]


def main(argv=None) -> int:
    from .__main__ import main as _main

    return _main(argv)
