// Branch-free float math that GCC auto-vectorizes inside `#pragma omp simd` loops: exp, the
// normal CDF, tanh, and the GELU forms built on them. libm's erff/expf are scalar calls that
// block vectorization; these are as accurate as torch's own float32 GELU (see normal_cdf).
//
// Every helper is always_inline so that it is compiled for the instruction set of the
// per-ISA function that calls it (see PYDL_ISA_DISPATCH in csrc/cpu/cpu_utils.h).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#define PYDL_INLINE inline __attribute__((always_inline))

namespace pydl {
namespace vmath {

PYDL_INLINE float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof(f));
  return f;
}
PYDL_INLINE int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof(i));
  return i;
}

// e^x for x in [-87, 88] (the callers clamp: 2^n stays a normal float). Range reduction
// x = n*ln2 + r (|r| <= ln2/2, ln2 split in an exact high part and a low part), e^r by its Taylor
// polynomial of degree kDegree (relative error < 6e-9 for 7, < 1.3e-7 for 6), 2^n by building the
// exponent bits. NaN passes.
template <int kDegree>
PYDL_INLINE float exp_in_range(float x) {
  static_assert(kDegree == 6 || kDegree == 7, "e^r: a Taylor polynomial of degree 6 or 7");
  const float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float t = x * 1.44269504088896341f + kRound;
  float n = t - kRound;
  int32_t ni = float_to_bits(t) - float_to_bits(kRound);
  float r = x - n * 0.693145751953125f;  // ln2 high part: exact product for |n| < 2^9
  r = r - n * 1.428606765330187e-06f;    // ln2 low part
  float p;
  if constexpr (kDegree == 7) {
    p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
  } else {
    p = 1.0f / 720.0f;
  }
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // Shift as unsigned: NaN inputs give out-of-range ni, and a signed overflow would be UB.
  return p * bits_to_float(static_cast<int32_t>(static_cast<uint32_t>(ni + 127) << 23));
}

// e^x: exp_in_range<7> with inputs clamped to [-87, 88], and below -87 the result flushed to 0
// (so e^-inf = 0 and inf * e^-inf is NaN, as in libm); NaN passes.
PYDL_INLINE float exp(float x) {
  const bool underflow = x < -87.0f;
  x = underflow ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float e = exp_in_range<7>(x);
  return underflow ? 0.0f : e;
}

constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kGeluTanhCoef = 0.044715f;

// Standard normal CDF as Phi(z) = 1/2 + z * P(z^2) / Q(z^2) on |z| < 5.5, exactly 0 / 1 beyond
// (Phi(-5.5) = 1.9e-8). The degree-5/5 rational is fitted by scripts/fit_normal_cdf.py; in
// float32 the GELU built on it is off by at most 1.8e-7 * (1 + |z|), torch's own float32 GELU
// by 2.6e-7 * (1 + |z|). It costs 10 FMAs and one division, half of an erfc-plus-exp form.
// NaN passes through (every comparison is false); Phi(-inf) = 0, so gelu(-inf) is NaN as in torch.
PYDL_INLINE float normal_cdf(float z) {
  constexpr float kClamp = 5.5f;
  const float zc = z < -kClamp ? -kClamp : (z > kClamp ? kClamp : z);
  const float u = zc * zc;
  float p = 2.274808007e-08f;
  p = p * u + 6.351483357e-06f;
  p = p * u + 1.688006538e-04f;
  p = p * u + 4.677103210e-03f;
  p = p * u + 3.385069709e-02f;
  p = p * u + 3.989422349e-01f;
  float q = 1.197418897e-06f;
  q = q * u + 7.363702680e-05f;
  q = q * u + 1.884305706e-03f;
  q = q * u + 2.864465759e-02f;
  q = q * u + 2.515170364e-01f;
  q = q * u + 1.0f;
  const float cdf = 0.5f + zc * (p / q);
  return z <= -kClamp ? 0.0f : (z >= kClamp ? 1.0f : cdf);
}

PYDL_INLINE float tanh(float u) {
  // 1 - 2 / (e^{2u} + 1): saturates to +-1 without overflow trouble (e^{2u} -> inf gives 1).
  return 1.0f - 2.0f / (exp(2.0f * u) + 1.0f);
}

PYDL_INLINE float gelu(float z) { return z * normal_cdf(z); }

PYDL_INLINE float gelu_grad(float z) {
  return normal_cdf(z) + z * kInvSqrt2Pi * exp(-0.5f * z * z);
}

PYDL_INLINE float gelu_tanh(float z) {
  float u = kSqrt2OverPi * (z + kGeluTanhCoef * z * z * z);
  return 0.5f * z * (1.0f + tanh(u));
}

PYDL_INLINE float gelu_tanh_grad(float z) {
  float u = kSqrt2OverPi * (z + kGeluTanhCoef * z * z * z);
  float t = tanh(u);
  float du = kSqrt2OverPi * (1.0f + 3.0f * kGeluTanhCoef * z * z);
  return 0.5f * (1.0f + t) + 0.5f * z * (1.0f - t * t) * du;
}

// float64 versions (gradcheck precision; scalar libm is fine here).
PYDL_INLINE double gelu(double z) { return 0.5 * z * std::erfc(-z * 0.70710678118654752440); }
PYDL_INLINE double gelu_grad(double z) {
  return 0.5 * std::erfc(-z * 0.70710678118654752440) +
         z * 0.39894228040143267794 * std::exp(-0.5 * z * z);
}
PYDL_INLINE double gelu_tanh(double z) {
  double u = 0.79788456080286535588 * (z + 0.044715 * z * z * z);
  return 0.5 * z * (1.0 + std::tanh(u));
}
PYDL_INLINE double gelu_tanh_grad(double z) {
  double u = 0.79788456080286535588 * (z + 0.044715 * z * z * z);
  double t = std::tanh(u);
  double du = 0.79788456080286535588 * (1.0 + 3.0 * 0.044715 * z * z);
  return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du;
}

}  // namespace vmath
}  // namespace pydl
