"""Shared test setup: Triton interpreter on CPU, per-test seeds, the device under test.

Environment:
  PYDL_TEST_DEVICE   device for the device-generic tests: "cpu" (default) or "cuda".
  PYDL_TEST_SEED     optional salt for the per-test seeds (default: none; seeds are fixed).
  PYDL_TEST_SAMPLE   "edges": of each parametrized test function keep only its first and last
                     runnable parameter sets (CI's second pass of the Triton tests under the
                     Triton floor version: every test function once more, in a fraction of the time).
  PYDL_ATTENTION_AUTOTUNE, PYDL_CONV2D_AUTOTUNE  set to "0" here (table tiles; see
                     pydl/triton/attention.py, pydl/triton/conv2d.py).
  TRITON_INTERPRET   set to "1" here when no CUDA GPU is usable (before anything imports
                     triton), so @pytest.mark.triton tests run the kernels on CPU.
"""

from __future__ import annotations

import os
import random
import zlib

import pytest
import torch  # importing torch does not import triton


def _cuda_usable() -> bool:
    try:
        return bool(torch.cuda.is_available() and torch.cuda.device_count() > 0)
    except Exception:  # broken driver installs raise here; treat as "no GPU"
        return False


CUDA_USABLE = _cuda_usable()
# The attention launchers autotune on a GPU (timing 4 tiles per new shape): the tests use the
# table's tiles, except the test that exercises the autotuner itself.
os.environ.setdefault("PYDL_ATTENTION_AUTOTUNE", "0")
os.environ.setdefault("PYDL_CONV2D_AUTOTUNE", "0")
if not CUDA_USABLE:
    # Must happen before the first `import triton` anywhere in the process.
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:  # hypothesis profiles: deterministic in CI, no example database written into the repo.
    from hypothesis import HealthCheck, Phase, settings

    # CI: fixed examples, and no shrinking (it can cost minutes on a 2-core machine once an
    # example fails); HYPOTHESIS_PROFILE=explore draws new examples and shrinks failures.
    settings.register_profile(
        "pydl", deadline=None, derandomize=True, database=None, print_blob=True,
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile(
        "explore", deadline=None, database=None, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "pydl"))
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    pass


def _triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def pytest_report_header(config):
    dev = os.environ.get("PYDL_TEST_DEVICE", "cpu")
    return (f"pydl tests: device under test={dev}, cuda usable={CUDA_USABLE}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}, "
            f"torch threads={torch.get_num_threads()}")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(
        reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    if not _triton_importable():
        skip_triton = pytest.mark.skip(reason="triton is not installed")
    elif not CUDA_USABLE and not _triton_interpreter_on():
        skip_triton = pytest.mark.skip(
            reason="no CUDA GPU and TRITON_INTERPRET is disabled: Triton kernels cannot run here")
    else:
        skip_triton = None
    for item in items:
        if "cuda" in item.keywords and not CUDA_USABLE:
            item.add_marker(skip_cuda)
        elif "triton" in item.keywords and skip_triton is not None:
            item.add_marker(skip_triton)


@pytest.hookimpl(trylast=True, specname="pytest_collection_modifyitems")  # after -m/-k and the skips above
def pytest_sample_edges(config, items):
    if os.environ.get("PYDL_TEST_SAMPLE", "") != "edges":
        return
    groups: dict = {}
    for item in items:
        if not item.get_closest_marker("skip"):
            groups.setdefault((item.path, item.originalname), []).append(item)
    drop = {id(it) for group in groups.values() for it in group[1:-1]}
    config.hook.pytest_deselected(items=[it for it in items if id(it) in drop])
    items[:] = [it for it in items if id(it) not in drop]


@pytest.fixture(autouse=True)
def _fixed_seed(request):
    """Every test gets its own fixed seed (derived from its node id): reruns are reproducible."""
    salt = os.environ.get("PYDL_TEST_SEED", "")
    seed = zlib.crc32((salt + request.node.nodeid).encode()) & 0x7FFFFFFF
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass
    yield seed


@pytest.fixture
def device() -> torch.device:
    """The device under test for device-generic tests (PYDL_TEST_DEVICE, default cpu)."""
    name = os.environ.get("PYDL_TEST_DEVICE", "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not CUDA_USABLE:
        pytest.skip("PYDL_TEST_DEVICE=cuda but no CUDA GPU is usable")
    return dev


@pytest.fixture
def triton_device() -> torch.device:
    """Where Triton kernels run: the GPU when there is one, else CPU under the interpreter."""
    return torch.device("cuda") if CUDA_USABLE else torch.device("cpu")
