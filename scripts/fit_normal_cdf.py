"""Fits the rational approximation of the standard normal CDF used by the CPU GELU kernels.

    Phi(z) - 1/2 ~= z * P(z^2) / Q(z^2),  |z| <= Z  (z is clamped to [-Z, Z] first),

with P of degree 5, Q of degree 5 and Q(0) = 1, by linearized least squares with Lawson-style
reweighting toward the minimax (absolute error) solution; the fit runs in the scaled variable
v = (z / Z)^2 and the printed coefficients are for z^2 directly. Prints the C++ constants
of csrc/cpu/vec_math.h and the float32 GELU error of that form against float64 (next to
torch's own float32 F.gelu error). Needs numpy and torch; run: python scripts/fit_normal_cdf.py
"""

from __future__ import annotations

import math

import numpy as np
import torch

Z = 5.5  # Phi(-5.5) = 1.9e-8: below half an ulp of 1/2, so clamping costs < 1.1e-7 of |gelu|
DEG_P, DEG_Q = 5, 5


def fit(deg_p: int, deg_q: int, iters: int = 60) -> tuple[np.ndarray, np.ndarray, float]:
    z = np.linspace(0.0, Z, 40001)
    y = np.array([0.5 * math.erf(t / math.sqrt(2.0)) for t in z])  # Phi(z) - 1/2
    v = (z / Z) ** 2
    weight, q_prev = np.ones_like(z), np.ones_like(z)
    for _ in range(iters):
        # z * P(v) - y * Q(v) = 0 is linear in (p_0..p_dp, q_1..q_dq), with q_0 = 1.
        cols = [z * v**k for k in range(deg_p + 1)] + [-y * v**k for k in range(1, deg_q + 1)]
        a = np.stack(cols, axis=1)
        w = weight / q_prev
        coef, *_ = np.linalg.lstsq(a * w[:, None], y * w, rcond=None)
        p, q = coef[: deg_p + 1], np.concatenate([[1.0], coef[deg_p + 1 :]])
        q_prev = np.polyval(q[::-1], v)
        err = z * np.polyval(p[::-1], v) / q_prev - y
        weight = weight * np.sqrt(np.abs(err) + 1e-30)
        weight /= weight.max()
    scale = np.array([Z ** (-2 * k) for k in range(max(deg_p, deg_q) + 1)])
    return p * scale[: deg_p + 1], q * scale[: deg_q + 1], float(np.abs(err).max())


def gelu_float32(z: np.ndarray, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The kernel's float32 evaluation order (Horner in z^2, one division)."""
    f = np.float32
    zc = np.clip(z, f(-Z), f(Z))
    u = zc * zc
    num, den = f(p[-1]), f(q[-1])
    for c in p[-2::-1]:
        num = num * u + f(c)
    for c in q[-2::-1]:
        den = den * u + f(c)
    return z * (f(0.5) + zc * (num / den))


def main() -> None:
    p, q, fit_err = fit(DEG_P, DEG_Q)
    z = np.linspace(-10.0, 10.0, 400001).astype(np.float32)
    z64 = z.astype(np.float64)
    ref = z64 * 0.5 * np.array([math.erfc(-t / math.sqrt(2.0)) for t in z64])
    ours = gelu_float32(z, p, q).astype(np.float64)
    theirs = torch.nn.functional.gelu(torch.from_numpy(z)).double().numpy()
    for name, out in (("rational", ours), ("torch F.gelu", theirs)):
        err = np.abs(out - ref)
        print(f"{name:13s} float32 gelu: max |err| {err.max():.2e}, "
              f"max |err| / (1 + |z|) {(err / (1 + np.abs(z64))).max():.2e}")
    print(f"fit error of Phi - 1/2 (float64): {fit_err:.2e}")
    print(f"constexpr float kCdfClamp = {Z}f;")
    print("P (z^2 power 0..):", ", ".join(f"{c:.9e}f" for c in p))
    print("Q (z^2 power 0..):", ", ".join(f"{c:.9e}f" for c in q))


if __name__ == "__main__":
    main()
