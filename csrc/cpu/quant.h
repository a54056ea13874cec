// Quantization helpers shared by the glufx CPU kernels. Every float operation mirrors
// glufx/ops/reference.py (division for quantization, round half to even, clamp to +-127).
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

// x86 kernels are compiled per function with target attributes and chosen at run time (cpu_kernel_level).
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GLUFX_X86 1
#endif

#ifdef GLUFX_X86
namespace glufx {
namespace detail {
// Sum of an AVX2 register's 8 floats, in one fixed order (halves, then pairs, then the last two).
__attribute__((target("avx2"))) inline float hsum256_ps(__m256 v) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
}
}  // namespace detail
}  // namespace glufx
#endif

namespace glufx {
namespace detail {

enum Granularity : int64_t { kPerSequence = 0, kPerToken = 1, kStatic = 2, kPerTensor = 3 };

constexpr float kQMax = 127.f;

inline float scale_from_absmax(float amax) {
  float s = amax / kQMax;
  return s == 0.f ? 1.f : s;
}

inline int8_t quantize_one(float v, float s) {
  float q = std::nearbyint(v / s);  // default rounding mode: half to even, as torch.round
  q = std::min(std::max(q, -kQMax), kQMax);
  return static_cast<int8_t>(q);
}

// Dequantization epilogue: y = (float(acc) * s_x) * s_w + b, the reference's order (no FMA contraction).
inline void dequantize_row(const int32_t* acc, float sx, const float* sw, const float* bias, float* out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    float v = static_cast<float>(acc[j]) * sx;
    v = v * sw[j];
    if (bias) v = v + bias[j];
    out[j] = v;
  }
}

// float32 [M, N] result -> x's dtype and leading shape [..., N]
inline at::Tensor to_output(const at::Tensor& out, const at::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return out.to(x.scalar_type()).view(shape);
}

void check_float(const at::Tensor& x, const char* op);
// max |row[k]| over k < K into amax; finite &= every value is finite (not NaN or Inf).
void row_absmax(const float* row, int64_t K, float& amax, bool& finite);
// AVX2 (call only where the CPU has it): x[k] *= s in place over the first K - K % 8 values and their max |x|
// into amax (finite as above) in the same pass; returns how many it covered. row_absmax's reduction, scaling.
int64_t scale_absmax_avx2(float* x, int64_t K, float s, float& amax, bool& finite);
// Per-row activation scales [M] of x2d [M, K] (float32, contiguous) for a granularity.
at::Tensor row_scales(const at::Tensor& x2d, int64_t rows_per_sequence, int64_t granularity,
                      const c10::optional<at::Tensor>& x_scale, const char* op);
void quantize_rows(const at::Tensor& x2d, const at::Tensor& scales, at::Tensor& q);
// out[k] = quantize_one(x[k], s) + offset for k < K (AVX2 when the CPU has it, bit-equal to the scalar
// form: IEEE division, round half to even, clamp); T = int8_t, uint8_t (offset 128) or int16_t.
template <typename T>
void quantize_row(const float* x, int64_t K, float s, int32_t offset, T* out);
// x [..., K] -> (float32 [M, K] contiguous, rows per sequence)
std::pair<at::Tensor, int64_t> flatten_activations(const at::Tensor& x);
bool cpu_has_avx2();
// The CPU kernel variant in force (GLUFX_CPU_KERNEL / glufx::set_cpu_kernel): 0 generic, 1 avx2, 2 vnni
// (AVX-512). The rotation follows it too, so tests run each of its variants in one process.
int cpu_kernel_level();
// Online rotation (csrc/cpu/hadamard.cpp): block a power of two dividing K, or 0 for none; signs [K].
void check_rotation(int64_t K, int64_t block, const c10::optional<at::Tensor>& signs, const char* op);
// One row: dst = H_block (signs * src) (signs may be null), and max |dst| into amax (finite &= every value
// of dst is finite), computed in the pass that applies 1/sqrt(block).
void rotate_row(const float* src, const float* signs, float* dst, int64_t K, int64_t block, float& amax,
                bool& finite);
// x2d [M, K] float32 contiguous -> H_block (signs * x) row by row, a new tensor.
at::Tensor rotate_rows(const at::Tensor& x2d, int64_t block, const c10::optional<at::Tensor>& signs);

}  // namespace detail
}  // namespace glufx
