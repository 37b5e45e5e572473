// CPU kernels of the decode path: RMSNorm, and y[M, N] = x[M, K] . W[N, K]^T with W stored as bf16, int8, fp8 (e4m3) or 4-bit codes, x and y float32.
//
// Decode (small M) is memory-bound: each weight is read once, widened to fp32 in registers and used for every
// row of x. Larger M decodes a panel of weight rows into an L1/L2-resident fp32 scratch once and runs an fp32
// register-blocked kernel over all rows. Threads split the output features.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "amx.h"
#include "simd.h"

namespace {

using tf::exp256;
using tf::hsum;
using tf::rmsnorm_row;

constexpr int NB = 4;  // weight rows per block

// A decoder yields STEP consecutive weights of row n from column k as STEP/8 fp32 vectors (block scales
// applied) and a per-row scale applied to the finished dot product.
struct BF16 {
  static constexpr int STEP = 16, BITS = 16;
  const uint16_t* w;
  int64_t K;
  const void* data() const { return w; }
  inline void load(int64_t n, int64_t k, __m256* out) const {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + n * K + k));
    out[0] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(h)), 16));
    out[1] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(h, 1)), 16));
  }
  inline float row_scale(int64_t) const { return 1.0f; }
};

struct I8 {
  static constexpr int STEP = 8, BITS = 8;
  const int8_t* w;
  const float* scale;
  int64_t K;
  const void* data() const { return w; }
  inline void load(int64_t n, int64_t k, __m256* out) const {
    __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + n * K + k));
    out[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  }
  inline float row_scale(int64_t n) const { return scale[n]; }
};

// e4m3 -> fp16 by moving the bits: exponent and mantissa land in place, the value comes out 2^-8 too small
// (bias 15 vs 7), subnormals included; the 2^8 goes into the row scale.
struct FP8 {
  static constexpr int STEP = 8, BITS = 8;
  const uint8_t* w;
  const float* scale;
  int64_t K;
  const void* data() const { return w; }
  inline void load(int64_t n, int64_t k, __m256* out) const {
    __m128i h = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + n * K + k)));
    __m128i mag = _mm_slli_epi16(_mm_and_si128(h, _mm_set1_epi16(0x7F)), 7);
    __m128i sgn = _mm_slli_epi16(_mm_and_si128(h, _mm_set1_epi16(0x80)), 8);
    out[0] = _mm256_cvtph_ps(_mm_or_si128(mag, sgn));
  }
  inline float row_scale(int64_t n) const { return scale[n] * 256.0f; }
};

// Two 4-bit codes per byte, even column in the low nibble; a 16-entry int8 table gives each code's value
// (exact small integers: int4 -8..7, NVFP4's E2M1 doubled), an fp16 scale per group of columns, a float
// per row (NVFP4's per-tensor scale; rows may be null for none) times the table's multiplier.
struct LUT4 {
  static constexpr int STEP = 16, BITS = 4;
  const uint8_t* packed;
  const uint16_t* scales;
  const float* rows;
  __m128i lut;
  float lut_mult;
  int64_t K, group;
  const void* data() const { return packed; }
  inline void load(int64_t n, int64_t k, __m256* out) const {
    __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + (n * K + k) / 2));
    __m128i m = _mm_set1_epi8(0x0F);
    __m128i idx = _mm_unpacklo_epi8(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 4), m));
    __m128i v = _mm_shuffle_epi8(lut, idx);
    __m256 s = _mm256_set1_ps(_cvtsh_ss(scales[(n * K + k) / group]));
    out[0] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), s);
    out[1] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8))), s);
  }
  inline float row_scale(int64_t n) const { return (rows != nullptr ? rows[n] : 1.0f) * lut_mult; }
};

// Software prefetch for the streaming paths. A block of NBK rows is read as NBK interleaved streams of a few
// cache lines each, too short for the hardware prefetcher to train on (measured: 17 GB/s of a 26 GB/s ceiling
// over a 335 MB bf16 matrix, 2 cores); fetching the weights PREFETCH_AHEAD bytes ahead of the block's progress,
// linearly in memory, reaches the ceiling. The weights of consecutive blocks are contiguous, so the addresses
// ahead are the rows the thread reads next (or a neighbour's, which is harmless); prefetching past the end of
// the matrix does not fault.
constexpr int64_t PREFETCH_AHEAD = 8192;

// Prefetch what rows [n0, n0 + NBK) read next when they are at column k and advance by `cols` columns.
template <class D, int NBK>
inline void prefetch_block(const D& d, int64_t K, int64_t n0, int64_t k, int64_t cols) {
  const char* p = static_cast<const char*>(d.data()) + (n0 * K + k * NBK) * D::BITS / 8 + PREFETCH_AHEAD;
  for (int64_t b = 0; b < cols * NBK * D::BITS / 8; b += 64) _mm_prefetch(p + b, _MM_HINT_T1);
}

// ---- One order of accumulation for every batch size and ISA level. Each output y[m, n] is summed in eight lanes,
// lane l taking the products of columns k = l, l + 8, l + 16, ... in increasing k as one FMA chain from zero; the
// lanes are then added as hsum adds them, ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)), and the row scale is
// applied last. The direct path (small M) computes exactly that with an 8-wide vector per output; the GEMM path
// (larger M) vectorizes over rows of x instead and runs the eight lanes as eight passes. So a row's result is the
// same bits whatever else is in the batch, and the same on AVX2 and AVX-512 (FMA rounds once).

// Rows [m0, m0+MB) of x against weight rows [n0, n0+NBK), decoding weights on the fly: one accumulator per output.
template <class D, int MB, int NBK>
inline void tile_direct(const D& d, const float* x, int64_t K, float* y, int64_t N, int64_t m0, int64_t n0) {
  constexpr int V = D::STEP / 8;
  __m256 acc[MB][NBK];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NBK; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += D::STEP) {
    prefetch_block<D, NBK>(d, K, n0, k, D::STEP);
    __m256 w[NBK][V];
    for (int j = 0; j < NBK; ++j) d.load(n0 + j, k, w[j]);
    for (int s = 0; s < V; ++s)
      for (int i = 0; i < MB; ++i) {
        __m256 xv = _mm256_loadu_ps(x + (m0 + i) * K + k + 8 * s);
        for (int j = 0; j < NBK; ++j) acc[i][j] = _mm256_fmadd_ps(w[j][s], xv, acc[i][j]);
      }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NBK; ++j) y[(m0 + i) * N + n0 + j] = hsum(acc[i][j]) * d.row_scale(n0 + j);
}

// Row n of W as fp32 into out [K] (block scales applied, the row scale not).
template <class D>
inline void decode_row(const D& d, int64_t n, int64_t K, float* out) {
  constexpr int V = D::STEP / 8;
  for (int64_t k = 0; k < K; k += D::STEP) {
    __m256 w[V];
    d.load(n, k, w);
    for (int s = 0; s < V; ++s) _mm256_storeu_ps(out + k + 8 * s, w[s]);
  }
}

template <class D, int NBK>
inline void block_direct(const D& d, const float* x, int64_t M, int64_t K, float* y, int64_t N, int64_t n0) {
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) tile_direct<D, 2, NBK>(d, x, K, y, N, m, n0);
  for (; m < M; ++m) tile_direct<D, 1, NBK>(d, x, K, y, N, m, n0);
}

// ---- GEMM path (M >= PANEL_MIN_M). x is transposed once per call into xt (see transpose_x; Mp is M rounded up to
// 8, zero rows beyond M), weights are decoded PANEL_ROWS rows at a time into an fp32 panel [rows, K], and a
// register tile of weight rows against 16 (AVX2) or 32 (AVX-512) rows of x sweeps it once per lane: per column
// vector loads of xt and broadcast weights, no horizontal sums.
constexpr int64_t PANEL_ROWS = 24;

// xt holds x's rows in groups of 16 (the last of 8 where Mp says so), each group transposed on its own with its
// columns in lane order: group g starts at 16 g K and holds [8 lanes][K / 8][width], element (k, i) at
// ((k % 8) * (K / 8) + k / 8) * width + i, so each lane's pass streams one contiguous block.
inline void transpose_x(const float* x, int64_t M, int64_t K, float* xt, int64_t Mp) {
  const int64_t K8 = K / 8;
  for (int64_t m0 = 0; m0 < Mp; m0 += 16) {
    const int64_t width = std::min<int64_t>(16, Mp - m0);
    float* group = xt + m0 * K;
    for (int64_t i = 0; i < width; ++i)
      for (int64_t k = 0; k < K; ++k)
        group[((k % 8) * K8 + k / 8) * width + i] = m0 + i < M ? x[(m0 + i) * K + k] : 0.0f;
  }
}

// The lanes' partial sums of a tile combined in hsum's order and scaled: part [8][R][rows] -> y.
template <int R>
inline void finish_tile(const float* part, int rows_x, int64_t m0, int64_t M, float* y, int64_t N, int64_t n0,
                        const float* scale) {
  const int64_t stride = static_cast<int64_t>(R) * rows_x;
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < rows_x && m0 + i < M; ++i) {
      const float* p = part + r * rows_x + i;
      const float sum = ((p[0] + p[4 * stride]) + (p[2 * stride] + p[6 * stride])) +
                        ((p[stride] + p[5 * stride]) + (p[3 * stride] + p[7 * stride]));
      y[(m0 + i) * N + n0 + r] = sum * scale[r];
    }
}

// y[m, n0 + r] for R panel rows (starting at `panel`) and rows m0 .. m0 + 8 MV of x (those below M), 8-wide.
template <int R, int MV>
__attribute__((always_inline)) inline void tile_gemm(const float* panel, int64_t K, const float* xt, int64_t m0,
                                                     int64_t M, float* y, int64_t N, int64_t n0, const float* scale) {
  const int64_t K8 = K / 8;
  alignas(32) float part[8][R][MV * 8];
  const float* xp = xt + m0 * K;
  for (int l = 0; l < 8; ++l) {
    __m256 acc[R][MV];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < MV; ++v) acc[r][v] = _mm256_setzero_ps();
    const float* xl = xp + l * K8 * 8 * MV;
    for (int64_t kk = 0; kk < K8; ++kk) {
      __m256 xv[MV];
#pragma GCC unroll 2
      for (int v = 0; v < MV; ++v) xv[v] = _mm256_loadu_ps(xl + kk * 8 * MV + 8 * v);
#pragma GCC unroll 6
      for (int r = 0; r < R; ++r) {
        const __m256 w = _mm256_broadcast_ss(panel + r * K + kk * 8 + l);
#pragma GCC unroll 2
        for (int v = 0; v < MV; ++v) acc[r][v] = _mm256_fmadd_ps(w, xv[v], acc[r][v]);
      }
    }
    // Stored all at once with the loops unrolled: otherwise GCC keeps a memory copy of every accumulator up to
    // date inside the k loop (measured: half the speed).
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
      for (int v = 0; v < MV; ++v) _mm256_store_ps(&part[l][r][8 * v], acc[r][v]);
  }
  finish_tile<R>(&part[0][0][0], 8 * MV, m0, M, y, N, n0, scale);
}

#ifdef __AVX512F__
// The same for two groups of 16 rows of x (32 rows, one zmm per group) against R panel rows.
template <int R>
__attribute__((always_inline)) inline void tile_gemm512(const float* panel, int64_t K, const float* xt, int64_t m0,
                                                        int64_t M, float* y, int64_t N, int64_t n0,
                                                        const float* scale) {
  const int64_t K8 = K / 8;
  alignas(64) float part[8][R][32];
  const float* g0 = xt + m0 * K;
  const float* g1 = g0 + 16 * K;
  for (int l = 0; l < 8; ++l) {
    __m512 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    const float* x0 = g0 + l * K8 * 16;
    const float* x1 = g1 + l * K8 * 16;
    for (int64_t kk = 0; kk < K8; ++kk) {
      const __m512 a = _mm512_loadu_ps(x0 + kk * 16), b = _mm512_loadu_ps(x1 + kk * 16);
#pragma GCC unroll 12
      for (int r = 0; r < R; ++r) {
        const __m512 w = _mm512_set1_ps(panel[r * K + kk * 8 + l]);
        acc[r][0] = _mm512_fmadd_ps(w, a, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(w, b, acc[r][1]);
      }
    }
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      _mm512_store_ps(&part[l][r][0], acc[r][0]);
      _mm512_store_ps(&part[l][r][16], acc[r][1]);
    }
  }
  finish_tile<R>(&part[0][0][0], 32, m0, M, y, N, n0, scale);
}

// tile_gemm512<r> for r in 1 .. R.
template <int R>
inline void tile_rows512(int r, const float* panel, int64_t K, const float* xt, int64_t m0, int64_t M, float* y,
                         int64_t N, int64_t n0, const float* scale) {
  if (r == R) {
    tile_gemm512<R>(panel, K, xt, m0, M, y, N, n0, scale);
  } else if constexpr (R > 1) {
    tile_rows512<R - 1>(r, panel, K, xt, m0, M, y, N, n0, scale);
  }
}
#endif

template <int MV>
inline void tile_rows(int rows, const float* panel, int64_t K, const float* xt, int64_t m0, int64_t M, float* y,
                      int64_t N, int64_t n0, const float* scale) {
  switch (rows) {
    case 1: tile_gemm<1, MV>(panel, K, xt, m0, M, y, N, n0, scale); break;
    case 2: tile_gemm<2, MV>(panel, K, xt, m0, M, y, N, n0, scale); break;
    case 3: tile_gemm<3, MV>(panel, K, xt, m0, M, y, N, n0, scale); break;
    case 4: tile_gemm<4, MV>(panel, K, xt, m0, M, y, N, n0, scale); break;
    case 5: tile_gemm<5, MV>(panel, K, xt, m0, M, y, N, n0, scale); break;
    default: tile_gemm<6, MV>(panel, K, xt, m0, M, y, N, n0, scale); break;
  }
}

// Rows m0 .. of x (up to 32, or 16 / 8 at the end of xt) against panel rows [r0, r0 + rows).
inline void tile_any(int64_t rows, const float* panel, int64_t K, const float* xt, int64_t m0, int64_t Mp,
                     int64_t M, float* y, int64_t N, int64_t n0, const float* scale) {
#ifdef __AVX512F__
  if (m0 + 32 <= Mp) {
    for (int64_t r0 = 0; r0 < rows; r0 += 12)
      tile_rows512<12>(static_cast<int>(std::min<int64_t>(12, rows - r0)), panel + r0 * K, K, xt, m0, M, y, N,
                       n0 + r0, scale + r0);
    return;
  }
#endif
  for (int64_t m = m0; m < std::min(Mp, m0 + 32); m += 16)
    for (int64_t r0 = 0; r0 < rows; r0 += 6) {
      const int r = static_cast<int>(std::min<int64_t>(6, rows - r0));
      if (m + 16 <= Mp)
        tile_rows<2>(r, panel + r0 * K, K, xt, m, M, y, N, n0 + r0, scale + r0);
      else
        tile_rows<1>(r, panel + r0 * K, K, xt, m, M, y, N, n0 + r0, scale + r0);
    }
}

// Weight rows [n0, n0 + rows) (rows <= PANEL_ROWS) against every row of x.
template <class D>
void block_gemm(const D& d, const float* xt, int64_t Mp, int64_t M, int64_t K, float* y, int64_t N, int64_t n0,
                int64_t rows, float* panel) {
  float scale[PANEL_ROWS];
  for (int64_t j = 0; j < rows; ++j) {
    decode_row(d, n0 + j, K, panel + j * K);
    scale[j] = d.row_scale(n0 + j);
  }
  for (int64_t m0 = 0; m0 < Mp; m0 += 32) tile_any(rows, panel, K, xt, m0, Mp, M, y, N, n0, scale);
}

// Below this many rows the weights are decoded in registers for every pair of rows of x (measured against the
// GEMM tile: ahead at 4 rows, within 10-20 % at 5-7, behind from 8).
constexpr int64_t PANEL_MIN_M = 8;

// Work is handed out in chunks rather than split statically: on a shared machine a descheduled thread then
// delays the call by one chunk, not by half the matrix. Few, long chunks stream best (each chunk start
// restarts the prefetch; 4 per thread measured 27-32 GB/s against 26-30 for 16).
constexpr int64_t CHUNKS_PER_THREAD = 4;
// The dynamic schedule's chunk for `blocks` tasks shared by `threads` (see CHUNKS_PER_THREAD).
inline int64_t chunk_of(int64_t blocks, int threads) {
  return std::max<int64_t>(1, blocks / (CHUNKS_PER_THREAD * threads));
}

// Block b of BLOCK weight rows through `block(n0)`, or row by row through `row(n)` where it would pass N.
template <int BLOCK = NB, class Block, class Row>
inline void row_block(int64_t b, int64_t N, Block&& block, Row&& row) {
  const int64_t n0 = b * BLOCK;
  if (n0 + BLOCK > N) {
    for (int64_t n = n0; n < N; ++n) row(n);
  } else {
    block(n0);
  }
}

// Scratch of a product shared by the threads of the region (each also has a panel of its own): x transposed for the
// fp32 GEMM tiles, or split into bf16 terms for the AMX tiles, in a buffer of the thread that prepared it.
struct GemmScratch {
  float* xt = nullptr;
  uint16_t* xb = nullptr;
};

#ifdef TF_AMX
// bf16 weights on AMX tiles (amx.h): tasks of 32 weight rows (the last of 16) in passes over a share of x's groups,
// rows past the last block of 16 on the direct fp32 kernel. x is split into bf16 terms once, each thread packing
// whole groups of 16 rows (or, for one group, every thread the group).
inline void linear_amx(const BF16& d, const float* x, float* y, int64_t M, int64_t N, int64_t K,
                       GemmScratch& shared) {
  using namespace tf_amx;
  const int threads = omp_get_num_threads();
  const int64_t groups = (M + TILE_ROWS - 1) / TILE_ROWS;
  const uint16_t* xb;
  if (groups == 1) {  // decode-sized: each thread packs its own copy, no barrier before the tiles
    xb = tf::reusable<uint16_t, 1>(packed_size(M, K));
    pack_group(x, M, K, 0, const_cast<uint16_t*>(xb));
  } else {
#pragma omp single
    shared.xb = tf::reusable<uint16_t, 0>(packed_size(M, K));
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g) pack_group(x, M, K, g, shared.xb + g * 2 * TILE_ROWS * K);
    xb = shared.xb;
  }
  configure();
  const int64_t tiled = N / TILE_ROWS * TILE_ROWS, blocks = (tiled + BLOCK_N - 1) / BLOCK_N, pass = pass_groups(K);
  for (int64_t g0 = 0; g0 < groups; g0 += pass) {
    const int64_t g1 = std::min(groups, g0 + pass);
#pragma omp for schedule(dynamic, chunk_of(blocks, threads)) nowait
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t n0 = b * BLOCK_N;
      if (n0 + BLOCK_N <= tiled)
        block<2>(d.w, xb, M, K, y, N, n0, g0, g1);
      else
        block<1>(d.w, xb, M, K, y, N, n0, g0, g1);
    }
  }
#pragma omp for schedule(static)
  for (int64_t n = tiled; n < N; ++n) block_direct<BF16, 1>(d, x, M, K, y, N, n);
}
#endif

#if defined(__AVX512BF16__) && !defined(TF_AMX)
#define TF_DPBF16 1
// bf16 weights with vdpbf16ps (the avx512_bf16 level: AVX-512 BF16 without AMX tiles, e.g. AMD Zen 4). As on the
// tiles, x is split into hi = bf16(x) and lo = bf16(x - hi) (16 of its 24 significand bits) and the products of two
// bf16 values are exact in fp32; each vdpbf16ps adds 32 of them into 16 fp32 lanes. Every output y[m, n] is one
// accumulator: lane j takes the column pair (2j, 2j + 1) of each 32-column step, steps in increasing k, the
// weights' products with hi and then with lo; the lanes are summed last by one fixed reduction. Every tile shape
// (1-4 rows of x against 1, 4 or 8 weight rows) runs that sequence for each of its outputs, so a row's result is
// the same bits alone or in any batch; it stays within TILE_TOLERANCE of the fp32 kernels' result (a different
// order of additions over x rounded to 16 bits), as the tiles' does.
namespace tf_dpbf16 {

constexpr int64_t STEP = 32;   // columns per vdpbf16ps
constexpr int64_t ROWS = 4;    // rows of x per tile
constexpr int64_t CHUNK_BYTES = 256 << 10;  // x's terms per pass over the weights (they stay in L2)

inline bool runs(int64_t K) { return K % STEP == 0; }

// Row m of x -> its terms at xs + 2 m K: hi [K], then (TERMS == 2) lo [K]. With one term x is simply rounded to
// bf16 (bf16 activations: vLLM's and oneDNN's precision, half the products).
template <int TERMS>
inline void split_row(const float* x, int64_t K, uint16_t* xs) {
  for (int64_t k = 0; k < K; k += 16) {
    const __m512 v = _mm512_loadu_ps(x + k);
    const __m256bh h = _mm512_cvtneps_pbh(v);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xs + k), reinterpret_cast<const __m256i&>(h));
    if constexpr (TERMS == 2) {
      const __m256bh l = _mm512_cvtneps_pbh(_mm512_sub_ps(v, _mm512_cvtpbh_ps(h)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xs + K + k), reinterpret_cast<const __m256i&>(l));
    }
  }
}

// Rows [m0, m0 + MB) of x (terms xs) against weight rows [n0, n0 + NBK); PREFETCH streams the weights ahead (the
// small-M, memory-bound shapes).
template <int TERMS, int MB, int NBK, bool PREFETCH>
inline void tile(const BF16& d, const uint16_t* xs, int64_t K, float* y, int64_t N, int64_t m0, int64_t n0) {
  __m512 acc[MB][NBK];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NBK; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += STEP) {
    if constexpr (PREFETCH) prefetch_block<BF16, NBK>(d, K, n0, k, STEP);
    __m512bh w[NBK];
    for (int j = 0; j < NBK; ++j) w[j] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(d.w + (n0 + j) * K + k));
    for (int i = 0; i < MB; ++i) {
      const uint16_t* row = xs + 2 * (m0 + i) * K + k;
      const __m512bh hi = reinterpret_cast<__m512bh>(_mm512_loadu_si512(row));
      for (int j = 0; j < NBK; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], w[j], hi);
      if constexpr (TERMS == 2) {
        const __m512bh lo = reinterpret_cast<__m512bh>(_mm512_loadu_si512(row + K));
        for (int j = 0; j < NBK; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], w[j], lo);
      }
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NBK; ++j) y[(m0 + i) * N + n0 + j] = _mm512_reduce_add_ps(acc[i][j]);
}

// Rows [m0, m1) of x against weight rows [n0, n0 + NBK), ROWS at a time; the first tile fetches the weights ahead
// of the block's progress (the later ones find them in cache).
template <int TERMS, int NBK>
inline void rows_of_x(const BF16& d, const uint16_t* xs, int64_t K, float* y, int64_t N, int64_t m0, int64_t m1,
                      int64_t n0) {
  int64_t m = m0;
  if (m + ROWS <= m1) {
    tile<TERMS, ROWS, NBK, true>(d, xs, K, y, N, m, n0);
    m += ROWS;
  }
  for (; m + ROWS <= m1; m += ROWS) tile<TERMS, ROWS, NBK, false>(d, xs, K, y, N, m, n0);
  const bool first = m == m0;
  switch (m1 - m) {
    case 3:
      first ? tile<TERMS, 3, NBK, true>(d, xs, K, y, N, m, n0) : tile<TERMS, 3, NBK, false>(d, xs, K, y, N, m, n0);
      break;
    case 2:
      first ? tile<TERMS, 2, NBK, true>(d, xs, K, y, N, m, n0) : tile<TERMS, 2, NBK, false>(d, xs, K, y, N, m, n0);
      break;
    case 1:
      first ? tile<TERMS, 1, NBK, true>(d, xs, K, y, N, m, n0) : tile<TERMS, 1, NBK, false>(d, xs, K, y, N, m, n0);
      break;
    default: break;
  }
}

// The product for the threads of the enclosing region: x split once (by each thread for itself when it is a few
// rows, no barrier; else shared), then blocks of weight rows handed out per pass over CHUNK_BYTES of x's terms.
template <int TERMS>
inline void linear_terms(const BF16& d, const float* x, float* y, int64_t M, int64_t N, int64_t K,
                         GemmScratch& shared) {
  const int threads = omp_get_num_threads();
  const uint16_t* xs;
  if (M <= ROWS) {
    uint16_t* own = tf::reusable<uint16_t, 1>(2 * M * K);
    for (int64_t m = 0; m < M; ++m) split_row<TERMS>(x + m * K, K, own + 2 * m * K);
    xs = own;
  } else {
#pragma omp single
    shared.xb = tf::reusable<uint16_t, 0>(2 * M * K);
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) split_row<TERMS>(x + m * K, K, shared.xb + 2 * m * K);
    xs = shared.xb;
  }
  if (M == 1) {  // eight weight rows a block: eight independent chains hide the latency
    const int64_t blocks = (N + 2 * NB - 1) / (2 * NB);
#pragma omp for schedule(dynamic, chunk_of(blocks, threads))
    for (int64_t b = 0; b < blocks; ++b)
      row_block<2 * NB>(b, N, [&](int64_t n0) { tile<TERMS, 1, 2 * NB, true>(d, xs, K, y, N, 0, n0); },
                        [&](int64_t n) { tile<TERMS, 1, 1, true>(d, xs, K, y, N, 0, n); });
    return;
  }
  const int64_t blocks = (N + NB - 1) / NB;
  const int64_t chunk = std::max<int64_t>(ROWS, CHUNK_BYTES / (2 * TERMS * K) / ROWS * ROWS);
  for (int64_t c0 = 0; c0 < M; c0 += chunk) {
    const int64_t c1 = std::min(M, c0 + chunk);
#pragma omp for schedule(dynamic, chunk_of(blocks, threads))
    for (int64_t b = 0; b < blocks; ++b)
      row_block(b, N, [&](int64_t n0) { rows_of_x<TERMS, NB>(d, xs, K, y, N, c0, c1, n0); },
                [&](int64_t n) { rows_of_x<TERMS, 1>(d, xs, K, y, N, c0, c1, n); });
  }
}

inline void linear(const BF16& d, const float* x, float* y, int64_t M, int64_t N, int64_t K, GemmScratch& shared,
                   bool bf16_x) {
  if (bf16_x) linear_terms<1>(d, x, y, M, N, K, shared);
  else linear_terms<2>(d, x, y, M, N, K, shared);
}

}  // namespace tf_dpbf16
#endif

// The blocks of y's N columns shared among the threads of the enclosing parallel region (an orphaned omp for:
// the caller opens the region, so several products can run in one). `panel`: PANEL_ROWS * K floats of this
// thread's own when M >= PANEL_MIN_M; `shared`: one for the whole region. `bf16_x`: bf16 weights take x rounded
// to bf16 where the level computes bf16 natively with vdpbf16ps (see tf_bf16_activations); fp32 x elsewhere.
template <class D>
void linear_shared(const D& d, const float* x, float* y, int64_t M, int64_t N, int64_t K, float* panel,
                   GemmScratch& shared, bool bf16_x = false) {
  const int threads = omp_get_num_threads();
#ifdef TF_AMX
  if constexpr (std::is_same_v<D, BF16>) {
    if (tf_amx::runs(N, K)) {
      linear_amx(d, x, y, M, N, K, shared);
      return;
    }
  }
#endif
#ifdef TF_DPBF16
  if constexpr (std::is_same_v<D, BF16>) {
    if (tf_dpbf16::runs(K)) {
      tf_dpbf16::linear(d, x, y, M, N, K, shared, bf16_x);
      return;
    }
  }
#endif
  if (M >= PANEL_MIN_M) {
    const int64_t Mp = (M + 7) / 8 * 8;
#pragma omp single
    {
      shared.xt = tf::reusable<float, 0>(K * Mp);
      transpose_x(x, M, K, shared.xt, Mp);
    }
    const int64_t blocks = (N + PANEL_ROWS - 1) / PANEL_ROWS;
#pragma omp for schedule(dynamic, chunk_of(blocks, threads))
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t n0 = b * PANEL_ROWS;
      block_gemm(d, shared.xt, Mp, M, K, y, N, n0, std::min(PANEL_ROWS, N - n0), panel);
    }
    return;
  }
  if (M == 1) {  // eight weight rows a block: eight independent FMA chains hide the FMA latency
    const int64_t blocks = (N + 2 * NB - 1) / (2 * NB);
#pragma omp for schedule(dynamic, chunk_of(blocks, threads))
    for (int64_t b = 0; b < blocks; ++b)
      row_block<2 * NB>(b, N, [&](int64_t n0) { block_direct<D, 2 * NB>(d, x, M, K, y, N, n0); },
                        [&](int64_t n) { block_direct<D, 1>(d, x, M, K, y, N, n); });
    return;
  }
  const int64_t blocks = (N + NB - 1) / NB;
#pragma omp for schedule(dynamic, chunk_of(blocks, threads))
  for (int64_t b = 0; b < blocks; ++b)
    row_block(b, N, [&](int64_t n0) { block_direct<D, NB>(d, x, M, K, y, N, n0); },
              [&](int64_t n) { block_direct<D, 1>(d, x, M, K, y, N, n); });
}

template <class D>
void linear(const D& d, const float* x, float* y, int64_t M, int64_t N, int64_t K, int threads, bool bf16_x = false) {
  GemmScratch shared;
#pragma omp parallel num_threads(threads)
  {
    float* panel = tf::reusable<float, 2>(M >= PANEL_MIN_M ? PANEL_ROWS * K : 0);
    linear_shared(d, x, y, M, N, K, panel, shared, bf16_x);
  }
}

template <class D>
void dequantize(const D& d, float* out, int64_t N, int64_t K, int threads) {
#pragma omp parallel for schedule(dynamic, 64) num_threads(threads)
  for (int64_t n = 0; n < N; ++n) {
    decode_row(d, n, K, out + n * K);
    const float s = d.row_scale(n);
    if (s != 1.0f)
      for (int64_t k = 0; k < K; ++k) out[n * K + k] *= s;
  }
}

// ---- Integer paths: activations quantized to int8 per 32 columns (scale = max|x| / 127), products summed
// exactly in int32 (tf::dot_u8s8), one float FMA per 32 weights. Each row of x is quantized on its own, so a row's
// result does not depend on the other rows in the batch.

struct Q8Rows {
  int8_t* q;  // [M, K]
  float* s;   // [M, K / 32]
};

// For 4-bit codes the columns of each 16-group are stored even-then-odd, the order nibbles unpack in. Rows are
// quantized on their own, by `threads` threads for a large x, into the calling thread's reusable buffers.
Q8Rows quantize_rows(const float* x, int64_t M, int64_t K, bool even_odd_16, int threads) {
  const Q8Rows r{tf::reusable<int8_t, 0>(M * K), tf::reusable<float, 1>(M * (K / 32))};
  const int nt = M * K >= (1 << 16) ? threads : 1;
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < K / 32; ++j) {
      const float* xb = x + m * K + j * 32;
      float amax = 0.0f;
      for (int c = 0; c < 32; ++c) amax = std::max(amax, std::fabs(xb[c]));
      const float scale = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      r.s[m * (K / 32) + j] = scale;
      int8_t* qb = r.q + m * K + j * 32;
      for (int c = 0; c < 32; ++c) {
        const int dst = even_odd_16 ? (c & ~15) + ((c & 15) >> 1) + 8 * (c & 1) : c;
        qb[dst] = static_cast<int8_t>(std::nearbyint(xb[c] * inv));
      }
    }
  return r;
}

inline __m256 int_dot(__m256i absw, __m256i signw, const int8_t* xq) {
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
  return _mm256_cvtepi32_ps(tf::dot_u8s8(absw, _mm256_sign_epi8(xv, signw)));
}

// 32 weights of one row as (|w|, w) int8 vectors plus their scale per 32-bit lane.
struct Lut4Int {
  static constexpr int BITS = 4;
  const uint8_t* packed;
  const uint16_t* scales;
  const float* rows;
  __m256i lut;
  float lut_mult;
  int64_t K, group;
  bool fp8_scales;  // group 16 only: scales are e4m3 bytes (NVFP4 as stored) rather than fp16
  const void* data() const { return packed; }
  inline void load(int64_t n, int64_t j, __m256i& absw, __m256i& w, __m256& scale) const {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + n * K / 2 + j * 16));
    const __m128i hi = _mm_srli_epi16(b, 4);
    const __m256i idx = _mm256_and_si256(_mm256_set_m128i(_mm_unpackhi_epi64(b, hi), _mm_unpacklo_epi64(b, hi)),
                                         _mm256_set1_epi8(0x0F));
    w = _mm256_shuffle_epi8(lut, idx);
    absw = _mm256_sign_epi8(w, w);
    if (group == 16) {
      int32_t two = 0;
      if (fp8_scales) {
        // e4m3 -> fp16 bits as in FP8 above; the 2^8 is in lut_mult.
        std::memcpy(&two, reinterpret_cast<const uint8_t*>(scales) + n * (K / 16) + 2 * j, 2);
        const __m128i h = _mm_cvtepu8_epi16(_mm_cvtsi32_si128(two));
        two = _mm_cvtsi128_si32(_mm_or_si128(_mm_slli_epi16(_mm_and_si128(h, _mm_set1_epi16(0x7F)), 7),
                                             _mm_slli_epi16(_mm_and_si128(h, _mm_set1_epi16(0x80)), 8)));
      } else {
        std::memcpy(&two, scales + n * (K / 16) + 2 * j, sizeof two);
      }
      const __m128 s2 = _mm_cvtph_ps(_mm_cvtsi32_si128(two));
      scale = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(s2), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
    } else {
      scale = _mm256_set1_ps(_cvtsh_ss(scales[(n * K + j * 32) / group]));
    }
  }
  inline float row_scale(int64_t n) const { return (rows != nullptr ? rows[n] : 1.0f) * lut_mult; }
};

struct I8Int {
  static constexpr int BITS = 8;
  const int8_t* w;
  const float* scale_;
  int64_t K;
  const void* data() const { return w; }
  inline void load(int64_t n, int64_t j, __m256i& absw, __m256i& wv, __m256& scale) const {
    wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + n * K + j * 32));
    absw = _mm256_sign_epi8(wv, wv);  // -128 stays 0x80, read as unsigned 128
    scale = _mm256_set1_ps(1.0f);
  }
  inline float row_scale(int64_t n) const { return scale_[n]; }
};

template <class D, int MB, int NBK>
inline void tile_int(const D& d, const Q8Rows& xr, int64_t K, float* y, int64_t N, int64_t m0, int64_t n0) {
  __m256 acc[MB][NBK];
  for (int i = 0; i < MB; ++i)
    for (int jn = 0; jn < NBK; ++jn) acc[i][jn] = _mm256_setzero_ps();
  const int64_t blocks = K / 32;
  for (int64_t j = 0; j < blocks; ++j) {
    prefetch_block<D, NBK>(d, K, n0, j * 32, 32);
    for (int jn = 0; jn < NBK; ++jn) {
      __m256i absw, w;
      __m256 ws;
      d.load(n0 + jn, j, absw, w, ws);
      for (int i = 0; i < MB; ++i) {
        const int64_t m = m0 + i;
        const __m256 s = _mm256_mul_ps(ws, _mm256_set1_ps(xr.s[m * blocks + j]));
        acc[i][jn] = _mm256_fmadd_ps(int_dot(absw, w, xr.q + m * K + j * 32), s, acc[i][jn]);
      }
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int jn = 0; jn < NBK; ++jn) y[(m0 + i) * N + n0 + jn] = hsum(acc[i][jn]) * d.row_scale(n0 + jn);
}

template <class D, int NBK>
inline void block_int(const D& d, const Q8Rows& xr, int64_t M, int64_t K, float* y, int64_t N, int64_t n0) {
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) tile_int<D, 2, NBK>(d, xr, K, y, N, m, n0);
  for (; m < M; ++m) tile_int<D, 1, NBK>(d, xr, K, y, N, m, n0);
}

#ifdef TF_AMX_INT8
// Row m of x against weight rows [n0, n0 + 16) in the tile path's arithmetic (amx.h, tile_int8), its exact block dot
// products taken with VNNI instead of a tile product (which would be 15/16 padding for one row): the same integers,
// converted and added to the same accumulators in the same order, so the same bits. Integer sums are exact in any
// order, so each row's eight VNNI lanes are summed by horizontal adds.
inline void row_int8_vnni(const I8Int& d, const Q8Rows& xr, int64_t m, int64_t K, float* y, int64_t N, int64_t n0) {
  const int64_t blocks = K / 32;
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < blocks; ++j) {
    prefetch_block<I8Int, 16>(d, K, n0, j * 32, 32);
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr.q + m * K + j * 32));
    __m128i sums[4];  // rows n0 + 4q .. n0 + 4q + 3
    for (int q = 0; q < 4; ++q) {
      __m256i dots[4];
      for (int r = 0; r < 4; ++r) {
        __m256i absw, w;
        __m256 unit;
        d.load(n0 + 4 * q + r, j, absw, w, unit);
        dots[r] = tf::dot_u8s8(absw, _mm256_sign_epi8(xv, w));
      }
      const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(dots[0], dots[1]), _mm256_hadd_epi32(dots[2], dots[3]));
      sums[q] = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    }
    const __m512i dot = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set_m128i(sums[1], sums[0])),
                                           _mm256_set_m128i(sums[3], sums[2]), 1);
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(xr.s[m * blocks + j]), acc);
  }
  _mm512_storeu_ps(y + m * N + n0, _mm512_mul_ps(acc, _mm512_loadu_ps(d.scale_ + n0)));
}

// Below this many rows of x the block dot products are taken with VNNI (row_int8_vnni), from it on tiles (measured
// on the 262144 x 640 head: 1 row 6.3 ms on VNNI, 2-4 rows 9 ms on tiles against 12.6-25 ms row by row).
constexpr int64_t INT8_TILE_MIN_M = 2;

// int8 weights on AMX-INT8 tiles (amx.h): tasks of 16 weight rows against every group of 16 rows of x, each thread
// packing whole groups first; rows past the last tile on the VNNI kernel (whose order does not depend on M either).
inline void linear_i8_amx(const I8Int& d, const Q8Rows& xr, float* y, int64_t M, int64_t N, int64_t K,
                          int threads) {
  using namespace tf_amx;
  const int64_t groups = (M + TILE_ROWS - 1) / TILE_ROWS, blocks = K / TILE_K, tiles = N / TILE_ROWS;
  if (M < INT8_TILE_MIN_M) {
#pragma omp parallel for schedule(dynamic, chunk_of(tiles, threads)) num_threads(threads)
    for (int64_t t = 0; t < tiles + (N - tiles * TILE_ROWS); ++t) {
      if (t < tiles) {
        for (int64_t m = 0; m < M; ++m) row_int8_vnni(d, xr, m, K, y, N, t * TILE_ROWS);
      } else {
        block_int<I8Int, 1>(d, xr, M, K, y, N, tiles * TILE_ROWS + (t - tiles));
      }
    }
    return;
  }
  int8_t* xp = tf::reusable<int8_t, 1>(groups * TILE_ROWS * K);
  float* sc = tf::reusable<float, 5>(groups * blocks * TILE_ROWS);
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g)
      pack_group_int8(xr.q, xr.s, M, K, g, xp + g * TILE_ROWS * K,
                      sc + g * blocks * TILE_ROWS);
    configure_int8();
#pragma omp for schedule(dynamic, chunk_of(tiles, threads)) nowait
    for (int64_t t = 0; t < tiles; ++t) {
      const char* ahead = reinterpret_cast<const char*>(d.w + (t + 1) * TILE_ROWS * K);
      for (int64_t g = 0; g < groups; ++g)
        tile_int8(d.w, d.scale_, xp + g * TILE_ROWS * K, sc + g * blocks * TILE_ROWS, M, K, y, N,
                  t * TILE_ROWS, g, g == 0 ? ahead : nullptr);
    }
#pragma omp for schedule(static)
    for (int64_t n = tiles * TILE_ROWS; n < N; ++n) block_int<I8Int, 1>(d, xr, M, K, y, N, n);
  }
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define TF_VNNI512 1
// W8A8 and W4A8 (int8 and 4-bit weights against int8 x) for several rows of x with 512-bit VNNI: block_int's
// arithmetic, two weight rows per register. x is taken as unsigned (x + 128, one xor per row and block) and each
// lane's dot product starts from -128 times its four weights' sum (computed once per weight block, for every row of
// x), which leaves exactly the signed dot product block_int takes; each lane then gets the same scale, conversion and
// FMA, blocks in the same order, and the same horizontal sum. So the same bits as block_int, with a third of its
// instructions per product (and each weight block decoded once per pass rather than once per pair of rows).
namespace tf_vnni512 {

constexpr int ROWS = 4;                     // rows of x per tile
constexpr int PAIRS = 4;                    // pairs of weight rows per tile
constexpr int64_t CHUNK_BYTES = 256 << 10;  // x's codes per pass over the weights (they stay in L2)

// Block j of weight rows n and n + 1 as one register of int8 (row n in the low half) and their per-lane scales.
template <class D>
inline void load_pair(const D& d, int64_t n, int64_t j, __m512i& w, __m512& scale) {
  __m256i abs0, w0, abs1, w1;
  __m256 s0, s1;
  d.load(n, j, abs0, w0, s0);
  d.load(n + 1, j, abs1, w1, s1);
  w = _mm512_inserti64x4(_mm512_castsi256_si512(w0), w1, 1);
  scale = _mm512_insertf32x8(_mm512_castps256_ps512(s0), s1, 1);
}

// Weight rows [n0, n0 + 2 PAIRS) decoded once for every row of x: per block and pair, the int8 register, its
// scales and its lanes' starting values (-128 times the weights' sums), 64 bytes each, in `out`.
constexpr int64_t DECODED = 3 * 16;  // int32 words per block and pair

template <class D>
inline void decode(const D& d, int64_t K, int64_t n0, int32_t* out) {
  for (int64_t j = 0; j < K / 32; ++j) {
    prefetch_block<D, 2 * PAIRS>(d, K, n0, j * 32, 32);
    for (int p = 0; p < PAIRS; ++p) {
      __m512i w;
      __m512 ws;
      load_pair(d, n0 + 2 * p, j, w, ws);
      int32_t* o = out + (j * PAIRS + p) * DECODED;
      _mm512_storeu_si512(o, w);
      _mm512_storeu_ps(reinterpret_cast<float*>(o + 16), ws);
      _mm512_storeu_si512(o + 32, tf::minus_128_sums(w));
    }
  }
}

// Rows [m0, m0 + MB) of x against the decoded weight rows at n0.
template <class D, int MB>
inline void tile(const D& d, const int32_t* dec, const Q8Rows& xr, int64_t K, float* y, int64_t N, int64_t m0,
                 int64_t n0) {
  constexpr bool unit_scale = std::is_same_v<D, I8Int>;  // its block scales are 1: ws * xs is xs
  const int64_t blocks = K / 32;
  const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[MB][PAIRS];
  for (int i = 0; i < MB; ++i)
    for (int p = 0; p < PAIRS; ++p) acc[i][p] = _mm512_setzero_ps();
  for (int64_t j = 0; j < blocks; ++j) {
    const int32_t* dj = dec + j * PAIRS * DECODED;
    for (int i = 0; i < MB; ++i) {
      const int64_t m = m0 + i;
      const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr.q + m * K + j * 32));
      const __m512i xu = _mm512_xor_si512(_mm512_broadcast_i64x4(xq), bias);
      const __m512 xs = _mm512_set1_ps(xr.s[m * blocks + j]);
      for (int p = 0; p < PAIRS; ++p) {
        const int32_t* o = dj + p * DECODED;
        const __m512 s = unit_scale ? xs : _mm512_mul_ps(_mm512_loadu_ps(reinterpret_cast<const float*>(o + 16)), xs);
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_loadu_si512(o + 32), xu, _mm512_loadu_si512(o));
        acc[i][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc[i][p]);
      }
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int p = 0; p < PAIRS; ++p) {
      float* out = y + (m0 + i) * N + n0 + 2 * p;
      out[0] = hsum(_mm512_castps512_ps256(acc[i][p])) * d.row_scale(n0 + 2 * p);
      out[1] = hsum(_mm512_extractf32x8_ps(acc[i][p], 1)) * d.row_scale(n0 + 2 * p + 1);
    }
}

// Rows [m0, m1) of x against weight rows [n0, n0 + 2 PAIRS): the weights decoded once, then ROWS rows of x at a time.
template <class D>
inline void rows_of_x(const D& d, const Q8Rows& xr, int64_t K, float* y, int64_t N, int64_t m0, int64_t m1,
                      int64_t n0) {
  int32_t* dec = tf::reusable<int32_t, 6>(K / 32 * PAIRS * DECODED);
  decode(d, K, n0, dec);
  int64_t m = m0;
  for (; m + ROWS <= m1; m += ROWS) tile<D, ROWS>(d, dec, xr, K, y, N, m, n0);
  switch (m1 - m) {
    case 3: tile<D, 3>(d, dec, xr, K, y, N, m, n0); break;
    case 2: tile<D, 2>(d, dec, xr, K, y, N, m, n0); break;
    case 1: tile<D, 1>(d, dec, xr, K, y, N, m, n0); break;
    default: break;
  }
}

template <class D>
inline void linear(const D& d, const Q8Rows& xr, float* y, int64_t M, int64_t N, int64_t K, int threads) {
  constexpr int64_t BLOCK = 2 * PAIRS;
  const int64_t blocks = (N + BLOCK - 1) / BLOCK, chunk = std::max<int64_t>(ROWS, CHUNK_BYTES / K / ROWS * ROWS);
#pragma omp parallel num_threads(threads)
  for (int64_t c0 = 0; c0 < M; c0 += chunk) {
    const int64_t c1 = std::min(M, c0 + chunk);
#pragma omp for schedule(dynamic, chunk_of(blocks, threads))
    for (int64_t b = 0; b < blocks; ++b)
      row_block<BLOCK>(b, N, [&](int64_t n0) { rows_of_x(d, xr, K, y, N, c0, c1, n0); },
                       [&](int64_t n) {
                         for (int64_t m = c0; m < c1; ++m) tile_int<D, 1, 1>(d, xr, K, y, N, m, n);
                       });
  }
}

}  // namespace tf_vnni512
#endif

template <class D>
void linear_int(const D& d, const float* x, float* y, int64_t M, int64_t N, int64_t K, bool even_odd_16,
                int threads) {
  const Q8Rows xr = quantize_rows(x, M, K, even_odd_16, threads);
#ifdef TF_AMX_INT8
  if constexpr (std::is_same_v<D, I8Int>) {
    if (tf_amx::runs(N, K)) {
      linear_i8_amx(d, xr, y, M, N, K, threads);
      return;
    }
  }
#endif
#ifdef TF_VNNI512
  if (M >= 2) {  // (int8 weights on AMX tiles where the level has them, above)
    tf_vnni512::linear(d, xr, y, M, N, K, threads);
    return;
  }
#endif
  const int64_t blocks = (N + NB - 1) / NB;
#pragma omp parallel for schedule(dynamic, chunk_of(blocks, threads)) num_threads(threads)
  for (int64_t b = 0; b < blocks; ++b)
    row_block(b, N, [&](int64_t n0) { block_int<D, NB>(d, xr, M, K, y, N, n0); },
              [&](int64_t n) { block_int<D, 1>(d, xr, M, K, y, N, n); });
}

LUT4 make_lut4(const uint8_t* packed, const uint16_t* scales, int64_t group, const float* rows,
               const int8_t* lut, float lut_mult, int64_t K) {
  return LUT4{packed, scales, rows, _mm_loadu_si128(reinterpret_cast<const __m128i*>(lut)), lut_mult, K, group};
}

// gelu with the tanh approximation (Gemma) or silu (Llama, Qwen) of a vector.
inline __m256 act256(__m256 x, bool gelu) {
  // 0.5 * (1 + tanh(u)) = 1 / (1 + e^(-2u)): gelu's tanh form without the cancellation of 1 + tanh near -1.
  const __m256 one = _mm256_set1_ps(1.0f);
  __m256 z = _mm256_sub_ps(_mm256_setzero_ps(), x);
  if (gelu)
    z = _mm256_mul_ps(_mm256_set1_ps(-1.5957691216057308f),
                      _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), x), _mm256_mul_ps(x, x), x));
  return _mm256_div_ps(x, _mm256_add_ps(one, exp256(z)));
}

inline float act1(float x, bool gelu) {
  const float z = gelu ? -1.5957691216057308f * (x + 0.044715f * x * x * x) : -x;
  return x / (1.0f + std::exp(z));
}

// o[k] = act(g[k]) * u[k] with u = g + inter (one row of a fused gate/up projection).
inline void gated_act_row(const float* g, float* o, int64_t inter, bool gelu) {
  const float* u = g + inter;
  int64_t k = 0;
  for (; k + 8 <= inter; k += 8)
    _mm256_storeu_ps(o + k, _mm256_mul_ps(act256(_mm256_loadu_ps(g + k), gelu), _mm256_loadu_ps(u + k)));
  for (; k < inter; ++k) o[k] = act1(g[k], gelu) * u[k];
}

}  // namespace

extern "C" {

int tf_abi_version() { return 1; }

// 1 where bf16 and int8 weights run on AMX tiles: a library built for the amx level in a process the OS gave tile
// state.
int tf_amx_tiles() {
#ifdef TF_AMX
  return tf_amx::permitted() ? 1 : 0;
#else
  return 0;
#endif
}

void tf_linear_bf16(const float* x, const uint16_t* w, float* y, int64_t M, int64_t N, int64_t K, int threads) {
  linear(BF16{w, K}, x, y, M, N, K, threads);
}
// As tf_linear_bf16 with bf16 activations where the level has them (tf_bf16_activations): x rounded to bf16, one
// vdpbf16ps per pair of products, the same single order of accumulation at every batch size.
void tf_linear_bf16_act(const float* x, const uint16_t* w, float* y, int64_t M, int64_t N, int64_t K,
                        int threads) {
  linear(BF16{w, K}, x, y, M, N, K, threads, true);
}

// 1 where the bf16 kernels take bf16 activations natively (the avx512_bf16 level), 0 where tf_linear_bf16_act
// computes as tf_linear_bf16 (fp32 activations).
int tf_bf16_activations() {
#ifdef TF_DPBF16
  return 1;
#else
  return 0;
#endif
}
void tf_linear_i8(const float* x, const int8_t* w, const float* scale, float* y, int64_t M, int64_t N, int64_t K,
                  int threads) {
  linear(I8{w, scale, K}, x, y, M, N, K, threads);
}
void tf_linear_fp8(const float* x, const uint8_t* w, const float* scale, float* y, int64_t M, int64_t N, int64_t K,
                   int threads) {
  linear(FP8{w, scale, K}, x, y, M, N, K, threads);
}
void tf_linear_lut4(const float* x, const uint8_t* packed, const uint16_t* scales, int64_t group,
                    const float* rows, const int8_t* lut, float lut_mult, float* y, int64_t M, int64_t N, int64_t K,
                    int threads) {
  linear(make_lut4(packed, scales, group, rows, lut, lut_mult, K), x, y, M, N, K, threads);
}

// out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w, rows of length dim; a single pass over x for the sum of
// squares, one to scale (the row stays in L1 between them).
void tf_rmsnorm(const float* x, const float* w, float* out, int64_t rows, int64_t dim, float eps, int threads) {
  const int nt = rows * dim >= (1 << 16) ? threads : 1;
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t r = 0; r < rows; ++r) rmsnorm_row(x + r * dim, w, out + r * dim, dim, eps);
}

// The residual step between sublayers, in one pass per row: x[r] += (hw ? rmsnorm(h[r]) * hw : h[r]) (Gemma's
// post-sublayer norm when hw is given), then out[r] = rmsnorm(x[r]) * w (the next sublayer's input norm).
// Same arithmetic as tf_rmsnorm and an fp32 add, so it equals the three separate operations bit for bit.
void tf_add_rmsnorm(float* x, const float* h, const float* hw, const float* w, float* out, int64_t rows,
                    int64_t dim, float eps, int threads) {
  const int nt = rows * dim >= (1 << 16) ? threads : 1;
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> normed(hw != nullptr ? dim : 0);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      float* xr = x + r * dim;
      const float* hr = h + r * dim;
      if (hw != nullptr) {
        rmsnorm_row(hr, hw, normed.data(), dim, eps);
        hr = normed.data();
      }
      for (int64_t k = 0; k < dim; ++k) xr[k] += hr[k];
      rmsnorm_row(xr, w, out + r * dim, dim, eps);
    }
  }
}

}  // extern "C"

extern "C" {

// K % 32 == 0; 4-bit groups of 16 or 32 (fp8_scales: group 16 only).
void tf_linear_lut4_q8(const float* x, const uint8_t* packed, const uint16_t* scales, int64_t group, int fp8_scales,
                       const float* rows, const int8_t* lut, float lut_mult, float* y, int64_t M, int64_t N,
                       int64_t K, int threads) {
  const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lut)));
  linear_int(Lut4Int{packed, scales, rows, table, lut_mult, K, group, fp8_scales != 0}, x, y, M, N, K, true,
             threads);
}
void tf_linear_i8_q8(const float* x, const int8_t* w, const float* scale, float* y, int64_t M, int64_t N, int64_t K,
                     int threads) {
  linear_int(I8Int{w, scale, K}, x, y, M, N, K, false, threads);
}

// out[r, :] = act(gu[r, :inter]) * gu[r, inter:] for a fused gate/up projection [rows, 2 * inter]: one pass
// instead of a split, the activation and a product.
void tf_gated_act(const float* gu, float* out, int64_t rows, int64_t inter, int gelu, int threads) {
  const int nt = rows * inter >= (1 << 16) ? threads : 1;
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t r = 0; r < rows; ++r) gated_act_row(gu + r * 2 * inter, out + r * inter, inter, gelu != 0);
}

// A gated MLP, y = down(act(gate(x)) * up(x)), with gate/up fused in w_gu [2 * inter, K] (gate rows first) and
// w_down [hidden, inter], both bf16: the two products and the activation in one parallel region, each step
// computed exactly as tf_linear_bf16 (bf16_x = 0; tf_linear_bf16_act with 1) and tf_gated_act compute it (so the
// result is theirs bit for bit).
void tf_gated_mlp_bf16(const float* x, const uint16_t* w_gu, const uint16_t* w_down, float* y, int64_t M, int64_t K,
                       int64_t inter, int64_t hidden, int gelu, int bf16_x, int threads) {
  float* gu = tf::reusable<float, 3>(M * 2 * inter);
  float* act = tf::reusable<float, 4>(M * inter);
  GemmScratch shared;
#pragma omp parallel num_threads(threads)
  {
    float* panel = tf::reusable<float, 2>(M >= PANEL_MIN_M ? PANEL_ROWS * std::max(K, inter) : 0);
    linear_shared(BF16{w_gu, K}, x, gu, M, 2 * inter, K, panel, shared, bf16_x != 0);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < M; ++r) gated_act_row(gu + r * 2 * inter, act + r * inter, inter, gelu != 0);
    linear_shared(BF16{w_down, inter}, act, y, M, hidden, inter, panel, shared, bf16_x != 0);
  }
}

// out[r] = the first index of the largest value of row r (a NaN counts as the largest, as in torch.argmax);
// two passes over a row that stays in cache: a vector max, then the first position holding it.
void tf_argmax_rows(const float* x, int64_t rows, int64_t n, int64_t* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    __m256 best[4], nan = _mm256_setzero_ps();
    for (auto& b : best) b = _mm256_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32)  // four independent max chains
      for (int c = 0; c < 4; ++c) {
        const __m256 v = _mm256_loadu_ps(xr + i + 8 * c);
        best[c] = _mm256_max_ps(best[c], v);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      }
    for (; i + 8 <= n; i += 8) {
      const __m256 v = _mm256_loadu_ps(xr + i);
      best[0] = _mm256_max_ps(best[0], v);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float vals[8];
    _mm256_storeu_ps(vals, _mm256_max_ps(_mm256_max_ps(best[0], best[1]), _mm256_max_ps(best[2], best[3])));
    float m = -INFINITY;
    for (float v : vals) m = std::max(m, v);
    bool has_nan = _mm256_movemask_ps(nan) != 0;
    for (; i < n; ++i) {
      has_nan |= std::isnan(xr[i]);
      m = std::max(m, xr[i]);
    }
    int64_t at = 0;
    if (has_nan) {
      while (!std::isnan(xr[at])) ++at;
    } else {
      const __m256 mv = _mm256_set1_ps(m);
      int64_t j = 0;
      for (; j + 8 <= n; j += 8) {
        const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(xr + j), mv, _CMP_EQ_OQ));
        if (hit != 0) break;
      }
      while (xr[j] != m) ++j;  // within the matching vector, or the scalar tail
      at = j;
    }
    out[r] = at;
  }
}

void tf_dequant_bf16(const uint16_t* w, float* out, int64_t N, int64_t K, int threads) {
  dequantize(BF16{w, K}, out, N, K, threads);
}
void tf_dequant_i8(const int8_t* w, const float* scale, float* out, int64_t N, int64_t K, int threads) {
  dequantize(I8{w, scale, K}, out, N, K, threads);
}
void tf_dequant_fp8(const uint8_t* w, const float* scale, float* out, int64_t N, int64_t K, int threads) {
  dequantize(FP8{w, scale, K}, out, N, K, threads);
}
void tf_dequant_lut4(const uint8_t* packed, const uint16_t* scales, int64_t group, const float* rows,
                     const int8_t* lut, float lut_mult, float* out, int64_t N, int64_t K, int threads) {
  dequantize(make_lut4(packed, scales, group, rows, lut, lut_mult, K), out, N, K, threads);
}

}  // extern "C"
