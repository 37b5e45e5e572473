// A decode step through every decoder layer in one call: the per-layer sequence of kernels the Python model runs
// for single-token sequences (bf16, int8 or GGUF-block weights, fp32 activations and KV cache), without returning to
// the interpreter between them. At batch 1 the interpreter's share of a layer (about a dozen calls, each
// converting its arguments and allocating its output) is comparable to the layer's small matmuls; here it is paid
// once per step.
// Each kernel is the one the model calls, in the same order on the same data, so the result is the model's bit
// for bit.
#include <cstdint>
#include <vector>

#include "entry_points.h"

namespace {

// Shapes shared by the layers (one model).
struct TfDecodeDims {
  int64_t hidden, heads, kv_heads, head_dim, inter, block_size;
  float eps, scale;
  int64_t gelu;  // gated activation: gelu (tanh approximation) or silu
};

// A projection's weight [N, K] in a format with a kernel: bf16 rows (fp32 x, or bf16 x: tf_linear_bf16_act), int8
// rows with a scale per row (W8A8, see tf_linear_i8_q8), or GGUF block rows in segments (see tf_gguf_linear).
enum TfLinearKind : int64_t { TF_BF16 = 1, TF_GGUF = 2, TF_INT8 = 3, TF_BF16_ACT = 4 };
struct TfLinear {
  int64_t kind, N, K;
  const void* w;
  const float* scale;
  int64_t segments;
  const int32_t* layouts;
  const int64_t* rows;
  const void* const* data;
};

void linear(const TfLinear& w, const float* x, float* y, int64_t M, int threads) {
  switch (w.kind) {
    case TF_BF16: tf_linear_bf16(x, static_cast<const uint16_t*>(w.w), y, M, w.N, w.K, threads); break;
    case TF_BF16_ACT: tf_linear_bf16_act(x, static_cast<const uint16_t*>(w.w), y, M, w.N, w.K, threads); break;
    case TF_INT8: tf_linear_i8_q8(x, static_cast<const int8_t*>(w.w), w.scale, y, M, w.N, w.K, threads); break;
    default: tf_gguf_linear(x, static_cast<int>(w.segments), w.layouts, w.rows, w.data, y, M, w.N, w.K, threads);
  }
}

// One layer's projections, norms (fp32; null where the model has none) and KV cache tensors.
struct TfDecodeLayer {
  TfLinear qkv;
  const float* qkv_bias;
  TfLinear o, gate_up, down;
  const float* q_norm;
  const float* k_norm;
  const float* post_attn_norm;
  const float* mlp_norm;
  const float* post_mlp_norm;
  const float* next_norm;  // the next layer's input norm, the final norm after the last layer
  float* k_cache;
  float* v_cache;
  int64_t group;    // KV group (sliding window) whose step metadata the layer reads
  int64_t sliding;  // rotary table: 0 full, 1 sliding
};

// A KV group's step: the new token's cache slot per sequence and the block spans attended to.
struct TfDecodeGroup {
  const int64_t* slots;
  const int64_t* blocks;
  int64_t max_blocks;
  const int32_t* lo;
  const int32_t* hi;
};

}  // namespace

extern "C" {

// x [M, hidden]: the residual stream, updated in place; normed [M, hidden]: the first layer's input norm of x on
// entry, the final norm of the stream on return. cos/sin [2] (full, sliding): [M, head_dim] each.
void tf_decode_layers(const TfDecodeDims* dims, const TfDecodeLayer* layers, int64_t num_layers,
                      const TfDecodeGroup* groups, const float* const* cos, const float* const* sin, float* x,
                      float* normed, int64_t M, int threads) {
  const TfDecodeDims& d = *dims;
  const int64_t q = d.heads * d.head_dim, width = q + 2 * d.kv_heads * d.head_dim;
  std::vector<float> qkv(M * width), attn(M * q), h(M * d.hidden), gu, act;
  for (int64_t i = 0; i < num_layers; ++i) {
    const TfDecodeLayer& L = layers[i];
    const TfDecodeGroup& g = groups[L.group];
    linear(L.qkv, normed, qkv.data(), M, threads);
    if (L.qkv_bias != nullptr)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < width; ++n) qkv[m * width + n] += L.qkv_bias[n];
    tf_decode_attention_step(qkv.data(), M, width, d.heads, d.kv_heads, d.head_dim, L.q_norm, L.k_norm, d.eps,
                             cos[L.sliding], sin[L.sliding], L.k_cache, L.v_cache, g.slots, g.blocks, g.max_blocks,
                             g.lo, g.hi, d.block_size, d.scale, attn.data(), threads);
    linear(L.o, attn.data(), h.data(), M, threads);
    tf_add_rmsnorm(x, h.data(), L.post_attn_norm, L.mlp_norm, normed, M, d.hidden, d.eps, threads);
    if ((L.gate_up.kind == TF_BF16 || L.gate_up.kind == TF_BF16_ACT) && L.down.kind == L.gate_up.kind) {
      tf_gated_mlp_bf16(normed, static_cast<const uint16_t*>(L.gate_up.w), static_cast<const uint16_t*>(L.down.w),
                        h.data(), M, d.hidden, d.inter, d.hidden, static_cast<int>(d.gelu),
                        L.gate_up.kind == TF_BF16_ACT ? 1 : 0, threads);
    } else {
      gu.resize(M * 2 * d.inter);
      act.resize(M * d.inter);
      linear(L.gate_up, normed, gu.data(), M, threads);
      tf_gated_act(gu.data(), act.data(), M, d.inter, static_cast<int>(d.gelu), threads);
      linear(L.down, act.data(), h.data(), M, threads);
    }
    tf_add_rmsnorm(x, h.data(), L.post_mlp_norm, L.next_norm, normed, M, d.hidden, d.eps, threads);
  }
}

}  // extern "C"
