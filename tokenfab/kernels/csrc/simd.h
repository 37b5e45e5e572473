// SIMD helpers shared by the kernel files (each includes this inside its own translation unit). The library is
// built once per ISA level (tokenfab/platform/cpu_isa.py); code that differs by level tests the compiler's macros
// here and computes the same numbers on every level.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace tf {

// Sum of four adjacent u8 x s8 products per 32-bit lane, exact: vpdpbusd where the level has VNNI, else maddubs and
// madd (which never saturate for the operands used here: |u| <= 128, |s| <= 127, pairs of at most 32512).
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// The unsigned-x form of a signed u8 x s8 dot product (512-bit VNNI paths): with x taken as x + 128 (a xor of
// 0x80), a lane started from -128 times the sum of its four weights ends at exactly sum(x * w). These are the start
// values of int8 weights w; x + 128 = 0x80 ^ x per byte.
inline __m512i minus_128_sums(__m512i w) {
  const __m512i zero = _mm512_setzero_si512();
  return _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, _mm512_set1_epi8(static_cast<char>(0x80)), w));
}
#endif

inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// e^x for fp32 lanes (Cephes' polynomial, as in avx_mathfun): about 1 ulp on [-88, 88], clamped outside.
inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)), _mm256_set1_ps(88.3762626647949f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

// out = x / sqrt(mean(x^2) + eps) * w over one row; out may be x (the row is read whole before it is written).
inline void rmsnorm_row(const float* x, const float* w, float* out, int64_t dim, float eps) {
  __m256 acc = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= dim; k += 8) {
    __m256 v = _mm256_loadu_ps(x + k);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  float ss = hsum(acc);
  for (; k < dim; ++k) ss += x[k] * x[k];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(dim) + eps);
  const __m256 iv = _mm256_set1_ps(inv);
  for (k = 0; k + 8 <= dim; k += 8)
    _mm256_storeu_ps(out + k, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k), iv), _mm256_loadu_ps(w + k)));
  for (; k < dim; ++k) out[k] = x[k] * inv * w[k];
}

// At least n elements of the calling thread's buffer `Tag`, kept between calls: a fresh allocation of a batch's
// size would fault in zeroed pages on every call (measured: 14 % of a 512-row int8 product, 23 % of a 1024-token
// prefill). A buffer grows, never shrinks, and callers write every element they read. Tags are unique across the
// library (cpu_kernels.cpp 0-6 per type, attention_kernels.cpp 10-18, gguf_kernels.cpp 20).
template <class T, int Tag>
T* reusable(size_t n) {
  static thread_local std::vector<T> buffer;
  if (buffer.size() < n) buffer.resize(n);
  return buffer.data();
}

}  // namespace tf
