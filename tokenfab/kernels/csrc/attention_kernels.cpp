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
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

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

// q rows of B sequences `q_stride` floats apart (heads contiguous within a row); out [B, heads, dim].
void paged_decode_attention(const float* q, int64_t q_stride, const float* k_cache, const float* v_cache,
                            const int64_t* blocks, int64_t max_blocks, const int32_t* lo, const int32_t* hi,
                            int64_t batch, int64_t heads, int64_t kv_heads, int64_t dim, int64_t block_size,
                            float scale, float* out, int threads) {
  if (batch == 0) return;
  const int64_t group = heads / kv_heads, pairs = batch * kv_heads;
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
      attend_part(q + b * q_stride + h * group * dim, k_cache, v_cache, blocks + b * max_blocks, lo[b], p0, p1, h,
                  group, kv_heads, dim, block_size, scale, scratch, best + task * group,
                  total + task * group, acc + task * group * dim);
    }
#pragma omp for schedule(static)
    for (int64_t pair = 0; pair < pairs; ++pair) {
      const int64_t b = pair / kv_heads, h = pair % kv_heads, np = parts[b], t0 = first[b] + h * np;
      for (int64_t g = 0; g < group; ++g) {
        float m = -INFINITY, sum = 0.0f;
        for (int64_t part = 0; part < np; ++part) m = std::max(m, best[(t0 + part) * group + g]);
        float* o = out + (b * heads + h * group + g) * dim;
        std::fill(o, o + dim, 0.0f);
        for (int64_t part = 0; part < np; ++part) {
          const int64_t i = (t0 + part) * group + g;
          if (total[i] == 0.0f) continue;  // an empty part
          const float w = std::exp(best[i] - m);
          sum += total[i] * w;
          const float* a = acc + i * dim;
          for (int64_t d = 0; d < dim; ++d) o[d] += a[d] * w;
        }
        const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
        for (int64_t d = 0; d < dim; ++d) o[d] *= inv;
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
