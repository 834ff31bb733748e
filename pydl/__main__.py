"""``python -m pydl info``: what was built and which backend each op would use here."""

from __future__ import annotations

import argparse
import json
import sys


def collect_info() -> dict:
    import torch

    from . import _native, backends
    from ._version import __version__
    from .ops.layer_norm import choose_backend

    native = _native.info()
    facts = {
        "pydl": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "native_core": "ok" if native["native"] else native["error"],
        "cuda_kernels_built": native["cuda_built"],
        "cuda_archs": native["cuda_archs"] or "-",
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "triton": "installed" if backends.triton_importable() else "not installed",
        "cpu_threads": torch.get_num_threads(),
    }
    facts["PYDL_BACKEND"] = backends.env_problem() or backends.env_backend() or "unset (automatic choice)"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    probe = torch.empty((1, 1024), device=device, dtype=dtype)
    label = f"layer_norm backend ({device}, {str(dtype).replace('torch.', '')})"
    try:
        facts[label] = choose_backend(probe)
    except (ValueError, backends.BackendError) as exc:  # e.g. a bad $PYDL_BACKEND: say it, don't crash
        facts[label] = f"none: {exc}"
    return facts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pydl", description=__doc__)
    parser.add_argument("command", choices=["info"], help="info: report the build and backends")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    facts = collect_info()
    if args.json:
        print(json.dumps(facts, indent=2))
    else:
        width = max(len(k) for k in facts)
        for key, value in facts.items():
            print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
