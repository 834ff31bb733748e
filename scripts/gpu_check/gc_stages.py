"""The stage list of scripts/gpu_check.sh: stages.txt (one line per op family) -> ordered stages."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Stages run by phase across all families (the cheapest, most telling checks first).
PHASES = ("cuda", "triton", "check", "memcheck", "racecheck", "bench", "synccheck", "initcheck")
SANITIZERS = ("memcheck", "racecheck", "synccheck", "initcheck")
KEYS = {"tests", "first", "workers", "workload", "cuda", "triton", "check", *SANITIZERS, "bench"}
# pytest selections (pytest_gpu_check.py --gpu-select): names are markers or fixtures.
SELECT = {"cuda": "(cuda and not triton) or (device and not triton)", "triton": "triton",
          "rest": "cuda or triton or device"}
REST_BUDGET_S = 30


@dataclass
class Stage:
    name: str
    kind: str            # env | build | pytest | check | sanitizer | bench
    budget: float
    optional: bool = False
    family: str = ""
    spec: dict = field(default_factory=dict)


def _budget(text: str, where: str) -> tuple:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(\?)?", text)
    if not m:
        raise ValueError(f"{where}: budget {text!r} is not seconds (e.g. 60 or 30?)")
    return float(m.group(1)), bool(m.group(2))


def parse(path: str) -> list:
    """[(family, {key: value})] in file order; raises ValueError naming the line on a bad entry."""
    out = []
    with open(path, encoding="utf-8") as f:
        for no, raw in enumerate(f, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            name, *fields = line.split()
            where = f"{path}:{no}"
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name == "rest":
                raise ValueError(f"{where}: bad family name {name!r}")
            kv = {}
            for item in fields:
                key, sep, value = item.partition("=")
                if not sep or key not in KEYS or not value:
                    raise ValueError(f"{where}: {item!r} is not KEY=VALUE with KEY one of {sorted(KEYS)}")
                kv[key] = value
            out.append((name, kv))
    return out


def expand(families: list) -> list:
    """Stages in phase order; 'rest' (every cuda/triton/device test no family lists) last."""
    stages, covered = [], []
    for phase in PHASES:
        for fam, kv in families:
            where = f"family {fam}"
            tests = [p for p in kv.get("tests", "").split(",") if p]
            if phase == "cuda" and tests:
                covered += [p for p in tests if p not in covered]
            if phase not in kv:
                continue
            if phase == "bench":
                suite, _, b = kv["bench"].rpartition(":")
                if not suite:
                    raise ValueError(f"{where}: bench={kv['bench']!r} must be SUITE:SECONDS")
                budget, opt = _budget(b, where)
                stages.append(Stage(f"{fam}:bench", "bench", budget, opt, fam, {"suite": suite}))
                continue
            budget, opt = _budget(kv[phase], where)
            if phase in ("cuda", "triton"):
                if not tests:
                    raise ValueError(f"{where}: {phase}= needs tests=")
                workers = int(kv.get("workers", "1")) if phase == "triton" else 1
                stages.append(Stage(f"{fam}:{phase}", "pytest", budget, opt, fam,
                                    {"paths": tests, "select": SELECT[phase], "first": kv.get("first"),
                                     "workers": workers, "device_tests": phase == "cuda"}))
            else:
                if "workload" not in kv:
                    raise ValueError(f"{where}: {phase}= needs workload=")
                kind = "check" if phase == "check" else "sanitizer"
                stages.append(Stage(f"{fam}:{phase}", kind, budget, opt, fam,
                                    {"script": kv["workload"], "tool": phase}))
    if covered:
        stages.append(Stage("rest", "pytest", REST_BUDGET_S, True, "",
                            {"paths": ["tests"], "select": SELECT["rest"], "first": None, "workers": 1,
                             "ignore": covered, "empty_ok": True, "device_tests": True}))
    return stages
