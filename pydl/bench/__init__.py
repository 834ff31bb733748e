"""pydl's microbenchmark harness: ``python -m pydl.bench --help``.

- ``timing``: CUDA-event / wall-clock timing with warm-up, L2 flush, time-boxed samples,
  an inner loop for tiny calls, and interleaved (A/B-round) timing of several providers.
- ``ceilings``: the machine's copy bandwidth and matmul rate, measured in the same run.
- ``core``: the suite declaration (``Suite``, ``Provider``) and everything suites share:
  availability probing, the correctness gate (``gate``), mode timing, re-measuring and flagging
  implausible cells, ``--repeat``.
- ``suites``: one declaration per op family (``suites/layer_norm.py``) and the registry.
- ``report``: the long-format CSV, markdown report, plots and ``--compare``.
- ``progress``: the progress bar (tqdm, or a plain counter).

Importing this package has no side effects and does not import ``pydl.ops``.
"""

# The one place that names the optional extras (matplotlib for plots, tqdm for the bar).
INSTALL_EXTRAS_HINT = "pip install 'pydl-kernels[bench]'"  # the distribution is pydl-kernels (pyproject.toml)

from .timing import Measurement, TimingPolicy, time_fn, time_interleaved  # noqa: E402

__all__ = ["INSTALL_EXTRAS_HINT", "Measurement", "TimingPolicy", "time_fn", "time_interleaved", "main"]


def main(argv=None) -> int:
    from .__main__ import main as _main

    return _main(argv)
