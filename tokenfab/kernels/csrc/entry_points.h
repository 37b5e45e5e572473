// The library's C entry points that other kernel files compose (defined in cpu_kernels.cpp, gguf_kernels.cpp and
// attention_kernels.cpp; each documents its arguments there).
#pragma once

#include <cstdint>

extern "C" {

void tf_linear_bf16(const float* x, const uint16_t* w, float* y, int64_t M, int64_t N, int64_t K, int threads);
void tf_linear_i8_q8(const float* x, const int8_t* w, const float* scale, float* y, int64_t M, int64_t N, int64_t K,
                     int threads);
void tf_add_rmsnorm(float* x, const float* h, const float* hw, const float* w, float* out, int64_t rows,
                    int64_t dim, float eps, int threads);
void tf_gated_mlp_bf16(const float* x, const uint16_t* w_gu, const uint16_t* w_down, float* y, int64_t M, int64_t K,
                       int64_t inter, int64_t hidden, int gelu, int bf16_x, int threads);
void tf_linear_bf16_act(const float* x, const uint16_t* w, float* y, int64_t M, int64_t N, int64_t K, int threads);
void tf_gated_act(const float* gu, float* out, int64_t rows, int64_t inter, int gelu, int threads);
void tf_gguf_linear(const float* x, int nseg, const int32_t* layouts, const int64_t* rows, const void* const* data,
                    float* y, int64_t M, int64_t N, int64_t K, int threads);
void tf_decode_attention_step(float* qkv, int64_t batch, int64_t row_stride, int64_t heads, int64_t kv_heads,
                              int64_t dim, const float* q_weight, const float* k_weight, float eps, const float* cos,
                              const float* sin, float* k_cache, float* v_cache, const int64_t* slots,
                              const int64_t* blocks, int64_t max_blocks, const int32_t* lo, const int32_t* hi,
                              int64_t block_size, float scale, float* out, int threads);

}  // extern "C"
