// A decode step through every decoder layer in one call: the per-layer sequence of kernels the Python model runs
// for single-token sequences (bf16 weights, fp32 activations and KV cache), without returning to the interpreter
// between them. At batch 1 the interpreter's share of a layer (about a dozen calls, each converting its arguments
// and allocating its output) is comparable to the layer's small matmuls; here it is paid once per step.
// Each kernel is the one the model calls, in the same order on the same data, so the result is the model's bit
// for bit.
#include <cstdint>
#include <vector>

#include "entry_points.h"

extern "C" {

// Shapes shared by the layers (one model).
struct TfDecodeDims {
  int64_t hidden, heads, kv_heads, head_dim, inter, block_size;
  float eps, scale;
  int64_t gelu;  // gated activation: gelu (tanh approximation) or silu
};

// One layer's weights (bf16 [out, in]; norms fp32; null where the model has none) and its KV cache tensors.
struct TfDecodeLayer {
  const uint16_t* qkv;
  const float* qkv_bias;
  const uint16_t* o;
  const uint16_t* gate_up;
  const uint16_t* down;
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

// x [M, hidden]: the residual stream, updated in place; normed [M, hidden]: the first layer's input norm of x on
// entry, the final norm of the stream on return. cos/sin [2] (full, sliding): [M, head_dim] each.
void tf_decode_layers(const TfDecodeDims* dims, const TfDecodeLayer* layers, int64_t num_layers,
                      const TfDecodeGroup* groups, const float* const* cos, const float* const* sin, float* x,
                      float* normed, int64_t M, int threads) {
  const TfDecodeDims& d = *dims;
  const int64_t q = d.heads * d.head_dim, width = q + 2 * d.kv_heads * d.head_dim;
  std::vector<float> qkv(M * width), attn(M * q), h(M * d.hidden);
  for (int64_t i = 0; i < num_layers; ++i) {
    const TfDecodeLayer& L = layers[i];
    const TfDecodeGroup& g = groups[L.group];
    tf_linear_bf16(normed, L.qkv, qkv.data(), M, width, d.hidden, threads);
    if (L.qkv_bias != nullptr)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < width; ++n) qkv[m * width + n] += L.qkv_bias[n];
    tf_decode_attention_step(qkv.data(), M, width, d.heads, d.kv_heads, d.head_dim, L.q_norm, L.k_norm, d.eps,
                             cos[L.sliding], sin[L.sliding], L.k_cache, L.v_cache, g.slots, g.blocks, g.max_blocks,
                             g.lo, g.hi, d.block_size, d.scale, attn.data(), threads);
    tf_linear_bf16(attn.data(), L.o, h.data(), M, d.hidden, q, threads);
    tf_add_rmsnorm(x, h.data(), L.post_attn_norm, L.mlp_norm, normed, M, d.hidden, d.eps, threads);
    tf_gated_mlp_bf16(normed, L.gate_up, L.down, h.data(), M, d.hidden, d.inter, d.hidden, static_cast<int>(d.gelu),
                      threads);
    tf_add_rmsnorm(x, h.data(), L.post_mlp_norm, L.next_norm, normed, M, d.hidden, d.eps, threads);
  }
}

}  // extern "C"
