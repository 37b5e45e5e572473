// Attention kernels of the decode path, over the paged fp32 KV cache: per layer [slots, kv_heads, dim] for keys
// and for values, slot = block * block_size + offset.
//
// Decode attention reads K/V in place from the blocks (no gathered copy, no padding). Sequence b attends to
// positions [lo[b], hi[b]) of its block list; the group of query heads sharing a kv head reads each key and value
// once, up to four heads at a time with their accumulators in registers. Work is split into (sequence, kv head,
// span part) tasks so that a single sequence with one kv head (batch-1 decode of a small GQA model) still uses
// every thread: each part keeps its own running max, sum and unnormalized output, merged exactly afterwards
// (split-K, as in flash-decoding). Parts are PART_SPAN positions of the sequence's own span, never sized from the
// batch or the thread count, so a sequence's result is the same bits whatever else is in the batch.
//
// On the amx level attention runs on bf16 tiles instead (see the amx_attention namespace below), for decode and
// prefill alike, so a token's result is the same bits in a prefill chunk as when it decodes alone.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "amx.h"
#include "simd.h"

namespace {

using tf::exp256;
using tf::hsum;

constexpr int64_t PART_SPAN = 128;
constexpr int HEAD_BLOCK = 4;  // query heads whose accumulators share the registers

// Per-head RMSNorm (when w is given) then rotate-half rotary with this token's cos/sin, in place on one head.
inline void norm_rope_head(float* x, const float* w, float eps, const float* c, const float* s, int64_t dim) {
  if (w != nullptr) tf::rmsnorm_row(x, w, x, dim, eps);
  const int64_t half = dim / 2;
  for (int64_t d = 0; d < half; ++d) {
    const float a = x[d], b = x[d + half];
    x[d] = a * c[d] - b * s[d];
    x[d + half] = b * c[d + half] + a * s[d + half];
  }
}

void qk_norm_rope(float* qkv, int64_t tokens, int64_t row_stride, int64_t heads, int64_t kv_heads, int64_t dim,
                  const float* q_weight, const float* k_weight, float eps, const float* cos, const float* sin,
                  int threads) {
  const int64_t per_row = heads + kv_heads;
  const int nt = tokens * per_row * dim >= (1 << 16) ? threads : 1;
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t task = 0; task < tokens * per_row; ++task) {
    const int64_t t = task / per_row, h = task % per_row;
    norm_rope_head(qkv + t * row_stride + h * dim, h < heads ? q_weight : k_weight, eps, cos + t * dim,
                   sin + t * dim, dim);
  }
}

// scores[j * span + p] = scale * q_j . k_p for G query heads (q rows `dim` apart) and the span's key rows. Each
// score is two 8-lane FMA chains over 16-column steps (columns d % 16 < 8 in the first, the rest in the second),
// then the 8-column tail into the first chain, the chains added and summed as hsum sums; with AVX-512 the two
// chains are the halves of one zmm register, the same operations in half the instructions.
template <int G>
void head_scores(const float* q, const float* k_cache, const int64_t* rows, int64_t span, int64_t dim, float scale,
                 float* scores) {
  // Key p's G scores from their two 8-lane halves: the 8-column tail into the first, the halves added and summed,
  // the scalar tail, the scale.
  auto finish = [&](int64_t p, const float* kp, __m256* a0, __m256* a1, int64_t d) {
    for (; d + 8 <= dim; d += 8) {
      const __m256 k0 = _mm256_loadu_ps(kp + d);
      for (int j = 0; j < G; ++j) a0[j] = _mm256_fmadd_ps(_mm256_loadu_ps(q + j * dim + d), k0, a0[j]);
    }
    for (int j = 0; j < G; ++j) {
      float sc = hsum(_mm256_add_ps(a0[j], a1[j]));
      for (int64_t t = d; t < dim; ++t) sc += q[j * dim + t] * kp[t];
      scores[j * span + p] = sc * scale;
    }
  };
  int64_t p = 0;
#ifdef __AVX512F__
  // Two keys at a time: 2G independent FMA chains keep both FMA ports busy where G chains wait on the latency.
  for (; p + 2 <= span; p += 2) {
    const float* kp[2] = {k_cache + rows[p], k_cache + rows[p + 1]};
    __m512 a[2][G];
    for (int j = 0; j < G; ++j) a[0][j] = a[1][j] = _mm512_setzero_ps();
    int64_t d = 0;
    for (; d + 16 <= dim; d += 16) {
      const __m512 k0 = _mm512_loadu_ps(kp[0] + d), k1 = _mm512_loadu_ps(kp[1] + d);
      for (int j = 0; j < G; ++j) {
        const __m512 qv = _mm512_loadu_ps(q + j * dim + d);
        a[0][j] = _mm512_fmadd_ps(qv, k0, a[0][j]);
        a[1][j] = _mm512_fmadd_ps(qv, k1, a[1][j]);
      }
    }
    for (int key = 0; key < 2; ++key) {
      __m256 a0[G], a1[G];
      for (int j = 0; j < G; ++j) {
        a0[j] = _mm512_castps512_ps256(a[key][j]);
        a1[j] = _mm512_extractf32x8_ps(a[key][j], 1);
      }
      finish(p + key, kp[key], a0, a1, d);
    }
  }
#endif
  for (; p < span; ++p) {
    const float* kp = k_cache + rows[p];
    __m256 a0[G], a1[G];
    int64_t d = 0;
#ifdef __AVX512F__
    __m512 a[G];
    for (int j = 0; j < G; ++j) a[j] = _mm512_setzero_ps();
    for (; d + 16 <= dim; d += 16) {
      const __m512 k = _mm512_loadu_ps(kp + d);
      for (int j = 0; j < G; ++j) a[j] = _mm512_fmadd_ps(_mm512_loadu_ps(q + j * dim + d), k, a[j]);
    }
    for (int j = 0; j < G; ++j) {
      a0[j] = _mm512_castps512_ps256(a[j]);
      a1[j] = _mm512_extractf32x8_ps(a[j], 1);
    }
#else
    for (int j = 0; j < G; ++j) a0[j] = a1[j] = _mm256_setzero_ps();
    for (; d + 16 <= dim; d += 16) {
      const __m256 k0 = _mm256_loadu_ps(kp + d), k1 = _mm256_loadu_ps(kp + d + 8);
      for (int j = 0; j < G; ++j) {
        a0[j] = _mm256_fmadd_ps(_mm256_loadu_ps(q + j * dim + d), k0, a0[j]);
        a1[j] = _mm256_fmadd_ps(_mm256_loadu_ps(q + j * dim + d + 8), k1, a1[j]);
      }
    }
#endif
    finish(p, kp, a0, a1, d);
  }
}

// acc[j, :] = sum_p weights[j * span + p] * v_p for G heads: 16 columns at a time over the whole span, so every
// cache line of V is read once and the sums stay in registers (one FMA chain per column, in a zmm register with
// AVX-512, two ymm registers without: the same operations).
template <int G>
void head_values(const float* weights, const float* v_cache, const int64_t* rows, int64_t span, int64_t dim,
                 float* acc) {
  int64_t d = 0;
#ifdef __AVX512F__
  for (; d + 32 <= dim; d += 32) {  // two 16-column blocks: 2G independent FMA chains, as in head_scores
    __m512 a[G][2];
    for (int j = 0; j < G; ++j) a[j][0] = a[j][1] = _mm512_setzero_ps();
    for (int64_t p = 0; p < span; ++p) {
      const __m512 v0 = _mm512_loadu_ps(v_cache + rows[p] + d), v1 = _mm512_loadu_ps(v_cache + rows[p] + d + 16);
      for (int j = 0; j < G; ++j) {
        const __m512 w = _mm512_set1_ps(weights[j * span + p]);
        a[j][0] = _mm512_fmadd_ps(w, v0, a[j][0]);
        a[j][1] = _mm512_fmadd_ps(w, v1, a[j][1]);
      }
    }
    for (int j = 0; j < G; ++j) {
      _mm512_storeu_ps(acc + j * dim + d, a[j][0]);
      _mm512_storeu_ps(acc + j * dim + d + 16, a[j][1]);
    }
  }
#endif
  for (; d + 16 <= dim; d += 16) {
#ifdef __AVX512F__
    __m512 a[G];
    for (int j = 0; j < G; ++j) a[j] = _mm512_setzero_ps();
    for (int64_t p = 0; p < span; ++p) {
      const __m512 v = _mm512_loadu_ps(v_cache + rows[p] + d);
      for (int j = 0; j < G; ++j) a[j] = _mm512_fmadd_ps(_mm512_set1_ps(weights[j * span + p]), v, a[j]);
    }
    for (int j = 0; j < G; ++j) _mm512_storeu_ps(acc + j * dim + d, a[j]);
#else
    __m256 a[G][2];
    for (int j = 0; j < G; ++j) a[j][0] = a[j][1] = _mm256_setzero_ps();
    for (int64_t p = 0; p < span; ++p) {
      const float* vp = v_cache + rows[p] + d;
      const __m256 v0 = _mm256_loadu_ps(vp), v1 = _mm256_loadu_ps(vp + 8);
      for (int j = 0; j < G; ++j) {
        const __m256 w = _mm256_broadcast_ss(weights + j * span + p);
        a[j][0] = _mm256_fmadd_ps(w, v0, a[j][0]);
        a[j][1] = _mm256_fmadd_ps(w, v1, a[j][1]);
      }
    }
    for (int j = 0; j < G; ++j) {
      _mm256_storeu_ps(acc + j * dim + d, a[j][0]);
      _mm256_storeu_ps(acc + j * dim + d + 8, a[j][1]);
    }
#endif
  }
  for (; d < dim; ++d)
    for (int j = 0; j < G; ++j) {
      float sum = 0.0f;
      for (int64_t p = 0; p < span; ++p) sum += weights[j * span + p] * v_cache[rows[p] + d];
      acc[j * dim + d] = sum;
    }
}

template <class F>
void by_head_blocks(int64_t group, F&& f) {
  for (int64_t g0 = 0; g0 < group; g0 += HEAD_BLOCK) {
    switch (std::min<int64_t>(HEAD_BLOCK, group - g0)) {
      case 1: f(g0, std::integral_constant<int, 1>{}); break;
      case 2: f(g0, std::integral_constant<int, 2>{}); break;
      case 3: f(g0, std::integral_constant<int, 3>{}); break;
      default: f(g0, std::integral_constant<int, 4>{}); break;
    }
  }
}

struct PartScratch {
  std::vector<int64_t> rows;
  std::vector<float> scores;
};

// Positions [p0, p1) of one (sequence, kv head): for each query head of the group, the max of its scores, the sum
// of their exponentials and the unnormalized weighted values (relative to that max).
void attend_part(const float* qb, const float* k_cache, const float* v_cache, const int64_t* table, int64_t lo,
                 int64_t p0, int64_t p1, int64_t h, int64_t group, int64_t kv_heads, int64_t dim,
                 int64_t block_size, float scale, PartScratch& s, float* best, float* total, float* acc) {
  const int64_t span = p1 - p0;
  s.rows.resize(span);
  s.scores.resize(group * span);
  for (int64_t p = 0; p < span; ++p) {
    const int64_t pos = lo + p0 + p;
    s.rows[p] = ((table[pos / block_size] * block_size + pos % block_size) * kv_heads + h) * dim;
  }
  float* scores = s.scores.data();
  by_head_blocks(group, [&](int64_t g0, auto G) {
    head_scores<decltype(G)::value>(qb + g0 * dim, k_cache, s.rows.data(), span, dim, scale, scores + g0 * span);
  });
  for (int64_t g = 0; g < group; ++g) {
    float* sg = scores + g * span;
    float m = -INFINITY;
    for (int64_t p = 0; p < span; ++p) m = std::max(m, sg[p]);
    const __m256 mv = _mm256_set1_ps(m);
    __m256 sum = _mm256_setzero_ps();
    int64_t p = 0;
    for (; p + 8 <= span; p += 8) {
      const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sg + p), mv));
      _mm256_storeu_ps(sg + p, e);
      sum = _mm256_add_ps(sum, e);
    }
    float t = hsum(sum);
    for (; p < span; ++p) t += (sg[p] = std::exp(sg[p] - m));
    best[g] = m;
    total[g] = t;
  }
  if (span == 0) {
    std::fill(acc, acc + group * dim, 0.0f);
    return;
  }
  by_head_blocks(group, [&](int64_t g0, auto G) {
    head_values<decltype(G)::value>(scores + g0 * span, v_cache, s.rows.data(), span, dim, acc + g0 * dim);
  });
}

// One query head's output from its parts (np of them, `stride` apart in best and total, stride * dim in acc), in
// part order: each part's sums rescaled to the largest max, added, divided by the total. Parts with a zero total
// (no position) are skipped. Not inlined, so every caller runs the same instructions.
__attribute__((noinline)) void merge_parts(const float* best, const float* total, const float* acc, int64_t np,
                                           int64_t stride, int64_t dim, float* o) {
  float m = -INFINITY, sum = 0.0f;
  for (int64_t part = 0; part < np; ++part) m = std::max(m, best[part * stride]);
  std::fill(o, o + dim, 0.0f);
  for (int64_t part = 0; part < np; ++part) {
    if (total[part * stride] == 0.0f) continue;  // an empty part
    const float w = std::exp(best[part * stride] - m);
    sum += total[part * stride] * w;
    const float* a = acc + part * stride * dim;
    for (int64_t d = 0; d < dim; ++d) o[d] += a[d] * w;
  }
  const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
  for (int64_t d = 0; d < dim; ++d) o[d] *= inv;
}

#ifdef TF_AMX
// ---- Attention on AMX-BF16 tiles (the amx level). Positions are taken in parts of PART at multiples of PART of the
// block index (callers start the index at an absolute position that is a multiple of PART, so a token's parts are
// the same in decode and in prefill). Per part and kv head, up to 16 query rows (a sequence's query heads of that kv
// head, one or several tokens) are one tile of M rows:
//   S = Q . K^T: A tiles are M query rows x 32 dims of Q, B tiles K^T in TDPBF16PS's pair layout (16 positions);
//   softmax per query row over the part's positions, masked to the row's own [lo, hi);
//   O = P . V: A tiles are M query rows x 32 positions of P, B tiles V in the pair layout (16 dims).
// Every fp32 operand is split into bf16 hi and lo terms (hi = bf16(x), lo = bf16(x - hi)) and each tile step adds
// hi.hi, lo.hi, hi.lo, so products carry about 16 significand bits; parts merge as on the other levels. Each output
// element is accumulated from its own row and column in one order of steps, whatever else shares the tile and
// however many rows the tile has (a decode runs tiles of its query heads only): a position outside a row's range
// gets weight exactly 0, so a token's result does not depend on its neighbours.
namespace amx_attention {

using tf_amx::TILE_ROWS;
constexpr int64_t PART = 128;  // positions per part
constexpr int64_t STEP = 32;   // dims (Q.K) or positions (P.V) per tile step

inline bool runs(int64_t group, int64_t dim) {
  return group <= TILE_ROWS && dim % STEP == 0 && tf_amx::permitted();
}

// Tiles 0-1 (accumulators) and 4-5 (Q's or P's terms) of M rows; 2-3 and 6-7 (K's or V's terms) of 16. Loaded from
// static storage (see tf_amx::config).
inline void configure(int64_t M) {
  static const auto table = [] {
    std::array<tf_amx::TileConfig, TILE_ROWS + 1> t{};
    for (int m = 1; m <= TILE_ROWS; ++m)
      for (int i = 0; i < 8; ++i) {
        t[m].colsb[i] = 64;
        t[m].rows[i] = static_cast<uint8_t>(i == 0 || i == 1 || i == 4 || i == 5 ? m : TILE_ROWS);
      }
    return t;
  }();
  _tile_loadconfig(&table[M]);
}

// bf16 values of one packed part: K's terms (per 16 positions: hi then lo, [dim / 32][16][32] each), then V's hi and
// lo terms ([PART / 32][dim / 16][16][32] each).
inline int64_t part_size(int64_t dim) { return 4 * PART * dim; }

inline void split(__m512 v, __m256i& hi, __m256i& lo) {
  const __m256bh h = _mm512_cvtneps_pbh(v);
  hi = (__m256i)h;
  lo = (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(v, _mm512_cvtpbh_ps(h)));
}

inline __m512 join(__m256i a, __m256i b) {
  return _mm512_castsi512_ps(_mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1));
}

// Where one kv head's K and V rows are in the paged cache.
struct Rows {
  const float *k_cache, *v_cache;
  const int64_t* table;
  int64_t base, h, kv_heads, dim, block_size;
  int64_t row(int64_t lp) const {  // lp: a position of the part whose position 0 is index position `base`
    const int64_t pos = base + lp;
    return ((table[pos / block_size] * block_size + pos % block_size) * kv_heads + h) * dim;
  }
};

// Positions [a, b) of a part, for the steps of 32 positions [a, b) touches (part_tile reads no other), their other
// positions zero. K: per 16 positions and 32 dims, the positions' column pairs transposed in registers into a B tile
// (row r: the pair (2r, 2r + 1) of each position). V: per step and 16 dims, row r holds rows 2r and 2r + 1
// interleaved. K and V rows are read together, with the rows PREFETCH positions ahead requested: two streams in
// flight keep one thread near the memory bandwidth.
void pack_part(const Rows& src, int64_t a, int64_t b, uint16_t* out) {
  static const __m512i interleave = [] {
    alignas(64) uint16_t idx[32];
    for (int i = 0; i < 16; ++i) {
      idx[2 * i] = static_cast<uint16_t>(i);
      idx[2 * i + 1] = static_cast<uint16_t>(16 + i);
    }
    return _mm512_load_si512(idx);
  }();
  constexpr int64_t PREFETCH = 16;
  const int64_t dim = src.dim;
  uint16_t *vhi = out + 2 * PART * dim, *vlo = out + 3 * PART * dim;
  for (int64_t p0 = a / 16 * 16; p0 < (b + STEP - 1) / STEP * STEP; p0 += 16) {
    const float* kr[16];
    const float* vr[16];
    for (int64_t i = 0; i < 16; ++i) {
      const int64_t lp = p0 + i, ahead = lp + PREFETCH;
      if (ahead >= a && ahead < b) {
        const int64_t row = src.row(ahead);
        for (int64_t d = 0; d < dim; d += 16) {
          _mm_prefetch(reinterpret_cast<const char*>(src.k_cache + row + d), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(src.v_cache + row + d), _MM_HINT_T0);
        }
      }
      const bool in = lp >= a && lp < b;
      const int64_t row = in ? src.row(lp) : 0;
      kr[i] = in ? src.k_cache + row : nullptr;
      vr[i] = in ? src.v_cache + row : nullptr;
    }
    uint16_t* kh = out + p0 / 16 * 32 * dim;
    uint16_t* kl = kh + 16 * dim;
    for (int64_t s = 0; s < dim / STEP; ++s) {
      __m512 hi[16], lo[16];
      for (int64_t i = 0; i < 16; ++i) {
        __m256i h0 = _mm256_setzero_si256(), l0 = h0, h1 = h0, l1 = h0;
        if (kr[i] != nullptr) {
          split(_mm512_loadu_ps(kr[i] + s * STEP), h0, l0);
          split(_mm512_loadu_ps(kr[i] + s * STEP + 16), h1, l1);
        }
        hi[i] = join(h0, h1);
        lo[i] = join(l0, l1);
      }
      tf_amx::transpose16(hi);
      tf_amx::transpose16(lo);
      for (int64_t r = 0; r < 16; ++r) {
        _mm512_storeu_ps(kh + (s * 16 + r) * 32, hi[r]);
        _mm512_storeu_ps(kl + (s * 16 + r) * 32, lo[r]);
      }
    }
    for (int64_t i = 0; i < 16; i += 2) {
      const int64_t at = (p0 / STEP) * STEP * dim + ((p0 % STEP) + i) / 2 * 32;
      for (int64_t c = 0; c < dim / 16; ++c) {
        __m256i h0 = _mm256_setzero_si256(), l0 = h0, h1 = h0, l1 = h0;
        if (vr[i] != nullptr) split(_mm512_loadu_ps(vr[i] + c * 16), h0, l0);
        if (vr[i + 1] != nullptr) split(_mm512_loadu_ps(vr[i + 1] + c * 16), h1, l1);
        const __m512i hh = _mm512_permutexvar_epi16(interleave, _mm512_castps_si512(join(h0, h1)));
        const __m512i ll = _mm512_permutexvar_epi16(interleave, _mm512_castps_si512(join(l0, l1)));
        _mm512_storeu_si512(vhi + at + c * TILE_ROWS * 32, hh);
        _mm512_storeu_si512(vlo + at + c * TILE_ROWS * 32, ll);
      }
    }
  }
}

// Q rows (M of them, `dim` floats apart) -> their hi and lo terms, [16][dim] bf16 each (rows past M zero).
inline void pack_queries(const float* const* rows, int64_t M, int64_t dim, uint16_t* out) {
  for (int64_t r = 0; r < TILE_ROWS; ++r)
    for (int64_t d = 0; d < dim; d += 16) {
      __m256i h = _mm256_setzero_si256(), l = h;
      if (r < M) split(_mm512_loadu_ps(rows[r] + d), h, l);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * dim + d), h);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (TILE_ROWS + r) * dim + d), l);
    }
}

// One tile step of both products: accumulators 0 and 1 share the A operand's terms (4: hi, 5: lo) against their own
// B operands' (2, 3 and 6, 7); each adds hi.hi, lo.hi, hi.lo, the two accumulators' updates interleaved.
inline void products() {
  _tile_dpbf16ps(0, 4, 2);
  _tile_dpbf16ps(1, 4, 6);
  _tile_dpbf16ps(0, 5, 2);
  _tile_dpbf16ps(1, 5, 6);
  _tile_dpbf16ps(0, 4, 3);
  _tile_dpbf16ps(1, 4, 7);
}

inline __m512 exp512(__m512 x) {
  const __m256 lo = tf::exp256(_mm512_castps512_ps256(x)), hi = tf::exp256(_mm512_extractf32x8_ps(x, 1));
  return _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
}

// M query rows (qp: pack_queries' terms) against one packed part; row r sees the part's positions [rlo[r], rhi[r])
// (empty when equal). Tiles configured for M rows (configure(M)). Writes each row's max, sum of exponentials and
// unnormalized output (best[M], total[M], acc[M][dim]); an empty row gets -inf, 0 and zeros.
void part_tile(const uint16_t* qp, const uint16_t* part, int64_t M, int64_t dim, const int32_t* rlo,
               const int32_t* rhi, float scale, float* best, float* total, float* acc) {
  alignas(64) float st[TILE_ROWS][PART];
  alignas(64) uint16_t ph[TILE_ROWS][PART], pl[TILE_ROWS][PART];
  const uint16_t *qhi = qp, *qlo = qp + TILE_ROWS * dim, *vhi = part + 2 * PART * dim, *vlo = part + 3 * PART * dim;
  int32_t first = PART, last = 0;  // positions any row sees
  for (int64_t r = 0; r < M; ++r)
    if (rlo[r] < rhi[r]) first = std::min(first, rlo[r]), last = std::max(last, rhi[r]);
  // Steps no row sees are neither computed nor read: their scores are masked below, and they would add nothing to
  // P.V (their weights are 0, and adding 0 leaves an accumulator as it is).
  const int64_t s0 = first / STEP, s1 = std::max<int64_t>(s0, (last + STEP - 1) / STEP);
  // Scores of a step: two blocks of 16 positions (accumulators 0 and 1; Q's terms 4, 5; K's 2, 3 and 6, 7).
  for (int64_t j = s0; j < s1; ++j) {
    const uint16_t* k0 = part + 2 * j * 32 * dim;
    const uint16_t* k1 = k0 + 32 * dim;
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t s = 0; s < dim / STEP; ++s) {
      _tile_loadd(4, qhi + s * STEP, dim * 2);
      _tile_loadd(5, qlo + s * STEP, dim * 2);
      _tile_loadd(2, k0 + s * 16 * 32, 64);
      _tile_loadd(3, k0 + 16 * dim + s * 16 * 32, 64);
      _tile_loadd(6, k1 + s * 16 * 32, 64);
      _tile_loadd(7, k1 + 16 * dim + s * 16 * 32, 64);
      products();
    }
    _tile_stored(0, &st[0][j * STEP], PART * 4);
    _tile_stored(1, &st[0][j * STEP + 16], PART * 4);
  }
  // Softmax of each row over the steps, its positions outside [rlo, rhi) weighted 0.
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512 neg = _mm512_set1_ps(-INFINITY), sc = _mm512_set1_ps(scale);
  for (int64_t r = 0; r < M; ++r) {
    const __m512i lo_v = _mm512_set1_epi32(rlo[r]), hi_v = _mm512_set1_epi32(rhi[r]);
    auto sees = [&](int64_t p) {
      const __m512i pv = _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int32_t>(p)));
      return static_cast<__mmask16>(_mm512_cmple_epi32_mask(lo_v, pv) & _mm512_cmpgt_epi32_mask(hi_v, pv));
    };
    __m512 mv = neg;
    for (int64_t p = s0 * STEP; p < s1 * STEP; p += 16) {
      const __m512 s = _mm512_mask_mul_ps(neg, sees(p), _mm512_load_ps(&st[r][p]), sc);
      _mm512_store_ps(&st[r][p], s);
      mv = _mm512_max_ps(mv, s);
    }
    const float m = _mm512_reduce_max_ps(mv);
    const __m512 mz = _mm512_set1_ps(m == -INFINITY ? 0.0f : m);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t p = s0 * STEP; p < s1 * STEP; p += 16) {
      const __m512 e = _mm512_maskz_mov_ps(sees(p), exp512(_mm512_sub_ps(_mm512_load_ps(&st[r][p]), mz)));
      sum = _mm512_add_ps(sum, e);
      __m256i h, l;
      split(e, h, l);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(&ph[r][p]), h);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(&pl[r][p]), l);
    }
    best[r] = m;
    total[r] = _mm512_reduce_add_ps(sum);
  }
  // P.V, two blocks of 16 dims at a time (accumulators 0 and 1; P's terms 4, 5; V's 2, 3 and 6, 7).
  for (int64_t c0 = 0; c0 < dim / 16; c0 += 2) {
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t j = s0; j < s1; ++j) {
      const uint16_t* vh = vhi + j * STEP * dim + c0 * TILE_ROWS * 32;
      const uint16_t* vl = vlo + j * STEP * dim + c0 * TILE_ROWS * 32;
      _tile_loadd(4, &ph[0][j * STEP], PART * 2);
      _tile_loadd(5, &pl[0][j * STEP], PART * 2);
      _tile_loadd(2, vh, 64);
      _tile_loadd(3, vl, 64);
      _tile_loadd(6, vh + TILE_ROWS * 32, 64);
      _tile_loadd(7, vl + TILE_ROWS * 32, 64);
      products();
    }
    _tile_stored(0, acc + c0 * 16, dim * 4);
    _tile_stored(1, acc + c0 * 16 + 16, dim * 4);
  }
}

// Per thread: pointers to the tile's query rows, their packed terms, the tile results of `parts` parts.
struct Scratch {
  uint16_t* qp;
  float *best, *total, *acc;
  Scratch(int64_t dim, int64_t parts) {
    qp = tf::reusable<uint16_t, 14>(2 * TILE_ROWS * dim);
    best = tf::reusable<float, 16>(parts * (2 + dim) * TILE_ROWS);
    total = best + parts * TILE_ROWS;
    acc = total + parts * TILE_ROWS;
  }
};

// Which parts [lo, hi) touches: the first part's index and the count (0 when empty).
inline std::pair<int64_t, int64_t> parts_of(int64_t lo, int64_t hi) {
  if (hi <= lo) return {lo / PART, 0};
  return {lo / PART, (hi - 1) / PART - lo / PART + 1};
}

// Decode: as paged_decode_attention, a task per (sequence, kv head, part), on tiles of the group's rows.
void decode(const float* q, int64_t q_stride, const float* k_cache, const float* v_cache, const int64_t* blocks,
            int64_t block_stride, const int32_t* lo, const int32_t* hi, int64_t batch, int64_t heads,
            int64_t kv_heads, int64_t dim, int64_t block_size, float scale, float* out, int threads) {
  const int64_t group = heads / kv_heads, pairs = batch * kv_heads, qsize = 2 * TILE_ROWS * dim;
  std::vector<int64_t> parts(batch), first(batch + 1, 0);
  for (int64_t b = 0; b < batch; ++b) {
    parts[b] = parts_of(lo[b], hi[b]).second;
    first[b + 1] = first[b] + kv_heads * parts[b];
  }
  const int64_t tasks = first[batch];
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, tasks)));
  float* best = tf::reusable<float, 10>(tasks * group);
  float* total = tf::reusable<float, 11>(tasks * group);
  float* acc = tf::reusable<float, 12>(tasks * group * dim);
  uint16_t* qp = tf::reusable<uint16_t, 18>(pairs * qsize);  // each (sequence, kv head)'s query terms
#pragma omp parallel num_threads(nt)
  {
    uint16_t* part = tf::reusable<uint16_t, 15>(part_size(dim));  // this thread's packed part
    configure(group);
#pragma omp for schedule(static)
    for (int64_t pair = 0; pair < pairs; ++pair) {
      const float* rows[TILE_ROWS];
      for (int64_t g = 0; g < group; ++g) rows[g] = q + pair / kv_heads * q_stride + (pair % kv_heads * group + g) * dim;
      pack_queries(rows, group, dim, qp + pair * qsize);
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = std::upper_bound(first.begin(), first.end(), task) - first.begin() - 1;
      const int64_t h = (task - first[b]) / parts[b], j = (task - first[b]) % parts[b];
      const int64_t base = (lo[b] / PART + j) * PART;
      const int32_t a = static_cast<int32_t>(std::max<int64_t>(lo[b] - base, 0));
      const int32_t e = static_cast<int32_t>(std::min<int64_t>(hi[b] - base, PART));
      int32_t rlo[TILE_ROWS], rhi[TILE_ROWS];
      std::fill(rlo, rlo + group, a);
      std::fill(rhi, rhi + group, e);
      pack_part(Rows{k_cache, v_cache, blocks + b * block_stride, base, h, kv_heads, dim, block_size}, a, e, part);
      part_tile(qp + (b * kv_heads + h) * qsize, part, group, dim, rlo, rhi, scale, best + task * group,
                total + task * group, acc + task * group * dim);
    }
#pragma omp for schedule(static)
    for (int64_t pair = 0; pair < pairs; ++pair) {
      const int64_t b = pair / kv_heads, h = pair % kv_heads, t0 = first[b] + h * parts[b];
      for (int64_t g = 0; g < group; ++g) {
        const int64_t i = t0 * group + g;
        merge_parts(best + i, total + i, acc + i * dim, parts[b], group, dim, out + (b * heads + h * group + g) * dim);
      }
    }
  }
}

// Prefill: T tokens of one sequence (one block table); token t sees [lo[t], hi[t]). The K/V the chunk sees are
// packed once per (kv head, part), then each task takes 16 / group tokens of a kv head through their parts in
// order and merges them.
void prefill(const float* q, const float* k_cache, const float* v_cache, const int64_t* table, const int32_t* lo,
             const int32_t* hi, int64_t T, int64_t heads, int64_t kv_heads, int64_t dim, int64_t block_size,
             float scale, float* out, int threads) {
  const int64_t group = heads / kv_heads, per_tile = TILE_ROWS / group, tiles = (T + per_tile - 1) / per_tile;
  int64_t ulo = INT64_MAX, uhi = 0;
  for (int64_t t = 0; t < T; ++t)
    if (lo[t] < hi[t]) ulo = std::min<int64_t>(ulo, lo[t]), uhi = std::max<int64_t>(uhi, hi[t]);
  if (uhi == 0) {
    std::fill(out, out + T * heads * dim, 0.0f);
    return;
  }
  const int64_t k0 = ulo / PART, np = (uhi - 1) / PART - k0 + 1, size = part_size(dim);
  uint16_t* packed = tf::reusable<uint16_t, 17>(kv_heads * np * size);
  const int64_t tasks = kv_heads * tiles;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, std::max(tasks, kv_heads * np))));
#pragma omp parallel num_threads(nt)
  {
    Scratch s(dim, np);
    configure(TILE_ROWS);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < kv_heads * np; ++i) {
      const int64_t base = (k0 + i % np) * PART;
      pack_part(Rows{k_cache, v_cache, table, base, i / np, kv_heads, dim, block_size}, std::max<int64_t>(ulo - base, 0),
                std::min<int64_t>(uhi - base, PART), packed + i * size);
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t h = task / tiles, t0 = task % tiles * per_tile, t1 = std::min(T, t0 + per_tile);
      const int64_t M = (t1 - t0) * group;
      int64_t j0 = np, j1 = 0;  // the tile's parts, relative to k0
      const float* rows[TILE_ROWS];
      for (int64_t t = t0; t < t1; ++t) {
        const auto [kf, n] = parts_of(lo[t], hi[t]);
        if (n > 0) j0 = std::min(j0, kf - k0), j1 = std::max(j1, kf - k0 + n);
        for (int64_t g = 0; g < group; ++g) rows[(t - t0) * group + g] = q + (t * heads + h * group + g) * dim;
      }
      pack_queries(rows, M, dim, s.qp);
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t base = (k0 + j) * PART;
        int32_t rlo[TILE_ROWS] = {}, rhi[TILE_ROWS] = {};
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t a = std::max<int64_t>(lo[t] - base, 0), e = std::min<int64_t>(hi[t] - base, PART);
          if (a >= e) continue;
          for (int64_t g = 0; g < group; ++g) {
            rlo[(t - t0) * group + g] = static_cast<int32_t>(a);
            rhi[(t - t0) * group + g] = static_cast<int32_t>(e);
          }
        }
        const int64_t at = (j - j0) * TILE_ROWS;
        part_tile(s.qp, packed + (h * np + j) * size, TILE_ROWS, dim, rlo, rhi, scale, s.best + at, s.total + at,
                  s.acc + at * dim);
      }
      for (int64_t r = 0; r < M; ++r) {
        const int64_t t = t0 + r / group, g = r % group;
        merge_parts(s.best + r, s.total + r, s.acc + r * dim, std::max<int64_t>(j1 - j0, 0), TILE_ROWS, dim,
                    out + (t * heads + h * group + g) * dim);
      }
    }
  }
}

}  // namespace amx_attention
#endif

// q rows of B sequences `q_stride` floats apart (heads contiguous within a row); out [B, heads, dim].
// Sequence b's block ids are blocks[b * block_stride ...] (a stride of 0: every query of one sequence).
void paged_decode_attention(const float* q, int64_t q_stride, const float* k_cache, const float* v_cache,
                            const int64_t* blocks, int64_t block_stride, const int32_t* lo, const int32_t* hi,
                            int64_t batch, int64_t heads, int64_t kv_heads, int64_t dim, int64_t block_size,
                            float scale, float* out, int threads) {
  if (batch == 0) return;
  const int64_t group = heads / kv_heads, pairs = batch * kv_heads;
#ifdef TF_AMX
  if (amx_attention::runs(group, dim)) {
    amx_attention::decode(q, q_stride, k_cache, v_cache, blocks, block_stride, lo, hi, batch, heads, kv_heads, dim,
                          block_size, scale, out, threads);
    return;
  }
#endif
  // Sequence b owns tasks [first[b], first[b + 1]): kv_heads x parts[b], parts of PART_SPAN positions.
  std::vector<int64_t> parts(batch), first(batch + 1, 0);
  for (int64_t b = 0; b < batch; ++b) {
    parts[b] = std::max<int64_t>(1, (hi[b] - lo[b] + PART_SPAN - 1) / PART_SPAN);
    first[b + 1] = first[b] + kv_heads * parts[b];
  }
  const int64_t tasks = first[batch];
  const int nt = static_cast<int>(std::min<int64_t>(threads, tasks));
  float* best = tf::reusable<float, 10>(tasks * group);
  float* total = tf::reusable<float, 11>(tasks * group);
  float* acc = tf::reusable<float, 12>(tasks * group * dim);
#pragma omp parallel num_threads(nt)
  {
    PartScratch scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = std::upper_bound(first.begin(), first.end(), task) - first.begin() - 1;
      const int64_t h = (task - first[b]) / parts[b], part = (task - first[b]) % parts[b];
      const int64_t span = hi[b] - lo[b], p0 = std::min(span, part * PART_SPAN);
      const int64_t p1 = std::min(span, p0 + PART_SPAN);
      attend_part(q + b * q_stride + h * group * dim, k_cache, v_cache, blocks + b * block_stride, lo[b], p0, p1, h,
                  group, kv_heads, dim, block_size, scale, scratch, best + task * group,
                  total + task * group, acc + task * group * dim);
    }
#pragma omp for schedule(static)
    for (int64_t pair = 0; pair < pairs; ++pair) {
      const int64_t b = pair / kv_heads, h = pair % kv_heads, np = parts[b], t0 = first[b] + h * np;
      for (int64_t g = 0; g < group; ++g) {
        const int64_t i = t0 * group + g;
        merge_parts(best + i, total + i, acc + i * dim, np, group, dim, out + (b * heads + h * group + g) * dim);
      }
    }
  }
}

}  // namespace

extern "C" {

// In place on a fused qkv projection [T, row_stride] whose rows start with H query heads then KVH key heads
// (D each): optional per-head RMSNorm (query and key weights, Qwen3/Gemma 3), then rotate-half rotary embedding
// with per-token cos/sin [T, D]. One call replaces a dozen small tensor ops per layer.
void tf_qk_norm_rope(float* qkv, int64_t tokens, int64_t row_stride, int64_t heads, int64_t kv_heads, int64_t dim,
                     const float* q_weight, const float* k_weight, float eps, const float* cos, const float* sin,
                     int threads) {
  qk_norm_rope(qkv, tokens, row_stride, heads, kv_heads, dim, q_weight, k_weight, eps, cos, sin, threads);
}

// q [B, H, D]; sequence b attends to positions [lo[b], hi[b]) of its block list `blocks[b, :]`.
void tf_paged_decode_attention(const float* q, const float* k_cache, const float* v_cache, const int64_t* blocks,
                               int64_t max_blocks, const int32_t* lo, const int32_t* hi, int64_t batch,
                               int64_t heads, int64_t kv_heads, int64_t dim, int64_t block_size, float scale,
                               float* out, int threads) {
  paged_decode_attention(q, heads * dim, k_cache, v_cache, blocks, max_blocks, lo, hi, batch, heads, kv_heads, dim,
                         block_size, scale, out, threads);
}

// q [T, H, D]: T query tokens of one sequence whose block list is `blocks` (max_blocks ids); token t attends to
// positions [lo[t], hi[t]). Each token's result is the same bits as tf_paged_decode_attention gives it alone.
void tf_paged_prefill_attention(const float* q, const float* k_cache, const float* v_cache, const int64_t* blocks,
                                int64_t max_blocks, const int32_t* lo, const int32_t* hi, int64_t tokens,
                                int64_t heads, int64_t kv_heads, int64_t dim, int64_t block_size, float scale,
                                float* out, int threads) {
  (void)max_blocks;
#ifdef TF_AMX
  if (tokens > 0 && amx_attention::runs(heads / kv_heads, dim)) {
    amx_attention::prefill(q, k_cache, v_cache, blocks, lo, hi, tokens, heads, kv_heads, dim, block_size, scale, out,
                           threads);
    return;
  }
#endif
  paged_decode_attention(q, heads * dim, k_cache, v_cache, blocks, 0, lo, hi, tokens, heads, kv_heads, dim,
                         block_size, scale, out, threads);
}

// A whole decode step of attention for B single-token sequences, from their fused qkv projection rows
// [B, row_stride] (H query heads, KVH key heads, KVH value heads of D each): q/k norm and rotary in place (as
// tf_qk_norm_rope), the new key and value written to cache slot slots[b], then attention over [lo[b], hi[b])
// (which includes that slot) into out [B, H, D]. One call where the layer otherwise makes four.
void tf_decode_attention_step(float* qkv, int64_t batch, int64_t row_stride, int64_t heads, int64_t kv_heads,
                              int64_t dim, const float* q_weight, const float* k_weight, float eps, const float* cos,
                              const float* sin, float* k_cache, float* v_cache, const int64_t* slots,
                              const int64_t* blocks, int64_t max_blocks, const int32_t* lo, const int32_t* hi,
                              int64_t block_size, float scale, float* out, int threads) {
  qk_norm_rope(qkv, batch, row_stride, heads, kv_heads, dim, q_weight, k_weight, eps, cos, sin, threads);
  const int64_t kv = kv_heads * dim;
  for (int64_t b = 0; b < batch; ++b) {
    const float* row = qkv + b * row_stride + heads * dim;
    std::memcpy(k_cache + slots[b] * kv, row, kv * sizeof(float));
    std::memcpy(v_cache + slots[b] * kv, row + kv, kv * sizeof(float));
  }
  paged_decode_attention(qkv, row_stride, k_cache, v_cache, blocks, max_blocks, lo, hi, batch, heads, kv_heads, dim,
                         block_size, scale, out, threads);
}

}  // extern "C"
