// bf16 weights on AMX tiles (the amx level: built with -mamx-tile -mamx-bf16 -mavx512bf16), included by
// cpu_kernels.cpp where its linear_shared takes this path for bf16 weights.
//
// y[M, N] = x[M, K] . W[N, K]^T is computed transposed, as tiles of y^T = W . x^T: an A tile is 16 weight rows x 32
// columns read straight from W (row stride 2K bytes, no repacking), a B tile 32 columns x 16 rows of x in the pair
// layout TDPBF16PS reads. x is fp32; it is split into two bf16 terms, hi = bf16(x) and lo = bf16(x - hi), which
// carry 16 of its 24 significand bits, and each tile step adds the weights' products with hi, then with lo, into
// one fp32 accumulator. The products of two bf16 values are exact in fp32, so the result is an fp32 dot product
// of the weights with x rounded to 16 significand bits (relative error of each term below 2^-16), within a few
// fp32 roundings of the fp32 kernels' result but not bit for bit (the order of the additions differs).
//
// Batch invariance: each output y[m, n] is accumulated from weight row n and row m of x alone, in one order of
// steps (k in increasing blocks of 32, hi before lo), in whatever tile and tile column the row lands: rows of x are
// padded to 16 with zeros and every call runs the same 16 x 16 tiles, one row or five hundred. Weight rows past the
// last full block of 16 run the fp32 path's direct kernel (its order does not depend on M either).
#pragma once

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
#define TF_AMX 1

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>

namespace tf_amx {

constexpr int64_t TILE_K = 32;    // columns of one tile step (16 pairs)
constexpr int64_t TILE_ROWS = 16;  // weight rows of an A tile, rows of x of a B tile
constexpr int64_t BLOCK_N = 32;   // weight rows per task (two A tiles)

// Linux hands out the tile register state only on request, once per process.
inline bool permitted() {
  static const bool ok = [] {
    constexpr int ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}

// Whether an [N, K] product (bf16 or int8) runs on tiles: whole 32-column steps and at least one tile of 16 weight
// rows, in a process with tile state.
inline bool runs(int64_t N, int64_t K) { return K % TILE_K == 0 && N >= TILE_ROWS && permitted(); }

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Configs are loaded from static storage: GCC drops the stores to a local config that only ldtilecfg reads (seen
// where two inlined configurations share a stack slot).
inline const TileConfig* config() {
  static const TileConfig c = [] {
    TileConfig t;
    for (int i = 0; i < 8; ++i) {
      t.colsb[i] = 64;
      t.rows[i] = 16;
    }
    return t;
  }();
  return &c;
}

// Eight tiles of 16 rows of 64 bytes (see `tiles` for their roles).
inline void configure() { _tile_loadconfig(config()); }

// r[i] <- column i of the 16 x 16 block whose rows are r[0..15]: unpack pairs, pairs of pairs, then 128-bit lanes
// twice.
inline void transpose16(__m512* r) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
  }
}
// Group g of x [M, K] (rows 16 g .. 16 g + 15, zeros past M) -> out: its hi and lo terms [K / 2][16][2] bf16
// each, hi first, the uint32 pair of columns (2p, 2p + 1) of the group's row i at word p * 16 + i. Per 32 columns
// the 16 rows' pairs are a 16 x 16 block of words, transposed in registers.
inline void pack_group(const float* x, int64_t M, int64_t K, int64_t g, uint16_t* out) {
  float* ghi = reinterpret_cast<float*>(out);  // words moved as floats: the transpose only shuffles them
  float* glo = ghi + TILE_ROWS * K / 2;
  const int64_t rows = std::min<int64_t>(TILE_ROWS, M - g * TILE_ROWS);
  for (int64_t k = 0; k < K; k += TILE_K) {
    __m512 hi[16], lo[16];
    for (int64_t i = 0; i < TILE_ROWS; ++i) {
      if (i >= rows) {
        hi[i] = lo[i] = _mm512_setzero_ps();
        continue;
      }
      const float* row = x + (g * TILE_ROWS + i) * K + k;
      const __m512 v0 = _mm512_loadu_ps(row), v1 = _mm512_loadu_ps(row + 16);
      const __m256bh h0 = _mm512_cvtneps_pbh(v0), h1 = _mm512_cvtneps_pbh(v1);
      const __m256bh l0 = _mm512_cvtneps_pbh(_mm512_sub_ps(v0, _mm512_cvtpbh_ps(h0)));
      const __m256bh l1 = _mm512_cvtneps_pbh(_mm512_sub_ps(v1, _mm512_cvtpbh_ps(h1)));
      hi[i] = _mm512_castsi512_ps(_mm512_inserti64x4(_mm512_castsi256_si512((__m256i)h0), (__m256i)h1, 1));
      lo[i] = _mm512_castsi512_ps(_mm512_inserti64x4(_mm512_castsi256_si512((__m256i)l0), (__m256i)l1, 1));
    }
    transpose16(hi);
    transpose16(lo);
    for (int64_t p = 0; p < 16; ++p) {
      _mm512_storeu_ps(ghi + (k / 2 + p) * TILE_ROWS, hi[p]);
      _mm512_storeu_ps(glo + (k / 2 + p) * TILE_ROWS, lo[p]);
    }
  }
}

// y for `groups` (1 or 2) groups of x from g0 against TILES (1 or 2) weight tiles at n0, accumulators 0..3 (tile
// t, group j: t + 2 j), weights in 4, 5, x's terms in 6 (group 0) and 7 (group 1). Per step and accumulator: hi,
// then lo.
template <int TILES, int GROUPS>
inline void tiles(const uint16_t* w0, const uint16_t* xg, int64_t M, int64_t K, float* y, int64_t N, int64_t n0,
                  int64_t g0, const char* ahead) {
  const int64_t steps = K / TILE_K, ahead_per_step = TILES * TILE_ROWS * TILE_K * 2;
  _tile_zero(0);
  if constexpr (TILES == 2) _tile_zero(1);
  if constexpr (GROUPS == 2) _tile_zero(2);
  if constexpr (TILES == 2 && GROUPS == 2) _tile_zero(3);
  for (int64_t s = 0; s < steps; ++s) {
    if (ahead != nullptr)
      for (int64_t b = 0; b < ahead_per_step; b += 64) _mm_prefetch(ahead + s * ahead_per_step + b, _MM_HINT_T1);
    _tile_loadd(4, w0 + s * TILE_K, K * 2);
    if constexpr (TILES == 2) _tile_loadd(5, w0 + TILE_ROWS * K + s * TILE_K, K * 2);
    // Both groups' hi terms, then both lo terms: an accumulator's two updates of a step are three tile products
    // apart, which hides TDPBF16PS's latency; each output still adds hi, then lo.
    const uint16_t* x0 = xg + s * TILE_ROWS * TILE_K;
    const uint16_t* x1 = x0 + 2 * TILE_ROWS * K;
    for (int64_t term = 0; term < 2; ++term) {
      _tile_loadd(6, x0 + term * TILE_ROWS * K, 64);
      _tile_dpbf16ps(0, 4, 6);
      if constexpr (TILES == 2) _tile_dpbf16ps(1, 5, 6);
      if constexpr (GROUPS == 2) {
        _tile_loadd(7, x1 + term * TILE_ROWS * K, 64);
        _tile_dpbf16ps(2, 4, 7);
        if constexpr (TILES == 2) _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
  alignas(64) float c[4][TILE_ROWS][TILE_ROWS];
  _tile_stored(0, &c[0][0][0], 64);
  if constexpr (TILES == 2) _tile_stored(1, &c[1][0][0], 64);
  if constexpr (GROUPS == 2) _tile_stored(2, &c[2][0][0], 64);
  if constexpr (TILES == 2 && GROUPS == 2) _tile_stored(3, &c[3][0][0], 64);
  for (int j = 0; j < GROUPS; ++j) {
    const int64_t m0 = (g0 + j) * TILE_ROWS, rows = std::min<int64_t>(TILE_ROWS, M - m0);
    for (int64_t i = 0; i < rows; ++i)
      for (int t = 0; t < TILES; ++t) {
        float* out = y + (m0 + i) * N + n0 + t * TILE_ROWS;
        for (int64_t r = 0; r < TILE_ROWS; ++r) out[r] = c[t + 2 * j][r][i];
      }
  }
}

// Weight rows [n0, n0 + 16 TILES) against groups [g_begin, g_end) of the packed x, two at a time; the first
// groups' pass prefetches the block after these rows (the weights a thread is likely to take next, as in the fp32
// kernels).
template <int TILES>
inline void block(const uint16_t* w, const uint16_t* xp, int64_t M, int64_t K, float* y, int64_t N, int64_t n0,
                  int64_t g_begin, int64_t g_end) {
  const uint16_t* w0 = w + n0 * K;
  const char* ahead = g_begin == 0 ? reinterpret_cast<const char*>(w0 + TILES * TILE_ROWS * K) : nullptr;
  int64_t g = g_begin;
  for (; g + 2 <= g_end; g += 2, ahead = nullptr)
    tiles<TILES, 2>(w0, xp + g * 2 * TILE_ROWS * K, M, K, y, N, n0, g, ahead);
  if (g < g_end) tiles<TILES, 1>(w0, xp + g * 2 * TILE_ROWS * K, M, K, y, N, n0, g, ahead);
}

// Groups of x per pass over the weights: as many as keep their packed terms within PASS_BYTES (an L2-resident share,
// read again for every block of weight rows), an even number, at least 2.
constexpr int64_t PASS_BYTES = 1 << 20;
inline int64_t pass_groups(int64_t K) { return std::max<int64_t>(2, PASS_BYTES / (TILE_ROWS * K * 4) / 2 * 2); }

// bf16 values of the packed x of an [M, K] product (the groups' hi and lo terms, 2 * 16 * K apart).
inline int64_t packed_size(int64_t M, int64_t K) { return (M + TILE_ROWS - 1) / TILE_ROWS * 2 * TILE_ROWS * K; }


#if defined(__AMX_INT8__)
#define TF_AMX_INT8 1

// ---- int8 weights with int8 activations (W8A8) on AMX-INT8 tiles. x is quantized per row and 32 columns as the
// VNNI path quantizes it (tf_linear_i8_q8); per 32-column block one TDPBSSD gives the exact int32 dot products of
// 16 weight rows with 16 rows of x, which are converted and added in block order, each times its x scale, into an
// fp32 accumulator per output (acc = fma(float(dot), scale, acc)); the weight row's scale multiplies the sum. The
// VNNI path sums the same exact integers in eight lanes of four columns instead, so the two agree within fp32
// rounding, not bit for bit; rows are kept apart as for bf16 (rows of x padded to 16, one order of blocks).

// Tiles 0 and 3: int32 products of alternate blocks; 1 and 4: their weights (16 rows x 32 bytes); 2 and 5: their x
// (8 rows of 4-column quads x 16 rows of x).
inline void configure_int8() {
  static const TileConfig c = [] {  // static storage: see config()
    TileConfig t;
    for (int i : {0, 3}) t.rows[i] = 16, t.colsb[i] = 64;
    for (int i : {1, 4}) t.rows[i] = 16, t.colsb[i] = 32;
    for (int i : {2, 5}) t.rows[i] = 8, t.colsb[i] = 64;
    return t;
  }();
  _tile_loadconfig(&c);
}

// Group g of the quantized rows xq [M, K] with their scales xs [M, K / 32] (zeros past M) -> out [K / 32][8][16]
// words, block j's column quad r of the group's row i at word (8 j + r) * 16 + i, and sc [K / 32][16] floats.
inline void pack_group_int8(const int8_t* xq, const float* xs, int64_t M, int64_t K, int64_t g, int8_t* out,
                            float* sc) {
  const int64_t rows = std::min<int64_t>(TILE_ROWS, M - g * TILE_ROWS), blocks = K / TILE_K;
  float* words = reinterpret_cast<float*>(out);  // moved as floats: the transpose only shuffles them
  for (int64_t k = 0; k < K; k += 64) {
    const int quads = k + 64 <= K ? 16 : 8;
    const __mmask16 mask = quads == 16 ? 0xFFFF : 0x00FF;
    __m512 r[16];
    for (int64_t i = 0; i < TILE_ROWS; ++i)
      r[i] = i < rows ? _mm512_maskz_loadu_ps(mask, xq + (g * TILE_ROWS + i) * K + k) : _mm512_setzero_ps();
    transpose16(r);
    for (int p = 0; p < quads; ++p) _mm512_storeu_ps(words + (k / 4 + p) * TILE_ROWS, r[p]);
  }
  for (int64_t j = 0; j < blocks; ++j)
    for (int64_t i = 0; i < TILE_ROWS; ++i) sc[j * TILE_ROWS + i] = i < rows ? xs[(g * TILE_ROWS + i) * blocks + j] : 0.0f;
}

// y for group g of x against weight rows [n0, n0 + 16) of w [N, K] (read in place, rows K bytes apart), blocks added
// up in order; `ahead` (or null) is prefetched along the way.
inline void tile_int8(const int8_t* w, const float* row_scale, const int8_t* xg, const float* sc, int64_t M,
                      int64_t K, float* y, int64_t N, int64_t n0, int64_t g, const char* ahead) {
  const int64_t blocks = K / TILE_K;
  const int8_t* w0 = w + n0 * K;
  __m512 acc[16];
  for (auto& a : acc) a = _mm512_setzero_ps();
  alignas(64) int32_t c[2][16][16];  // block j's products land in c[j % 2], read after the next block's store
  auto add = [&](int64_t j) {
    const __m512 s = _mm512_loadu_ps(sc + j * TILE_ROWS);
    for (int r = 0; r < 16; ++r)
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c[j % 2][r])), s, acc[r]);
  };
  auto prefetch = [&](int64_t j) {
    if (ahead != nullptr)
      for (int64_t b = 0; b < TILE_ROWS * TILE_K; b += 64) _mm_prefetch(ahead + j * TILE_ROWS * TILE_K + b, _MM_HINT_T1);
  };
  // Even blocks in tile 0, odd ones in tile 3; a block's product is issued before the previous one is stored, and a
  // stored block is added up after the next one's store, so neither waits on the other.
  auto issue0 = [&](int64_t j) {
    _tile_zero(0);
    _tile_loadd(1, w0 + j * TILE_K, K);
    _tile_loadd(2, xg + j * TILE_ROWS * TILE_K, 64);
    _tile_dpbssd(0, 1, 2);
  };
  auto issue3 = [&](int64_t j) {
    _tile_zero(3);
    _tile_loadd(4, w0 + j * TILE_K, K);
    _tile_loadd(5, xg + j * TILE_ROWS * TILE_K, 64);
    _tile_dpbssd(3, 4, 5);
  };
  issue0(0);
  for (int64_t j = 0; j < blocks; j += 2) {
    prefetch(j);
    if (j + 1 < blocks) issue3(j + 1);
    _tile_stored(0, &c[0][0][0], 64);
    if (j > 0) add(j - 1);
    if (j + 1 < blocks) {
      prefetch(j + 1);
      if (j + 2 < blocks) issue0(j + 2);
      _tile_stored(3, &c[1][0][0], 64);
      add(j);
    }
  }
  add(blocks - 1);
  transpose16(acc);  // acc[i]: row i of x against the 16 weight rows
  const __m512 scale = _mm512_loadu_ps(row_scale + n0);
  const int64_t m0 = g * TILE_ROWS, rows = std::min<int64_t>(TILE_ROWS, M - m0);
  for (int64_t i = 0; i < rows; ++i) _mm512_storeu_ps(y + (m0 + i) * N + n0, _mm512_mul_ps(acc[i], scale));
}

#endif

}  // namespace tf_amx

#endif
