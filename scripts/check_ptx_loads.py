#!/usr/bin/env python3
"""Fails when a kernel reads memory it also writes through the non-coherent (read-only) path.

`ld.global.nc` (and `ldu`) may only read memory that no thread writes while the kernel runs
(PTX ISA, "ld.global.nc"); nvcc emits it for loads it believes read-only, e.g. through
`const T* __restrict__` parameters, and a wrong belief is undefined behaviour that neither the
tests nor compute-sanitizer can see (the stale value usually just happens to be right).

For every `.entry` of a PTX file a flow-insensitive taint analysis tracks which kernel
parameters each register's value derives from (through arithmetic, cvta, mov, selp, ...; not
through comparisons, predicates or loaded values). A parameter whose derived addresses are
stored to (st / red / atom on global or generic memory) is *written*; a `.nc` / `ldu` load
whose address derives from a written parameter is reported, and the exit status is 1. Only
pointer parameters count (those nvcc converts to global addresses with cvta): sizes, strides
and by-value structs reach every address of a kernel through arithmetic.

  --expect-coherent REGEX:PARAM   every entry whose (mangled) name matches REGEX must also
      have a coherent (not .nc) load whose address derives from parameter PARAM (0-based):
      proof that the analysis sees the loads it is meant to check (repeatable).

usage: check_ptx_loads.py [--expect-coherent REGEX:PARAM ...] FILE.ptx ...
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys

_ENTRY = re.compile(r"^\s*(?:\.visible\s+|\.weak\s+)?\.entry\s+([\w$]+)\s*\(")
_PARAM = re.compile(r"_param_(\d+)\b")
_REG = re.compile(r"%[A-Za-z_$][\w$]*")
_ADDR = re.compile(r"\[([^\]]*)\]")
_NO_TAINT_OPS = ("setp", "set", "bra", "bar", "barrier", "ret", "exit", "membar", "fence",
                 "call")  # comparisons, control flow, barriers, calls


def _split_operands(text: str) -> list:
    """'a, {b, c}, [d+4]' -> ['a', '{b, c}', '[d+4]'] (commas inside {} / [] kept)."""
    out, depth, cur = [], 0, []
    for ch in text:
        if ch in "{[(":
            depth += 1
        elif ch in "}])":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if cur and "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def parse_entries(ptx: str):
    """{entry name: [(line number, opcode, operands)]} for every kernel of the file."""
    entries, name, body, in_body = {}, None, None, False
    for lineno, raw in enumerate(ptx.splitlines(), 1):
        line = raw.split("//", 1)[0].rstrip()
        m = _ENTRY.match(line)
        if m:
            name, body, in_body = m.group(1), [], False
            entries[name] = body
            continue
        if name is None:
            continue
        if not in_body:
            in_body = line.strip() == "{"
            continue
        if line == "}":  # the entry's closing brace is the only one at column 0
            name = None
            continue
        for stmt in line.split(";"):
            stmt = stmt.strip()
            if not stmt or stmt.endswith(":") or stmt.startswith((".", "{", "}")):
                continue
            if stmt.startswith("@"):  # guard predicate: not data
                stmt = stmt.split(None, 1)[1] if " " in stmt or "\t" in stmt else ""
            parts = stmt.split(None, 1)
            if parts:
                body.append((lineno, parts[0], _split_operands(parts[1]) if len(parts) > 1 else []))
    return entries


def _space(opcode: str) -> str:
    for sp in (".global", ".shared", ".local", ".param", ".const"):
        if sp in opcode:
            return sp
    return ".generic"


def analyse(instrs):
    """(loads [(line, opcode, params)], written params) of one entry."""
    taint: dict = {}

    def regs_taint(text):
        t = set()
        for r in _REG.findall(text):
            t |= taint.get(r, set())
        return t

    changed = True
    while changed:  # taints only grow: a fixed point is reached
        changed = False
        for _, op, ops in instrs:
            if not ops or op.split(".")[0] in _NO_TAINT_OPS:
                continue
            base = op.split(".")[0]
            if base in ("st", "red") or base.startswith("cp"):
                continue  # no register result
            if base in ("ld", "ldu", "atom"):
                if ".param" in op:
                    new = {int(p) for p in _PARAM.findall(" ".join(ops[1:]))}
                else:
                    continue  # loaded values are data, not addresses of parameters
            else:
                new = regs_taint(" ".join(ops[1:]))
                new |= {int(p) for p in _PARAM.findall(" ".join(ops[1:]))}
            if not new:
                continue
            for r in _REG.findall(ops[0]):
                cur = taint.setdefault(r, set())
                if not new <= cur:
                    cur |= new
                    changed = True

    # Pointer parameters: whole .u64 parameters whose value is converted to a global address
    # (nvcc emits `ld.param.u64 %rd, [P]; cvta.to.global.u64 %rd2, %rd`) or used as one. Sizes,
    # strides and by-value structs also reach addresses, but only through arithmetic.
    direct = {}  # register -> parameter it was loaded from, unchanged
    for _, op, ops in instrs:
        if op.startswith("ld.param.u64") and len(ops) == 2:
            m = re.fullmatch(r"\[[\w$]*_param_(\d+)\]", ops[1].replace(" ", ""))
            if m:
                direct[ops[0]] = int(m.group(1))
    pointers = set()
    for _, op, ops in instrs:
        if op.startswith("cvta") and len(ops) == 2 and ops[1] in direct:
            pointers.add(direct[ops[1]])
        for o in ops:
            a = _ADDR.fullmatch(o.replace(" ", ""))
            if a and a.group(1).split("+")[0] in direct and not op.startswith("ld.param"):
                pointers.add(direct[a.group(1).split("+")[0]])

    loads, written = [], set()
    for lineno, op, ops in instrs:
        base = op.split(".")[0]
        if base not in ("ld", "ldu", "st", "red", "atom"):
            continue
        if _space(op) not in (".global", ".generic"):
            continue
        addr = next((m.group(1) for o in ops for m in [_ADDR.search(o)] if m), None)
        if addr is None:
            continue
        params = (regs_taint(addr) | {int(p) for p in _PARAM.findall(addr)}) & pointers
        if base in ("st", "red", "atom"):
            written |= params
        if base in ("ld", "ldu", "atom"):
            loads.append((lineno, op, params))
    return loads, written


def _demangle(names):
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True,
                         text=True).stdout.splitlines()
    short = [re.sub(r"\(.*\)$", "", o.replace("(anonymous namespace)::", "")).replace("void ", "")
             for o in out]
    return dict(zip(names, short)) if len(short) == len(names) else {n: n for n in names}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ptx", nargs="+")
    ap.add_argument("--expect-coherent", action="append", default=[], metavar="REGEX:PARAM")
    args = ap.parse_args(argv)
    expects = []
    for e in args.expect_coherent:
        pattern, _, idx = e.rpartition(":")
        expects.append((re.compile(pattern), int(idx)))

    status, n_entries, n_nc = 0, 0, 0
    for path in args.ptx:
        with open(path) as f:
            entries = parse_entries(f.read())
        names = _demangle(list(entries))
        for entry, instrs in entries.items():
            n_entries += 1
            loads, written = analyse(instrs)
            nc = [(l, op, p) for l, op, p in loads if ".nc" in op or op.startswith("ldu")]
            n_nc += len(nc)
            bad = [(l, op, sorted(p & written)) for l, op, p in nc if p & written]
            if bad:
                status = 1
                print(f"NON-COHERENT LOAD OF WRITTEN MEMORY  {names[entry]}: {len(bad)} "
                      f"ld.global.nc / ldu read parameter(s) {sorted({q for b in bad for q in b[2]})}"
                      ", which the kernel also writes; first at " +
                      ", ".join(f"{path}:{l} ({op})" for l, op, _ in bad[:3]))
            for pattern, idx in expects:
                if pattern.search(entry):
                    ok = [l for l, op, p in loads if idx in p and l not in {x[0] for x in nc}]
                    n_bad = sum(idx in p for _, _, p in nc)
                    if not ok:
                        status = 1
                        print(f"EXPECTED A COHERENT LOAD OF PARAMETER {idx}  {names[entry]}: "
                              f"none found ({n_bad} non-coherent)")
                    else:
                        print(f"ok  {names[entry]}: {len(ok)} coherent loads of parameter "
                              f"{idx}, {n_bad} non-coherent")
    print(f"check_ptx_loads: {n_entries} kernels, {n_nc} non-coherent loads, "
          f"{'FAILED' if status else 'none of them reads memory its kernel writes'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
