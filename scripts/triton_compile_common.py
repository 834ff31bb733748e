"""What the sm_90 Triton compile checks (scripts/check_triton_compile*.py) share: the compile
environment, one kernel's compile with Triton's own ``ptxas -v`` log read back, and for the
companions of check_triton_compile.py (one table of launch configurations per kernel family) their
command line, report table and exit status.

Import it before triton: it drops TRITON_INTERPRET (compile, not interpret) and points Triton at a
private, empty cache, so every kernel is really compiled and its ptxas log (with the ptxas options
Triton uses) is there to read for every configuration. ``run_and_clean_up`` removes that cache.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import io
import os
import re
import shutil
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compile, not interpret
CACHE_DIR = tempfile.mkdtemp(prefix="pydl-triton-compile-")
os.environ["TRITON_CACHE_DIR"] = CACHE_DIR

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

MAX_SMEM = 227 * 1024  # sm_90: dynamic shared memory per block (opt-in)
REGS_PER_SM = 64 * 1024

_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill": re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads"),
}


def torch_dtype(dt: str):
    """The torch dtype of a Triton pointer type name: "bf16", "fp16" or "fp32"."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt]


def _ptx_code(ptx: str) -> str:
    """The PTX without debug info (line numbers, file names): only the code, to compare."""
    code = re.split(r"^\s*\.section\s+\.debug", ptx, maxsplit=1, flags=re.M)[0]
    return "\n".join(l for l in code.splitlines() if not l.lstrip().startswith((".loc", ".file", "//"))) + "\n"


def compile_into(res: dict, fn, signature, num_warps: int, num_stages: int | None = None,
                 ptx_path: str | None = None) -> dict:
    """Compiles the Triton kernel ``fn`` for ``GPUTarget("cuda", 90, 32)`` and records the outcome
    in ``res`` (returned; never raises): ok=True with regs, spill_st, spill_ld, spill (their sum)
    and smem, or ok=False with error; and secs. ``signature()`` gives (signature, constexprs,
    attrs) as ``ASTSource`` takes them (called inside the try: its errors are reported too);
    ``num_stages`` None: Triton's default; ``ptx_path``: where to write the PTX without debug info."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    try:
        sig, consts, attrs = signature()
        options = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps,
                                                                        "num_stages": num_stages}
        # Triton runs `ptxas -v` itself (with its own options); this knob prints that log
        triton.knobs.nvidia.dump_ptxas_log = True
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                                    target=GPUTarget("cuda", 90, 32), options=options)
        log = out.getvalue()
        regs = _PTXAS_RE["regs"].search(log)
        if not regs:
            raise RuntimeError("no ptxas log (was the kernel taken from a cache?)")
        spill = _PTXAS_RE["spill"].search(log)
        spill_st, spill_ld = int(spill.group(1)), int(spill.group(2))
        res.update(ok=True, regs=int(regs.group(1)), spill_st=spill_st, spill_ld=spill_ld,
                   spill=spill_st + spill_ld, smem=int(kernel.metadata.shared))
        if ptx_path:
            os.makedirs(os.path.dirname(ptx_path) or ".", exist_ok=True)
            with open(ptx_path, "w") as f:
                f.write(_ptx_code(kernel.asm["ptx"]))
    except Exception as e:  # noqa: BLE001 - reported, and the exit status says so
        res.update(ok=False, error=f"{type(e).__name__}: {e}")
    res["secs"] = time.perf_counter() - t0
    return res


def companion_main(argv, *, doc: str, family: str, all_help: str, configs, compile_one,
                   launch_fields: str) -> int:
    """The main of a companion check: ``--all`` (``all_help``), ``--strict``, ``-j N``; compiles
    ``configs(full)`` with ``compile_one(cfg)`` (a result of compile_into() with ``id`` and
    ``launch``, the launcher's config: a tuple with num_warps) in N processes and prints one row per
    configuration (``launch_fields`` names the launch tuple's fields) and the summary. Exit status 1
    when a compile fails, shared memory exceeds sm_90's or registers x threads exceed the register
    file, or (--strict) a kernel spills."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--all", action="store_true", help=all_help)
    ap.add_argument("--strict", action="store_true", help="fail when a kernel spills")
    ap.add_argument("-j", "--jobs", type=int, default=2)
    args = ap.parse_args(argv)
    import triton

    cfgs = configs(args.all)
    print(f"triton {triton.__version__}: compiling {len(cfgs)} {family} configurations for sm_90", flush=True)
    with cf.ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(compile_one, cfgs))
    bad = spilled = 0
    print(f"{'regs':>5} {'spill':>6} {'smem':>7} {'secs':>5}  config ({launch_fields})")
    for r in results:
        if not r["ok"]:
            bad += 1
            print(f"COMPILE FAILED  {r['id']}\n    {r['error'][:2000]}")
            continue
        notes = []
        if r["spill"]:
            spilled += 1
            notes.append("<-- spills")
        if r["smem"] > MAX_SMEM or r["regs"] * 32 * r["launch"].num_warps > REGS_PER_SM:
            bad += 1
            notes.append("<-- exceeds sm_90 shared memory or registers: cannot launch")
        print(f"{r['regs']:>5} {r['spill']:>6} {r['smem']:>7} {r['secs']:>5.1f}  {r['id']} "
              f"{tuple(r['launch'])} {' '.join(notes)}")
    print(f"{len(cfgs)} configurations: {bad} failed or over the limits, {spilled} spill")
    return 1 if bad or (args.strict and spilled) else 0


def run_and_clean_up(main) -> None:
    """sys.exit(main()), removing the private Triton cache however it ends."""
    try:
        sys.exit(main())
    finally:
        shutil.rmtree(CACHE_DIR, ignore_errors=True)
