// CPU kernels over GGUF's quantized blocks as llama.cpp stores them: y[M, N] = x[M, K] . W[N, K]^T with W rows
// in Q4_0, Q5_0, Q8_0, Q4_K, Q5_K or Q6_K (the file's bytes; Q4_0/Q5_0 rearranged by pairs of blocks, see Pairs),
// x and y float32; W rows -> float32 (exact); and the pair repacking.
//
// x is quantized to int8 per 32 columns (scale max|x| / 127), each row on its own, so a row's result does not
// depend on the rest of the batch. Weight codes are multiplied with it exactly in int32 (unsigned codes times signed
// activations: vpdpbusd on VNNI levels, else maddubs), and the formats' offsets are folded in through sums of the
// int8 activations computed once per call: dx * sum(q) per 32 (the K-quants' -dmin * m, the repacked -8/-16), per
// 16 (Q6_K's -32), or in int16 pairs (the native legacy blocks). One float FMA per 32 weights applies the weight and
// activation scales. Without VNNI each 32 products cost ~4 multiply-pipe instructions, so the kernels are near their
// compute limit when streaming from memory on two cores; the Q8_0 LM head reaches the read ceiling.
// With AVX-512 VNNI, Q8_0 against several rows of x runs 512-bit tiles with the same bits (see q8_0_512).
//
// Decode streams every weight once, NB rows at a time, with software prefetch ahead of the block's progress (see
// PREFETCH_AHEAD in cpu_kernels.cpp for why the hardware prefetcher alone falls short here).
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "simd.h"

namespace {

// Kernel building blocks are forced inline: GCC otherwise keeps some out of line and spills their accumulators.
#define TF_INLINE inline __attribute__((always_inline))

// ggml_type ids of the formats handled here.
enum GgmlType : int { Q4_0 = 2, Q5_0 = 6, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

constexpr int NB = 4;                      // weight rows per task
constexpr int64_t PREFETCH_AHEAD = 8192;   // bytes ahead of a task's progress through its rows
constexpr int64_t CHUNKS_PER_THREAD = 4;   // dynamic schedule: a descheduled thread delays the call by one chunk

using tf::hsum;

inline float fp16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof h);
  return _cvtsh_ss(h);
}

inline __m256i load256(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// 16 bytes of two 4-bit codes -> 32 bytes: the low nibbles (elements 0..15), then the high ones (16..31).
inline __m256i nibbles_32(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), _mm256_set1_epi8(0x0F));
}

// Bit i of a 32-bit word -> byte i all ones or zero (llama.cpp's bytes_from_bits_32).
inline __m256i bytes_from_bits_32(const uint8_t* p) {
  uint32_t bits;
  std::memcpy(&bits, p, sizeof bits);
  const __m256i shuffle = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
  const __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)), shuffle);
  return _mm256_cmpeq_epi8(_mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe)), _mm256_set1_epi64x(-1));
}

// Bit S of every byte moved to bit 4, the rest cleared (Q5_K's fifth bit of sub-block S).
template <int S>
inline __m256i bit_to_4(__m256i h) {
  const __m256i m = _mm256_set1_epi8(0x10);
  if constexpr (S < 4) return _mm256_and_si256(_mm256_slli_epi16(h, 4 - S), m);
  else if constexpr (S == 4) return _mm256_and_si256(h, m);
  else return _mm256_and_si256(_mm256_srli_epi16(h, S - 4), m);
}

// Sum of the 16 int16 lanes' pairs as 8 int32 lanes.
inline __m256i pairs_to_quads(__m256i p16) { return _mm256_madd_epi16(p16, _mm256_set1_epi16(1)); }
// Exact u8 x s8 dot products of 4 bytes per lane, as floats (VNNI where the level has it: tf::dot_u8s8).
inline __m256 dot_float(__m256i u, __m256i s) { return _mm256_cvtepi32_ps(tf::dot_u8s8(u, s)); }

// Q4_K / Q5_K: 6-bit scales and mins of the 8 sub-blocks from their 12 packed bytes (llama.cpp's utmp unpack):
// bytes 0..7 of the result are the scales, 8..15 the mins.
inline void unpack_k_scales(const uint8_t* p, uint32_t out[4]) {
  constexpr uint32_t m1 = 0x3f3f3f3f, m2 = 0x0f0f0f0f, m3 = 0x03030303;
  uint32_t u[3];
  std::memcpy(u, p, 12);
  out[3] = ((u[2] >> 4) & m2) | (((u[1] >> 6) & m3) << 4);
  out[2] = u[1] & m1;
  out[1] = (u[2] & m2) | (((u[0] >> 6) & m3) << 4);
  out[0] = u[0] & m1;
}

inline __m256 u8x8_to_float(const void* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// ---- activations

// One row of x quantized per 32 columns: q = round(x / d) with d = max|x| / 127 over the block. Per block also
// s = d * sum(q) (the K-quants' minimum and the repacked legacy formats' offset), per 16 columns h = d * sum(q)
// over those 16 (Q6_K's offset), and o = 16 * (q[2i] + q[2i+1]) (the native legacy formats' offset).
struct XRow {
  const int8_t* q;
  const float* d;
  const float* s;
  const float* h;
  const int16_t* o;
};

// Float arrays get 8 slack entries at the end: kernels read whole vectors of 8 blocks and zero the lanes past
// a row's end through the weights' side.
struct XBuffers {
  std::vector<int8_t> q;
  std::vector<float> d, s, h;
  std::vector<int16_t> o;
  void reserve(int64_t M, int64_t K) {
    q.resize(M * K + 64);  // + room to start at a cache line
    d.resize(M * (K / 32) + 8);
    s.resize(M * (K / 32) + 8);
    h.resize(M * (K / 16) + 8);
    o.resize(M * (K / 2));
  }
  XRow row(int64_t m, int64_t K) {
    int8_t* base = reinterpret_cast<int8_t*>((reinterpret_cast<uintptr_t>(q.data()) + 63) & ~uintptr_t{63});
    return XRow{base + m * K, d.data() + m * (K / 32), s.data() + m * (K / 32), h.data() + m * (K / 16),
                o.data() + m * (K / 2)};
  }
};

inline int hsum4(__m128i v) {
  v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0x4E));
  v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0xB1));
  return _mm_cvtsi128_si32(v);
}

void quantize_row(const float* x, int64_t K, XRow r) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t j = 0; j < K / 32; ++j) {
    const float* xb = x + j * 32;
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int t = 0; t < 4; ++t) {
      v[t] = _mm256_loadu_ps(xb + 8 * t);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[t]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float a = _mm_cvtss_f32(m4);
    const float scale = a / 127.0f, inv = a > 0.0f ? 127.0f / a : 0.0f;
    const __m256 iv = _mm256_set1_ps(inv);
    __m256i i32[4];
    for (int t = 0; t < 4; ++t) i32[t] = _mm256_cvtps_epi32(_mm256_mul_ps(v[t], iv));  // round half to even
    const __m256i i16 = _mm256_packs_epi32(i32[0], i32[1]), i16b = _mm256_packs_epi32(i32[2], i32[3]);
    const __m256i qv = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(i16, i16b), order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(const_cast<int8_t*>(r.q) + j * 32), qv);
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_set1_epi8(1), qv);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(const_cast<int16_t*>(r.o) + j * 16), _mm256_slli_epi16(pairs, 4));
    const __m256i quads = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));  // lanes 0..3: values 0..15
    const int lo = hsum4(_mm256_castsi256_si128(quads)), hi = hsum4(_mm256_extracti128_si256(quads, 1));
    const_cast<float*>(r.d)[j] = scale;
    const_cast<float*>(r.s)[j] = scale * static_cast<float>(lo + hi);
    const_cast<float*>(r.h)[2 * j] = scale * static_cast<float>(lo);
    const_cast<float*>(r.h)[2 * j + 1] = scale * static_cast<float>(hi);
  }
}

// ---- formats. A format's step<MB, NBK> adds step j of NBK weight rows times MB rows of x into acc[NBK][MB]; a
// step is one block (Q8_0, the K-quants) or a group of 8 blocks (the repacked legacy formats). Every sum lands in
// 8 float lanes that are added up at the end, so terms may go to any lane. Multi-block steps sum into fresh local
// accumulators before touching acc, so consecutive steps do not wait on one another's FMA latency.

// Formats stored block after block as in the file.
template <class Block>
struct Native {
  static constexpr int64_t STEP = Block::QK;
  static int64_t row_bytes(int64_t K) { return K / Block::QK * Block::BYTES; }
  template <int MB, int NBK>
  static TF_INLINE void step(const uint8_t* w, int64_t row_bytes, int64_t, int64_t j, const XRow* x,
                             __m256 (&acc)[NBK][MB]) {
#pragma GCC unroll 4
    for (int jn = 0; jn < NBK; ++jn) Block::template dot<MB>(w + jn * row_bytes + j * Block::BYTES, x, j, acc[jn]);
  }
};

// Q8_0 (d fp16, qs[32] int8), the activations loaded once per block for all NBK rows.
struct Q8_0Rows {
  static constexpr int64_t STEP = 32;
  static int64_t row_bytes(int64_t K) { return K / 32 * 34; }
  template <int MB, int NBK>
  static TF_INLINE void step(const uint8_t* w, int64_t row_bytes, int64_t, int64_t j, const XRow* x,
                             __m256 (&acc)[NBK][MB]) {
    __m256i xv[MB];
    __m256 dx[MB];
    for (int i = 0; i < MB; ++i) {
      xv[i] = load256(x[i].q + j * 32);
      dx[i] = _mm256_set1_ps(x[i].d[j]);
    }
    for (int jn = 0; jn < NBK; ++jn) {
      const uint8_t* b = w + jn * row_bytes + j * 34;
      const __m256i wv = load256(b + 2);
      const __m256i aw = _mm256_sign_epi8(wv, wv);  // -128 stays 0x80, read as unsigned 128
      const __m256 dw = _mm256_set1_ps(fp16(b));
      for (int i = 0; i < MB; ++i) {
        const __m256 p = dot_float(aw, _mm256_sign_epi8(xv[i], wv));
        acc[jn][i] = _mm256_fmadd_ps(p, _mm256_mul_ps(dw, dx[i]), acc[jn][i]);
      }
    }
  }
};

template <int HIGH_BITS>
struct BlockLegacy4 {  // Q4_0: d fp16, qs[16], value d * (q - 8); Q5_0: d, qh[4], qs[16], value d * (q - 16)
  static constexpr int QK = 32, BYTES = HIGH_BITS ? 22 : 18;
  template <int MB>
  static TF_INLINE void dot(const uint8_t* b, const XRow* x, int64_t j, __m256* acc) {
    __m256i q = nibbles_32(b + (HIGH_BITS ? 6 : 2));
    if constexpr (HIGH_BITS) q = _mm256_or_si256(q, _mm256_and_si256(bytes_from_bits_32(b + 2), _mm256_set1_epi8(0x10)));
    const __m256 dw = _mm256_set1_ps(fp16(b));
    for (int i = 0; i < MB; ++i) {
      const __m256i xv = load256(x[i].q + j * 32);
      __m256i off = load256(x[i].o + j * 16);  // 16 x pair sums
      if constexpr (!HIGH_BITS) off = _mm256_srai_epi16(off, 1);
      const __m256 p = _mm256_cvtepi32_ps(_mm256_sub_epi32(tf::dot_u8s8(q, xv), pairs_to_quads(off)));
      acc[i] = _mm256_fmadd_ps(p, _mm256_mul_ps(dw, _mm256_set1_ps(x[i].d[j])), acc[i]);
    }
  }
};

// Q4_0 / Q5_0 repacked by pairs of blocks (K % 64 == 0), same bytes per row as the file: all d (fp16) first, then
// Q5_0's fifth bits as one 64-bit word per pair, then one 32-byte vector of codes per pair (block 2p's code of
// value i in the low nibble of byte i, block 2p+1's in the high nibble). A pair's fifth bits land in vector lanes
// by broadcasting the word: lane i reads byte i % 8, where bit i / 8 belongs to block 2p and bit 4 + i / 8 to
// block 2p+1, so one variable shift per 32-bit lane moves them to bit 4. The d of 8 blocks convert at once, and the
// -8 / -16 offset becomes one FMA per 8 blocks against the activations' block sums.
template <int HIGH_BITS>
struct Pairs {
  static constexpr int64_t STEP = 256;
  static constexpr float OFFSET = HIGH_BITS ? 16.0f : 8.0f;
  static int64_t row_bytes(int64_t K) { return K / 32 * (HIGH_BITS ? 22 : 18); }
  template <int MB>
  static TF_INLINE void pair(const uint8_t* qs, const uint8_t* qh, const XRow* x, int64_t b, int p,
                          const float (*sv)[8], __m256* a0, __m256* a1) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i qb = load256(qs);
    __m256i q0 = _mm256_and_si256(qb, m4), q1 = _mm256_and_si256(_mm256_srli_epi16(qb, 4), m4);
    if constexpr (HIGH_BITS) {
      int64_t word;
      std::memcpy(&word, qh, sizeof word);
      const __m256i v = _mm256_set1_epi64x(word), bit4 = _mm256_set1_epi8(0x10);
      q0 = _mm256_or_si256(q0, _mm256_and_si256(_mm256_sllv_epi32(v, _mm256_setr_epi32(4, 4, 3, 3, 2, 2, 1, 1)), bit4));
      q1 = _mm256_or_si256(q1, _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3)), bit4));
    }
    for (int i = 0; i < MB; ++i) {
      const int8_t* xq = x[i].q + 32 * b;
      a0[i] = _mm256_fmadd_ps(dot_float(q0, load256(xq)), _mm256_broadcast_ss(&sv[i][2 * p]), a0[i]);
      a1[i] = _mm256_fmadd_ps(dot_float(q1, load256(xq + 32)),
                              _mm256_broadcast_ss(&sv[i][2 * p + 1]), a1[i]);
    }
  }
  template <int MB, int NBK>
  static TF_INLINE void step(const uint8_t* w, int64_t row_bytes, int64_t K, int64_t j, const XRow* x,
                             __m256 (&acc)[NBK][MB]) {
    const int64_t nb = K / 32;
    if (8 * j + 8 <= nb) {
#pragma GCC unroll 4
      for (int jn = 0; jn < NBK; ++jn) dot<MB, 8>(w + jn * row_bytes, nb, j, x, acc[jn]);
    } else {
      for (int jn = 0; jn < NBK; ++jn) dot<MB, 0>(w + jn * row_bytes, nb, j, x, acc[jn]);
    }
  }
  // COUNT: 8 for a full group of blocks, 0 for the row's last, shorter one.
  template <int MB, int COUNT>
  static TF_INLINE void dot(const uint8_t* row, int64_t nb, int64_t j, const XRow* x, __m256* acc) {
    const int64_t b0 = 8 * j, count = COUNT ? COUNT : nb - b0;
    const uint8_t* qh = row + 2 * nb + 4 * b0;
    const uint8_t* qs = row + (HIGH_BITS ? 6 : 2) * nb + 16 * b0;
    // 8 d from b0 on; past the row's last block the lanes read other bytes of the row and are cleared.
    __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * b0)));
    if (!COUNT)
      dw = _mm256_and_ps(dw, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)),
                                                                    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))));
    const __m256 doff = _mm256_mul_ps(dw, _mm256_set1_ps(OFFSET));
    alignas(32) float sv[MB][8];
    __m256 a0[MB], a1[MB];
    for (int i = 0; i < MB; ++i) {
      _mm256_store_ps(sv[i], _mm256_mul_ps(dw, _mm256_loadu_ps(x[i].d + b0)));
      a0[i] = _mm256_fnmadd_ps(doff, _mm256_loadu_ps(x[i].s + b0), _mm256_setzero_ps());
      a1[i] = _mm256_setzero_ps();
    }
#pragma GCC unroll 4
    for (int p = 0; p < count / 2; ++p) pair<MB>(qs + 32 * p, qh + 8 * p, x, b0 + 2 * p, p, sv, a0, a1);
    for (int i = 0; i < MB; ++i) acc[i] = _mm256_add_ps(acc[i], _mm256_add_ps(a0[i], a1[i]));
  }
};

// Q4_K: d, dmin fp16, 12 bytes of 6-bit scales/mins, qs[128]; sub-block t (32 values) holds
// d * sc[t] * q - dmin * m[t], its codes in the low (t even) or high (t odd) nibbles of qs[32 * (t / 2) ...].
// Q5_K adds qh[32] before qs: bit t of qh[i] is the fifth bit of value i of sub-block t.
template <int HIGH_BITS>
struct BlockK4 {
  static constexpr int QK = 256, BYTES = HIGH_BITS ? 176 : 144;
  template <int T, int MB>
  static TF_INLINE void sub_pair(const uint8_t* qs, __m256i qh, const XRow* x, int64_t j, const float (*sv)[8],
                              __m256* a0, __m256* a1) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i qb = load256(qs + 32 * T);
    __m256i q0 = _mm256_and_si256(qb, m4), q1 = _mm256_and_si256(_mm256_srli_epi16(qb, 4), m4);
    if constexpr (HIGH_BITS) {
      q0 = _mm256_or_si256(q0, bit_to_4<2 * T>(qh));
      q1 = _mm256_or_si256(q1, bit_to_4<2 * T + 1>(qh));
    }
    for (int i = 0; i < MB; ++i) {
      const int8_t* xq = x[i].q + j * 256 + 64 * T;
      const __m256 p0 = dot_float(q0, load256(xq));
      const __m256 p1 = dot_float(q1, load256(xq + 32));
      a0[i] = _mm256_fmadd_ps(p0, _mm256_broadcast_ss(&sv[i][2 * T]), a0[i]);
      a1[i] = _mm256_fmadd_ps(p1, _mm256_broadcast_ss(&sv[i][2 * T + 1]), a1[i]);
    }
  }
  template <int MB>
  static TF_INLINE void dot(const uint8_t* b, const XRow* x, int64_t j, __m256* acc) {
    uint32_t sm[4];
    unpack_k_scales(b + 4, sm);
    const __m256 sc = _mm256_mul_ps(u8x8_to_float(sm), _mm256_set1_ps(fp16(b)));
    const __m256 mn = _mm256_mul_ps(u8x8_to_float(sm + 2), _mm256_set1_ps(fp16(b + 2)));
    alignas(32) float sv[MB][8];
    __m256 a0[MB], a1[MB];
    for (int i = 0; i < MB; ++i) {
      _mm256_store_ps(sv[i], _mm256_mul_ps(sc, _mm256_loadu_ps(x[i].d + 8 * j)));
      a0[i] = _mm256_fnmadd_ps(mn, _mm256_loadu_ps(x[i].s + 8 * j), _mm256_setzero_ps());
      a1[i] = _mm256_setzero_ps();
    }
    const uint8_t* qs = b + (HIGH_BITS ? 48 : 16);
    const __m256i qh = HIGH_BITS ? load256(b + 16) : _mm256_setzero_si256();
    sub_pair<0, MB>(qs, qh, x, j, sv, a0, a1);
    sub_pair<1, MB>(qs, qh, x, j, sv, a0, a1);
    sub_pair<2, MB>(qs, qh, x, j, sv, a0, a1);
    sub_pair<3, MB>(qs, qh, x, j, sv, a0, a1);
    for (int i = 0; i < MB; ++i) acc[i] = _mm256_add_ps(acc[i], _mm256_add_ps(a0[i], a1[i]));
  }
};
using BlockQ4_K = BlockK4<0>;
using BlockQ5_K = BlockK4<1>;

// Q6_K: ql[128], qh[64], int8 scales[16], d fp16; value d * scales[i / 16] * (q - 32), q six bits: the low four
// from ql, the high two from qh (see dequant_q6_k for the exact placement). The -32 is one FMA per 8 scales
// against the activations' 16-value sums.
struct BlockQ6_K {
  static constexpr int QK = 256, BYTES = 210;
  template <int MB>
  static TF_INLINE void sub(__m256i q, int blk, __m128i scales, const XRow* x, int64_t j, const float (*sv)[8],
                         __m256* a) {
    const __m128i pick = _mm_set_epi64x(0x0101010101010101LL * (2 * blk + 1), 0x0101010101010101LL * (2 * blk));
    const __m256i s16 = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, pick));
    for (int i = 0; i < MB; ++i) {
      const __m256i xv = load256(x[i].q + j * 256 + 32 * blk);
      const __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(q, xv), s16));
      a[i] = _mm256_fmadd_ps(p, _mm256_broadcast_ss(&sv[i][blk]), a[i]);
    }
  }
  template <int MB>
  static TF_INLINE void dot(const uint8_t* b, const XRow* x, int64_t j, __m256* acc) {
    const float dw = fp16(b + 208);
    const __m256 d = _mm256_set1_ps(dw);
    const __m128i scales = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192));
    const __m256 off = _mm256_set1_ps(32.0f * dw);
    const __m256 sc_lo = _mm256_mul_ps(off, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(scales)));
    const __m256 sc_hi = _mm256_mul_ps(off, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(scales, 8))));
    alignas(32) float sv[MB][8];
    __m256 a0[MB], a1[MB];
    for (int i = 0; i < MB; ++i) {
      _mm256_store_ps(sv[i], _mm256_mul_ps(d, _mm256_loadu_ps(x[i].d + 8 * j)));
      a0[i] = _mm256_fnmadd_ps(sc_lo, _mm256_loadu_ps(x[i].h + 16 * j), _mm256_setzero_ps());
      a1[i] = _mm256_fnmadd_ps(sc_hi, _mm256_loadu_ps(x[i].h + 16 * j + 8), _mm256_setzero_ps());
    }
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x03);
    for (int h = 0; h < 2; ++h) {
      const __m256i l1 = load256(b + 64 * h), l2 = load256(b + 64 * h + 32), hb = load256(b + 128 + 32 * h);
      const __m256i q0 = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_slli_epi16(_mm256_and_si256(hb, m2), 4));
      const __m256i q1 = _mm256_or_si256(_mm256_and_si256(l2, m4),
                                         _mm256_slli_epi16(_mm256_and_si256(hb, _mm256_slli_epi16(m2, 2)), 2));
      const __m256i q2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                                         _mm256_and_si256(hb, _mm256_slli_epi16(m2, 4)));
      const __m256i q3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l2, 4), m4),
                                         _mm256_srli_epi16(_mm256_and_si256(hb, _mm256_slli_epi16(m2, 6)), 2));
      sub<MB>(q0, 4 * h + 0, scales, x, j, sv, a0);
      sub<MB>(q1, 4 * h + 1, scales, x, j, sv, a1);
      sub<MB>(q2, 4 * h + 2, scales, x, j, sv, a0);
      sub<MB>(q3, 4 * h + 3, scales, x, j, sv, a1);
    }
    for (int i = 0; i < MB; ++i) acc[i] = _mm256_add_ps(acc[i], _mm256_add_ps(a0[i], a1[i]));
  }
};

// Internal layout ids beyond ggml's: the pair-repacked legacy formats.
constexpr int PAIRS = 0x100;

// ---- the linear: tasks of NB weight rows, each against every row of x

// Weight rows [0, NBK) starting at w (row_bytes apart) against x rows [0, MB); y rows ldy apart.
template <class F, int MB, int NBK, bool PREFETCH>
__attribute__((noinline)) void tile(const uint8_t* w, int64_t K, const XRow* x, float* y, int64_t ldy) {
  const int64_t row_bytes = F::row_bytes(K), steps = (K + F::STEP - 1) / F::STEP;
  const int64_t step_bytes = (row_bytes * NBK + steps - 1) / steps;
  __m256 acc[NBK][MB];
  for (int jn = 0; jn < NBK; ++jn)
    for (int i = 0; i < MB; ++i) acc[jn][i] = _mm256_setzero_ps();
  // The NBK rows are contiguous: fetch linearly ahead of where a front-to-back read of them would be.
  const char* fetched = reinterpret_cast<const char*>(w) + PREFETCH_AHEAD;
  const char* until = fetched;
  for (int64_t j = 0; j < steps; ++j) {
    if constexpr (PREFETCH) {
      until += step_bytes;
      for (; fetched < until; fetched += 64) _mm_prefetch(fetched, _MM_HINT_T1);
    }
    F::template step<MB, NBK>(w, row_bytes, K, j, x, acc);
  }
  for (int i = 0; i < MB; ++i)
    for (int jn = 0; jn < NBK; ++jn) y[i * ldy + jn] = hsum(acc[jn][i]);
}

// Rows of x per tile: four where AVX-512 gives 32 vector registers (each weight block decoded once for four rows),
// else two. Each output keeps its own accumulator and steps either way, so the bits do not change.
#ifdef __AVX512VL__
constexpr int MB_WIDE = 4;
#else
constexpr int MB_WIDE = 2;
#endif

template <class F, int NBK>
inline void rows_against_x(const uint8_t* w, int64_t K, const std::vector<XRow>& x, float* y, int64_t ldy) {
  const int64_t M = static_cast<int64_t>(x.size());
  int64_t m = 0;
  for (; m + MB_WIDE <= M; m += MB_WIDE) {
    if (m == 0) tile<F, MB_WIDE, NBK, true>(w, K, x.data() + m, y + m * ldy, ldy);
    else tile<F, MB_WIDE, NBK, false>(w, K, x.data() + m, y + m * ldy, ldy);
  }
  for (; m + 2 <= M; m += 2) {
    if (m == 0) tile<F, 2, NBK, true>(w, K, x.data() + m, y + m * ldy, ldy);
    else tile<F, 2, NBK, false>(w, K, x.data() + m, y + m * ldy, ldy);
  }
  for (; m < M; ++m) {
    if (m == 0) tile<F, 1, NBK, true>(w, K, x.data() + m, y + m * ldy, ldy);
    else tile<F, 1, NBK, false>(w, K, x.data() + m, y + m * ldy, ldy);
  }
}

template <class F>
void run_rows(const uint8_t* w, int64_t rows, int64_t K, const std::vector<XRow>& x, float* y, int64_t ldy) {
  if (rows == NB) {
    rows_against_x<F, NB>(w, K, x, y, ldy);
  } else {
    for (int64_t r = 0; r < rows; ++r) rows_against_x<F, 1>(w + r * F::row_bytes(K), K, x, y + r, ldy);
  }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define TF_Q8_0_512 1
// Q8_0 for two or more rows of x with 512-bit VNNI: Q8_0Rows' arithmetic, two weight rows per register. x is taken
// as unsigned (x + 128) and each lane's dot product starts from -128 times its four weights' sum, which leaves
// exactly the signed dot product Q8_0Rows takes (sign trick and all, -128 weights included); each lane then gets the
// same scale (dw * dx), conversion and FMA, blocks in the same order, and each row the same horizontal sum of its 8
// lanes. So the same bits as the 256-bit tiles, with about half their instructions per product: a task's NB rows
// are decoded once (the register of each pair, its scales, its starting values) and swept by every row of x.
namespace q8_0_512 {

constexpr int ROWS = 8;  // weight rows per task: four pairs share each row of x's preparation
constexpr int PAIRS = ROWS / 2;
constexpr int64_t WORDS = 3 * 16;  // int32 words per block and pair: codes, scales, starting values

inline void decode(const uint8_t* w, int64_t K, int32_t* out) {
  const int64_t row_bytes = K / 32 * 34;
  const char* fetched = reinterpret_cast<const char*>(w) + PREFETCH_AHEAD;
  for (int64_t j = 0; j < K / 32; ++j) {
    for (const char* until = fetched + ROWS * 34; fetched < until; fetched += 64) _mm_prefetch(fetched, _MM_HINT_T1);
    for (int p = 0; p < PAIRS; ++p) {
      const uint8_t* b0 = w + 2 * p * row_bytes + j * 34;
      const uint8_t* b1 = b0 + row_bytes;
      const __m512i codes = _mm512_inserti64x4(_mm512_castsi256_si512(load256(b0 + 2)), load256(b1 + 2), 1);
      const __m512 scale = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(fp16(b0))),
                                              _mm256_set1_ps(fp16(b1)), 1);
      int32_t* o = out + (j * PAIRS + p) * WORDS;
      _mm512_storeu_si512(o, codes);
      _mm512_storeu_ps(reinterpret_cast<float*>(o + 16), scale);
      _mm512_storeu_si512(o + 32, tf::minus_128_sums(codes));
    }
  }
}

// Rows [0, MB) of x against the decoded pairs; y rows ldy apart.
template <int MB>
__attribute__((noinline)) void tile(const int32_t* dec, int64_t K, const XRow* x, float* y, int64_t ldy) {
  const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[MB][PAIRS];
  for (int i = 0; i < MB; ++i)
    for (int p = 0; p < PAIRS; ++p) acc[i][p] = _mm512_setzero_ps();
  for (int64_t j = 0; j < K / 32; ++j) {
    const int32_t* dj = dec + j * PAIRS * WORDS;
    __m512i codes[PAIRS], start[PAIRS];
    __m512 dw[PAIRS];
    for (int p = 0; p < PAIRS; ++p) {
      codes[p] = _mm512_loadu_si512(dj + p * WORDS);
      dw[p] = _mm512_loadu_ps(reinterpret_cast<const float*>(dj + p * WORDS + 16));
      start[p] = _mm512_loadu_si512(dj + p * WORDS + 32);
    }
    for (int i = 0; i < MB; ++i) {
      const __m512i xu = _mm512_xor_si512(_mm512_broadcast_i64x4(load256(x[i].q + j * 32)), bias);
      const __m512 dx = _mm512_set1_ps(x[i].d[j]);
      for (int p = 0; p < PAIRS; ++p) {
        const __m512i dot = _mm512_dpbusd_epi32(start[p], xu, codes[p]);
        acc[i][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw[p], dx), acc[i][p]);
      }
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int p = 0; p < PAIRS; ++p) {
      y[i * ldy + 2 * p] = hsum(_mm512_castps512_ps256(acc[i][p]));
      y[i * ldy + 2 * p + 1] = hsum(_mm512_extractf32x8_ps(acc[i][p], 1));
    }
}

// ROWS weight rows at w against every row of x.
inline void rows_against_x(const uint8_t* w, int64_t K, const std::vector<XRow>& x, float* y, int64_t ldy) {
  int32_t* dec = tf::reusable<int32_t, 20>(K / 32 * PAIRS * WORDS);
  decode(w, K, dec);
  const int64_t M = static_cast<int64_t>(x.size());
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile<4>(dec, K, x.data() + m, y + m * ldy, ldy);
  if (m + 2 <= M) tile<2>(dec, K, x.data() + m, y + m * ldy, ldy), m += 2;
  if (m < M) tile<1>(dec, K, x.data() + m, y + m * ldy, ldy);
}

}  // namespace q8_0_512
#endif

// Bytes of one row of K values in `layout` (a ggml type, or PAIRS | Q4_0 / Q5_0), or 0 when not handled.
int64_t layout_row_bytes(int layout, int64_t K) {
  if (K <= 0 || K % 32) return 0;
  switch (layout) {
    case Q4_0: return K / 32 * 18;
    case Q5_0: return K / 32 * 22;
    case Q8_0: return K / 32 * 34;
    case PAIRS | Q4_0: return K % 64 ? 0 : K / 32 * 18;
    case PAIRS | Q5_0: return K % 64 ? 0 : K / 32 * 22;
    case Q4_K: return K % 256 ? 0 : K / 256 * 144;
    case Q5_K: return K % 256 ? 0 : K / 256 * 176;
    case Q6_K: return K % 256 ? 0 : K / 256 * 210;
    default: return 0;
  }
}

void dispatch_rows(int layout, const uint8_t* w, int64_t rows, int64_t K, const std::vector<XRow>& x, float* y,
                   int64_t ldy) {
  switch (layout) {
    case Q4_0: run_rows<Native<BlockLegacy4<0>>>(w, rows, K, x, y, ldy); break;
    case Q5_0: run_rows<Native<BlockLegacy4<1>>>(w, rows, K, x, y, ldy); break;
    case Q8_0:
#ifdef TF_Q8_0_512
      if (rows == q8_0_512::ROWS && x.size() >= 2) {  // (one row of x: the 256-bit tiles are faster on Zen 4)
        q8_0_512::rows_against_x(w, K, x, y, ldy);
        break;
      }
#endif
      for (int64_t r = 0; r < rows; r += NB)
        run_rows<Q8_0Rows>(w + r * (K / 32 * 34), std::min<int64_t>(NB, rows - r), K, x, y + r, ldy);
      break;
    case PAIRS | Q4_0: run_rows<Pairs<0>>(w, rows, K, x, y, ldy); break;
    case PAIRS | Q5_0: run_rows<Pairs<1>>(w, rows, K, x, y, ldy); break;
    case Q4_K: run_rows<Native<BlockQ4_K>>(w, rows, K, x, y, ldy); break;
    case Q5_K: run_rows<Native<BlockQ5_K>>(w, rows, K, x, y, ldy); break;
    case Q6_K: run_rows<Native<BlockQ6_K>>(w, rows, K, x, y, ldy); break;
    default: break;
  }
}

// ---- dequantization (exact: every product below is exact in fp32, so only Q4_K/Q5_K's final subtraction
// rounds, once, as in gguf.quants and ggml)

void dequant_q8_0(const uint8_t* b, float* out) {
  const __m256 d = _mm256_set1_ps(fp16(b));
  for (int t = 0; t < 4; ++t) {
    const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 2 + 8 * t)));
    _mm256_storeu_ps(out + 8 * t, _mm256_mul_ps(d, _mm256_cvtepi32_ps(v)));
  }
}

void store_codes(__m256i q, __m256 scale, __m256 min, float* out, bool with_min) {
  alignas(32) uint8_t bytes[32];
  _mm256_store_si256(reinterpret_cast<__m256i*>(bytes), q);
  for (int t = 0; t < 4; ++t) {
    const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + 8 * t))));
    const __m256 prod = _mm256_mul_ps(scale, v);
    _mm256_storeu_ps(out + 8 * t, with_min ? _mm256_sub_ps(prod, min) : prod);
  }
}

template <int HIGH_BITS>
void dequant_legacy4(const uint8_t* b, float* out) {
  __m256i q = nibbles_32(b + (HIGH_BITS ? 6 : 2));
  if constexpr (HIGH_BITS) q = _mm256_or_si256(q, _mm256_and_si256(bytes_from_bits_32(b + 2), _mm256_set1_epi8(0x10)));
  q = _mm256_sub_epi8(q, _mm256_set1_epi8(HIGH_BITS ? 16 : 8));
  store_codes(q, _mm256_set1_ps(fp16(b)), _mm256_setzero_ps(), out, false);
}

template <int HIGH_BITS>
void dequant_k4(const uint8_t* b, float* out) {
  uint32_t sm[4];
  unpack_k_scales(b + 4, sm);
  const uint8_t* sc = reinterpret_cast<const uint8_t*>(sm);
  const float d = fp16(b), dmin = fp16(b + 2);
  const uint8_t* qs = b + (HIGH_BITS ? 48 : 16);
  const __m256i qh = HIGH_BITS ? load256(b + 16) : _mm256_setzero_si256();
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  for (int t = 0; t < 8; ++t) {
    const __m256i qb = load256(qs + 32 * (t / 2));
    __m256i q = _mm256_and_si256(t % 2 ? _mm256_srli_epi16(qb, 4) : qb, m4);
    if (HIGH_BITS) {
      const __m256i bit = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(t)), _mm256_set1_epi8(1));
      q = _mm256_or_si256(q, _mm256_slli_epi16(bit, 4));
    }
    store_codes(q, _mm256_set1_ps(d * static_cast<float>(sc[t])), _mm256_set1_ps(dmin * static_cast<float>(sc[8 + t])),
                out + 32 * t, true);
  }
}

void dequant_q6_k(const uint8_t* b, float* out) {
  const float d = fp16(b + 208);
  const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
  for (int h = 0; h < 2; ++h) {
    const uint8_t* ql = b + 64 * h;
    const uint8_t* qh = b + 128 + 32 * h;
    for (int i = 0; i < 32; ++i) {
      const int q[4] = {(ql[i] & 0xF) | ((qh[i] & 3) << 4), (ql[i + 32] & 0xF) | (((qh[i] >> 2) & 3) << 4),
                        (ql[i] >> 4) | (((qh[i] >> 4) & 3) << 4), (ql[i + 32] >> 4) | (((qh[i] >> 6) & 3) << 4)};
      for (int t = 0; t < 4; ++t) {
        const int e = 128 * h + 32 * t + i;
        out[e] = (d * static_cast<float>(scales[e / 16])) * static_cast<float>(q[t] - 32);
      }
    }
  }
}

// Repacked legacy pairs: the codes of blocks 2p and 2p+1 exactly as the kernel decodes them.
template <int HIGH_BITS>
void dequant_pairs(const uint8_t* row, int64_t K, float* out) {
  const int64_t nb = K / 32;
  const uint8_t* qh = row + 2 * nb;
  const uint8_t* qs = row + (HIGH_BITS ? 6 : 2) * nb;
  const __m256i m4 = _mm256_set1_epi8(0x0F), offset = _mm256_set1_epi8(HIGH_BITS ? 16 : 8);
  for (int64_t p = 0; p < nb / 2; ++p) {
    const __m256i qb = load256(qs + 32 * p);
    __m256i q0 = _mm256_and_si256(qb, m4), q1 = _mm256_and_si256(_mm256_srli_epi16(qb, 4), m4);
    if constexpr (HIGH_BITS) {
      int64_t word;
      std::memcpy(&word, qh + 8 * p, sizeof word);
      const __m256i v = _mm256_set1_epi64x(word), bit4 = _mm256_set1_epi8(0x10);
      q0 = _mm256_or_si256(q0, _mm256_and_si256(_mm256_sllv_epi32(v, _mm256_setr_epi32(4, 4, 3, 3, 2, 2, 1, 1)), bit4));
      q1 = _mm256_or_si256(q1, _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3)), bit4));
    }
    store_codes(_mm256_sub_epi8(q0, offset), _mm256_set1_ps(fp16(row + 4 * p)), _mm256_setzero_ps(), out + 64 * p, false);
    store_codes(_mm256_sub_epi8(q1, offset), _mm256_set1_ps(fp16(row + 4 * p + 2)), _mm256_setzero_ps(),
                out + 64 * p + 32, false);
  }
}

// Native Q4_0 / Q5_0 rows -> the pairs layout (see Pairs): d, fifth bits, codes. K % 64 == 0.
template <int HIGH_BITS>
void repack_pairs(const uint8_t* src, int64_t K, uint8_t* dst) {
  constexpr int BYTES = HIGH_BITS ? 22 : 18;
  const int64_t nb = K / 32;
  uint8_t* qh = dst + 2 * nb;
  uint8_t* qs = dst + (HIGH_BITS ? 6 : 2) * nb;
  for (int64_t b = 0; b < nb; ++b) std::memcpy(dst + 2 * b, src + b * BYTES, 2);
  for (int64_t p = 0; p < nb / 2; ++p) {
    uint64_t word = 0;
    for (int half = 0; half < 2; ++half) {
      const uint8_t* blk = src + (2 * p + half) * BYTES;
      const uint8_t* codes = blk + (HIGH_BITS ? 6 : 2);
      uint32_t bits = 0;
      if (HIGH_BITS) std::memcpy(&bits, blk + 2, 4);
      for (int i = 0; i < 32; ++i) {
        const uint8_t code = i < 16 ? codes[i] & 0x0F : codes[i - 16] >> 4;
        qs[32 * p + i] = half ? static_cast<uint8_t>(qs[32 * p + i] | (code << 4)) : code;
        if ((bits >> i) & 1) word |= uint64_t{1} << (8 * (i % 8) + 4 * half + i / 8);
      }
    }
    if (HIGH_BITS) std::memcpy(qh + 8 * p, &word, 8);
  }
}

void dequant_row(int layout, const uint8_t* row, int64_t K, float* out) {
  if (layout == (PAIRS | Q4_0)) return dequant_pairs<0>(row, K, out);
  if (layout == (PAIRS | Q5_0)) return dequant_pairs<1>(row, K, out);
  const int qk = layout == Q4_K || layout == Q5_K || layout == Q6_K ? 256 : 32;
  const int64_t bytes = layout_row_bytes(layout, K) / (K / qk);
  for (int64_t j = 0; j < K / qk; ++j) {
    const uint8_t* b = row + j * bytes;
    float* o = out + j * qk;
    switch (layout) {
      case Q4_0: dequant_legacy4<0>(b, o); break;
      case Q5_0: dequant_legacy4<1>(b, o); break;
      case Q8_0: dequant_q8_0(b, o); break;
      case Q4_K: dequant_k4<0>(b, o); break;
      case Q5_K: dequant_k4<1>(b, o); break;
      case Q6_K: dequant_q6_k(b, o); break;
      default: break;
    }
  }
}

// Weight rows per task of a layout when x has M rows.
int64_t rows_per_task(int layout, int64_t M) {
#ifdef TF_Q8_0_512
  if (layout == Q8_0 && M >= 2) return q8_0_512::ROWS;
#endif
  (void)layout, (void)M;
  return NB;
}

struct Segment {
  int layout;
  int64_t rows, first_task, row_bytes, task_rows;
  const uint8_t* data;
  int64_t column;  // where its rows land in y
};

}  // namespace

extern "C" {

// Bytes of a row of K values in `layout` (a ggml type id, or 0x100 | Q4_0 / Q5_0 for the pair-repacked legacy
// formats), or 0 where the kernels do not handle it.
int64_t tf_gguf_row_bytes(int layout, int64_t K) { return layout_row_bytes(layout, K); }

// The layout the kernels prefer for rows of a ggml type (the pairs layout for Q4_0/Q5_0 when K % 64 == 0), and
// when it differs from the file's, `rows` rows at src rewritten into it at dst (same byte count). Returns the
// layout, or 0 where the type is not handled.
int tf_gguf_repack(int type, const void* src, void* dst, int64_t rows, int64_t K, int threads) {
  const int64_t row_bytes = layout_row_bytes(type, K);
  if (row_bytes == 0) return 0;
  const int layout = (type == Q4_0 || type == Q5_0) && layout_row_bytes(PAIRS | type, K) ? PAIRS | type : type;
  const uint8_t* s = static_cast<const uint8_t*>(src);
  uint8_t* d = static_cast<uint8_t*>(dst);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < rows; ++r) {
    if (layout == (PAIRS | Q4_0)) repack_pairs<0>(s + r * row_bytes, K, d + r * row_bytes);
    else if (layout == (PAIRS | Q5_0)) repack_pairs<1>(s + r * row_bytes, K, d + r * row_bytes);
    else std::memcpy(d + r * row_bytes, s + r * row_bytes, row_bytes);
  }
  return layout;
}

// y[M, N] = x[M, K] . W^T where W's rows are `segments` consecutive row ranges, range s holding rows[s] rows in
// layout layouts[s] at data[s], row after row; N = sum(rows). Every layout must handle K (tf_gguf_row_bytes > 0).
void tf_gguf_linear(const float* x, int nseg, const int32_t* layouts, const int64_t* rows, const void* const* data,
                    float* y, int64_t M, int64_t N, int64_t K, int threads) {
  // Per calling thread and reused, so a decode-sized call allocates nothing. The OpenMP workers reach them
  // through these references (naming a thread_local inside the parallel region would give each its own).
  static thread_local std::vector<Segment> segs_storage;
  static thread_local XBuffers buffers_storage;
  static thread_local std::vector<XRow> rows_storage;
  std::vector<Segment>& segs = segs_storage;
  XBuffers& buffers = buffers_storage;
  std::vector<XRow>& xr = rows_storage;
  segs.clear();
  int64_t tasks = 0, column = 0;
  for (int s = 0; s < nseg; ++s) {
    const int64_t task_rows = rows_per_task(layouts[s], M);
    segs.push_back(Segment{layouts[s], rows[s], tasks, layout_row_bytes(layouts[s], K), task_rows,
                           static_cast<const uint8_t*>(data[s]), column});
    tasks += (rows[s] + task_rows - 1) / task_rows;
    column += rows[s];
  }
  buffers.reserve(M, K);
  xr.resize(M);
  for (int64_t m = 0; m < M; ++m) xr[m] = buffers.row(m, K);
  const int64_t chunk = std::max<int64_t>(1, tasks / (CHUNKS_PER_THREAD * threads));
  const int nt = static_cast<int>(std::min<int64_t>(threads, std::max<int64_t>(1, tasks)));
#pragma omp parallel num_threads(nt)
  {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) quantize_row(x + m * K, K, xr[m]);
#pragma omp for schedule(dynamic, chunk)
    for (int64_t t = 0; t < tasks; ++t) {
      int s = 0;
      while (s + 1 < nseg && t >= segs[s + 1].first_task) ++s;
      const Segment& g = segs[s];
      const int64_t r0 = (t - g.first_task) * g.task_rows;
      const int64_t count = std::min<int64_t>(g.task_rows, g.rows - r0);
      dispatch_rows(g.layout, g.data + r0 * g.row_bytes, count, K, xr, y + g.column + r0, N);
    }
  }
}

// out[r, :] = row ids[r] (or r when ids is null) of a [*, K] matrix in `layout`, as float32: bit-exact with
// gguf.quants.dequantize of the file's rows.
void tf_gguf_dequantize(int layout, const void* data, const int64_t* ids, int64_t n, int64_t K, float* out,
                        int threads) {
  const int64_t row_bytes = layout_row_bytes(layout, K);
  if (row_bytes == 0) return;
  const uint8_t* w = static_cast<const uint8_t*>(data);
  const int nt = n * K >= (1 << 16) ? threads : 1;
#pragma omp parallel for schedule(dynamic, 16) num_threads(nt)
  for (int64_t r = 0; r < n; ++r) dequant_row(layout, w + (ids != nullptr ? ids[r] : r) * row_bytes, K, out + r * K);
}

}  // extern "C"
