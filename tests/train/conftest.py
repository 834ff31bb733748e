"""tests/train: helpers to run ``python -m pydl.train`` in-process (importing torch once)."""

from __future__ import annotations

import json
from pathlib import Path


def run_cli(args: list[str]) -> int:
    from pydl.train.__main__ import main

    return main([*args, "--threads", "1", "--progress", "off", "-q"])


def read_metrics(out: Path) -> dict:
    return json.loads((Path(out) / "metrics.json").read_text())
