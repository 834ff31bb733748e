"""Helpers shared by the Triton kernels of every op.

Loops with runtime bounds: ``for i in _range(start, stop, step)``.
Compiled, ``_range`` is ``tl.range``, which the code generator lowers exactly like the builtin
``range`` (one scf.for over the same bounds; no pipelining/unrolling hints), so the kernels'
code is unchanged. Under the Triton interpreter it is a Python ``range`` over the bounds'
integer values: Triton 3.6's interpreter turns a scalar bound into an int with ``int()`` of
its shape-(1,) NumPy array, which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be
converted to Python scalars"; fixed in Triton 3.7). ``@triton.jit`` picks interpreter or
compiler from the same knob when the kernels are defined.
"""

import triton
import triton.language as tl


def _interpreter_int(v) -> int:
    handle = getattr(v, "handle", None)  # an interpreted tl.tensor: a 1-element NumPy array
    return int(handle.data.item()) if handle is not None else int(v)


def _interpreter_range(start, stop, step=1):
    return range(_interpreter_int(start), _interpreter_int(stop), _interpreter_int(step))


INTERPRETING = bool(triton.knobs.runtime.interpret)

_range = _interpreter_range if INTERPRETING else tl.range
