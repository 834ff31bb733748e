"""Environment probe of scripts/gpu_check.sh: prints one JSON object on stdout (never raises).

Run in its own process under a timeout, because a broken driver can hang CUDA initialization.
Reports what the run depends on: Python, torch and its CUDA build, whether torch sees the GPU
(and a tiny kernel really runs and gives the right answer), Triton, and the test/build packages.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import sys

PACKAGES = ("torch", "triton", "numpy", "pytest", "hypothesis", "pytest-xdist", "pytest-timeout",
            "pybind11", "cmake", "ninja", "setuptools", "matplotlib")
MODULES = {"hypothesis": "hypothesis", "xdist": "xdist", "pytest_timeout": "pytest_timeout",
           "matplotlib": "matplotlib", "cmake": "cmake", "ninja": "ninja"}


def main() -> int:
    out: dict = {"python": sys.version.split()[0], "executable": sys.executable,
                 "platform": platform.platform(), "cpus": os.cpu_count(),
                 "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"), "packages": {}, "modules": {}}
    for name in PACKAGES:
        try:
            out["packages"][name] = md.version(name)
        except md.PackageNotFoundError:
            out["packages"][name] = None
    import importlib.util

    for key, mod in MODULES.items():
        out["modules"][key] = importlib.util.find_spec(mod) is not None
    try:
        import cmake  # the PyPI wheel: its bin dir holds a cmake binary

        out["cmake_bin_dir"] = getattr(cmake, "CMAKE_BIN_DIR", None)
    except Exception:
        out["cmake_bin_dir"] = None
    try:
        import ninja

        out["ninja_bin_dir"] = getattr(ninja, "BIN_DIR", None)
    except Exception:
        out["ninja_bin_dir"] = None
    try:
        import torch
    except Exception as exc:
        out["torch_error"] = f"{type(exc).__name__}: {exc}"
        print(json.dumps(out))
        return 0
    out["torch"] = torch.__version__
    out["torch_cuda"] = torch.version.cuda
    try:
        out["cuda_available"] = bool(torch.cuda.is_available())
        out["device_count"] = int(torch.cuda.device_count())
    except Exception as exc:
        out["cuda_available"], out["device_count"] = False, 0
        out["cuda_error"] = f"{type(exc).__name__}: {exc}"
    devices = []
    for i in range(out["device_count"] if out["cuda_available"] else 0):
        try:
            p = torch.cuda.get_device_properties(i)
            devices.append({"name": p.name, "cc": f"{p.major}.{p.minor}", "major": p.major, "minor": p.minor,
                            "sms": p.multi_processor_count, "mem_gib": round(p.total_memory / 2**30, 1),
                            "l2_mib": round(getattr(p, "L2_cache_size", 0) / 2**20, 1)})
        except Exception as exc:
            devices.append({"error": f"{type(exc).__name__}: {exc}"})
    out["devices"] = devices
    if out["cuda_available"] and out["device_count"] > 0:
        try:  # a kernel must run and give the right answer (a driver mismatch fails here)
            x = torch.arange(1 << 20, device="cuda", dtype=torch.float32)
            got = float(x.sum().item())
            torch.cuda.synchronize()
            want = float((1 << 20) * ((1 << 20) - 1) / 2)
            out["kernel_test"] = "ok" if abs(got - want) <= 1e-6 * want else f"wrong sum {got} != {want}"
        except Exception as exc:
            out["kernel_test"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception as exc:
        out["triton"] = None
        out["triton_error"] = f"{type(exc).__name__}: {exc}"
    if os.environ.get("GPU_CHECK_PROBE_PYDL") == "1":  # dry runs: the in-place build as it is
        try:
            from pydl.__main__ import collect_info

            out["pydl_info"] = {k: str(v) for k, v in collect_info().items()}
        except Exception as exc:
            out["pydl_info"] = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
