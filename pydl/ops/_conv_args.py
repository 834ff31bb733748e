"""Argument forms shared by the convolution ops (``conv2d``, ``depthwise_conv2d``).

``F.conv2d`` takes stride / dilation as an int or a pair, and padding as an int, a pair, ``"valid"``
(no padding) or ``"same"`` (stride 1 only: output size = input size; a total of dil*(k-1) per dim,
``total // 2`` before and the rest — one more for an odd total — after, as torch pads it).
:func:`conv_geometry` turns them into one tuple the kernels take:

    (sh, sw, pad_top, pad_bottom, pad_left, pad_right, dh, dw)
"""

from __future__ import annotations

from typing import Sequence, Union

Geometry = tuple  # (sh, sw, pad_top, pad_bottom, pad_left, pad_right, dh, dw)
Padding = Union[int, Sequence[int], str]


def _pair(op: str, name: str, value, minimum: int) -> tuple:
    """(a, b) from an int or a length-2 sequence of ints, each >= minimum; else TypeError/ValueError."""
    if isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        pair = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) in (1, 2):
        pair = tuple(value) * (2 if len(value) == 1 else 1)
        if any(isinstance(v, bool) or not isinstance(v, int) for v in pair):
            raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    else:
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    if pair[0] < minimum or pair[1] < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value!r}")
    return pair


def conv_geometry(op: str, kernel_hw: Sequence[int], stride, padding: Padding, dilation) -> Geometry:
    """The kernels' geometry tuple for F.conv2d-style stride / padding / dilation arguments."""
    sh, sw = _pair(op, "stride", stride, 1)
    dh, dw = _pair(op, "dilation", dilation, 1)
    if isinstance(padding, str):
        if padding == "valid":
            return (sh, sw, 0, 0, 0, 0, dh, dw)
        if padding != "same":
            raise ValueError(f"{op}: padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
        if sh != 1 or sw != 1:
            raise ValueError(f"{op}: padding='same' is not supported for strided convolutions (stride={stride!r})")
        th, tw = dh * (kernel_hw[0] - 1), dw * (kernel_hw[1] - 1)
        return (1, 1, th // 2, th - th // 2, tw // 2, tw - tw // 2, dh, dw)
    ph, pw = _pair(op, "padding", padding, 0)
    return (sh, sw, ph, ph, pw, pw, dh, dw)


def conv_output_hw(op: str, input_hw: Sequence[int], kernel_hw: Sequence[int], g: Geometry) -> tuple:
    """(Ho, Wo) of a convolution; ValueError when the (padded) input is smaller than the kernel's span."""
    sh, sw, pt, pb, pl, pr, dh, dw = g
    ho = (input_hw[0] + pt + pb - dh * (kernel_hw[0] - 1) - 1) // sh + 1
    wo = (input_hw[1] + pl + pr - dw * (kernel_hw[1] - 1) - 1) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"{op}: the padded input ({input_hw[0] + pt + pb} x {input_hw[1] + pl + pr}) is smaller "
                         f"than the dilated kernel ({dh * (kernel_hw[0] - 1) + 1} x {dw * (kernel_hw[1] - 1) + 1})")
    return ho, wo


def symmetric_padding(g: Geometry):
    """(ph, pw) when the padding is symmetric (F.conv2d takes it as is), else None (pad first)."""
    _, _, pt, pb, pl, pr, _, _ = g
    return (pt, pl) if pt == pb and pl == pr else None
