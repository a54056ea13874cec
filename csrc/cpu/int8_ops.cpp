// CPU kernels of the glufx ops: symmetric INT8, activations clamped to [-127, 127],
// INT8 x INT8 -> INT32 GEMM, dequantization and bias fused in int8_linear's epilogue.
// Every float operation mirrors glufx/ops/reference.py in order and rounding
// (division for quantization, round-half-even, (acc * s_x) * s_w + bias without FMA
// contraction), so outputs equal the reference bit for bit.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "quant.h"

namespace glufx {
namespace detail {

// ---- INT8 GEMM: C[M, N] = A[M, K] . B[N, K]^T, int32 accumulation --------------------------

void gemm_rows_generic(const int8_t* A, const int8_t* B, int32_t* C, int64_t M, int64_t N, int64_t K,
                       int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* b = B + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* a = A + m * K;
      int32_t acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += int32_t(a[k]) * int32_t(b[k]);
      C[m * N + n] = acc;
    }
  }
}

#ifdef GLUFX_X86
__attribute__((target("avx2"))) inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

// Sign-extends 16 int8 to int16 and multiply-adds pairs into int32 (vpmaddwd): exact for
// |a|, |b| <= 127, two products per lane never overflow. A 1x4 tile reuses each activation
// load across four weight rows. Packed u8 x s8 kernels are the fast path's job (issue 4).
__attribute__((target("avx2"))) void gemm_rows_avx2(const int8_t* A, const int8_t* B, int32_t* C,
                                                      int64_t M, int64_t N, int64_t K, int64_t n0,
                                                      int64_t n1) {
  const int64_t K16 = K - K % 16;
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const int8_t* b0 = B + n * K;
    const int8_t* b1 = b0 + K;
    const int8_t* b2 = b1 + K;
    const int8_t* b3 = b2 + K;
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* a = A + m * K;
      __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0;
      for (int64_t k = 0; k < K16; k += 16) {
        __m256i va = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + k)));
        c0 = _mm256_add_epi32(c0, _mm256_madd_epi16(va, _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b0 + k)))));
        c1 = _mm256_add_epi32(c1, _mm256_madd_epi16(va, _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b1 + k)))));
        c2 = _mm256_add_epi32(c2, _mm256_madd_epi16(va, _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b2 + k)))));
        c3 = _mm256_add_epi32(c3, _mm256_madd_epi16(va, _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b3 + k)))));
      }
      int32_t s0 = hsum_epi32(c0), s1 = hsum_epi32(c1), s2 = hsum_epi32(c2), s3 = hsum_epi32(c3);
      for (int64_t k = K16; k < K; ++k) {
        const int32_t ak = a[k];
        s0 += ak * b0[k];
        s1 += ak * b1[k];
        s2 += ak * b2[k];
        s3 += ak * b3[k];
      }
      int32_t* c = C + m * N + n;
      c[0] = s0;
      c[1] = s1;
      c[2] = s2;
      c[3] = s3;
    }
  }
  if (n < n1) gemm_rows_generic(A, B, C, M, N, K, n, n1);
}
#endif

bool cpu_has_avx2() {
#ifdef GLUFX_X86
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
#else
  return false;
#endif
}

}  // namespace detail
namespace {
using namespace detail;

void gemm_s8s8s32(const int8_t* A, const int8_t* B, int32_t* C, int64_t M, int64_t N, int64_t K) {
  if (M == 0 || N == 0) return;
  // Split output columns: each thread streams a disjoint slice of the weight once.
  const int64_t grain = std::max<int64_t>(4, (int64_t(1) << 16) / std::max<int64_t>(K * M, 1) * 4);
  at::parallel_for(0, (N + 3) / 4, std::max<int64_t>(1, grain / 4), [&](int64_t b, int64_t e) {
    const int64_t n0 = b * 4, n1 = std::min(N, e * 4);
#ifdef GLUFX_X86
    if (cpu_has_avx2()) return gemm_rows_avx2(A, B, C, M, N, K, n0, n1);
#endif
    gemm_rows_generic(A, B, C, M, N, K, n0, n1);
  });
}

}  // namespace
namespace detail {

// ---- activation quantization ------------------------------------------------------------

void check_float(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "glufx::", op, ": activations must be float32, bfloat16 or float16, got ", x.scalar_type(),
              "; cast the model with model.float() or model.to(torch.bfloat16)");
}

#ifdef GLUFX_X86
// max |x[k]| over the first K - K % 8 values into amax, finite &= every one of them is finite; with kScale,
// x[k] *= s first, in place, in the same pass (the rotation's 1/sqrt(b): its per-token scale's reduction
// costs no extra read). Returns how many it covered. max is exact, so any order gives the scalar loop's result.
template <bool kScale>
__attribute__((target("avx2"))) int64_t absmax_avx2(float* x, int64_t K, float s, float& amax, bool& finite) {
  const __m256 vs = _mm256_set1_ps(s), sign = _mm256_set1_ps(-0.f), big = _mm256_set1_ps(3.402823466e38f);
  __m256 a = _mm256_setzero_ps(), ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 y = _mm256_loadu_ps(x + k);
    if (kScale) {
      y = _mm256_mul_ps(y, vs);
      _mm256_storeu_ps(x + k, y);
    }
    const __m256 m = _mm256_andnot_ps(sign, y);
    ok = _mm256_and_ps(ok, _mm256_cmp_ps(m, big, _CMP_LE_OQ));  // false for NaN and Inf
    a = _mm256_max_ps(a, m);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, a);
  for (float l : lanes) amax = std::max(amax, l);
  finite &= _mm256_movemask_ps(ok) == 0xFF;
  return k;
}

int64_t scale_absmax_avx2(float* x, int64_t K, float s, float& amax, bool& finite) {
  return absmax_avx2<true>(x, K, s, amax, finite);
}
#endif

void row_absmax(const float* row, int64_t K, float& amax, bool& finite) {
  int64_t k = 0;
#ifdef GLUFX_X86
  if (cpu_has_avx2()) k = absmax_avx2<false>(const_cast<float*>(row), K, 1.f, amax, finite);  // reads only
#endif
  for (; k < K; ++k) {
    const float v = std::fabs(row[k]);
    finite &= v <= 3.402823466e38f;  // false for NaN and Inf
    amax = std::max(amax, v);
  }
}

// Per-row scales [M] of x2d [M, K] (float32, contiguous) for the given granularity.
at::Tensor row_scales(const at::Tensor& x2d, int64_t rows_per_sequence, int64_t granularity,
                      const c10::optional<at::Tensor>& x_scale, const char* op) {
  const int64_t M = x2d.size(0), K = x2d.size(1);
  at::Tensor scales = at::empty({M}, x2d.options().dtype(at::kFloat));
  float* s = scales.data_ptr<float>();
  if (granularity == kStatic) {
    TORCH_CHECK(x_scale.has_value() && x_scale->numel() == 1,
                "glufx::", op, ": static granularity needs the calibrated x_scale (one element)");
    const float v = x_scale->to(at::kFloat).item<float>();
    TORCH_CHECK(std::isfinite(v) && v > 0.f, "glufx::", op, ": static x_scale must be finite and > 0, got ", v);
    std::fill(s, s + M, v);
    return scales;
  }
  TORCH_CHECK(granularity == kPerSequence || granularity == kPerToken || granularity == kPerTensor,
              "glufx::", op, ": unknown granularity ", granularity,
              " (0 per_sequence, 1 per_token, 2 static, 3 per_tensor)");
  const float* x = x2d.data_ptr<float>();
  at::Tensor amax_t = at::empty({M}, scales.options());
  float* amax = amax_t.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1)), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      float a = 0.f;
      bool finite = true;
      row_absmax(x + m * K, K, a, finite);
      amax[m] = finite ? a : NAN;
    }
  });
  const int64_t group = granularity == kPerToken ? 1 : granularity == kPerTensor ? std::max<int64_t>(M, 1) : rows_per_sequence;
  for (int64_t g0 = 0; g0 < M; g0 += group) {
    const int64_t g1 = std::min(M, g0 + group);
    float a = 0.f;
    for (int64_t m = g0; m < g1; ++m) {
      TORCH_CHECK(!std::isnan(amax[m]), "glufx::", op, ": input has NaN or Inf at row ", m,
                  "; INT8 cannot represent it (check the model's floating-point outputs first)");
      a = std::max(a, amax[m]);
    }
    std::fill(s + g0, s + g1, scale_from_absmax(a));
  }
  return scales;
}

#ifdef GLUFX_X86
// 8 quantized values (as int16) of x[0..7]: the scalar quantize_one, lane by lane.
__attribute__((target("avx2"))) inline __m128i quantize8_avx2(const float* x, __m256 s, __m256 lo, __m256 hi) {
  __m256 q = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x), s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256i i = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(q, lo), hi));
  return _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
}

template <typename T>
__attribute__((target("avx2"))) int64_t quantize_row_avx2(const float* x, int64_t K, float s, int32_t offset, T* out) {
  const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-kQMax), hi = _mm256_set1_ps(kQMax);
  const __m128i off = _mm_set1_epi16(static_cast<int16_t>(offset));
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m128i q16 = _mm_add_epi16(quantize8_avx2(x + k, vs, lo, hi), off);
    if constexpr (sizeof(T) == 2) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), q16);
    } else if constexpr (std::is_signed_v<T>) {
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + k), _mm_packs_epi16(q16, q16));
    } else {
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + k), _mm_packus_epi16(q16, q16));
    }
  }
  return k;
}
#endif

template <typename T>
void quantize_row(const float* x, int64_t K, float s, int32_t offset, T* out) {
  int64_t k = 0;
#ifdef GLUFX_X86
  if (cpu_has_avx2()) k = quantize_row_avx2(x, K, s, offset, out);
#endif
  for (; k < K; ++k) out[k] = static_cast<T>(quantize_one(x[k], s) + offset);
}
template void quantize_row<int8_t>(const float*, int64_t, float, int32_t, int8_t*);
template void quantize_row<uint8_t>(const float*, int64_t, float, int32_t, uint8_t*);
template void quantize_row<int16_t>(const float*, int64_t, float, int32_t, int16_t*);

void quantize_rows(const at::Tensor& x2d, const at::Tensor& scales, at::Tensor& q) {
  const int64_t M = x2d.size(0), K = x2d.size(1);
  const float* x = x2d.data_ptr<float>();
  const float* s = scales.data_ptr<float>();
  int8_t* out = q.data_ptr<int8_t>();
  at::parallel_for(0, M, std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1)), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) quantize_row(x + m * K, K, s[m], 0, out + m * K);
  });
}

// x [..., K] -> float32 [M, K] contiguous, and the number of rows each sequence spans.
std::pair<at::Tensor, int64_t> flatten_activations(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1, "glufx: activations need at least one dimension");
  const int64_t K = x.size(-1);
  at::Tensor x2d = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t M = x2d.size(0);
  const int64_t rows_per_sequence = x.dim() >= 3 && x.size(0) > 0 ? M / x.size(0) : std::max<int64_t>(M, 1);
  return {x2d, std::max<int64_t>(rows_per_sequence, 1)};
}

}  // namespace detail
namespace {

// ---- ops ----------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> quantize_weight_cpu(const at::Tensor& w) {
  check_float(w, "quantize_weight");
  TORCH_CHECK(w.dim() == 2, "glufx::quantize_weight: expects a 2-D [out, in] weight, got ", w.sizes());
  at::Tensor w32 = w.to(at::kFloat).contiguous();
  TORCH_CHECK(at::isfinite(w32).all().item<bool>(), "glufx::quantize_weight: weight has NaN or Inf");
  at::Tensor scales = at::empty({w.size(0)}, w32.options());
  float* s = scales.data_ptr<float>();
  const int64_t N = w.size(0), K = w.size(1);
  const float* src = w32.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) {
    float a = 0.f;
    for (int64_t k = 0; k < K; ++k) a = std::max(a, std::fabs(src[n * K + k]));
    s[n] = scale_from_absmax(a);
  }
  at::Tensor q = at::empty({N, K}, w32.options().dtype(at::kChar));
  quantize_rows(w32, scales, q);
  return {q, scales};
}

std::tuple<at::Tensor, at::Tensor> quantize_activation_cpu(const at::Tensor& x, int64_t granularity,
                                                           const c10::optional<at::Tensor>& x_scale) {
  check_float(x, "quantize_activation");
  auto [x2d, rows_per_sequence] = flatten_activations(x);
  at::Tensor scales = row_scales(x2d, rows_per_sequence, granularity, x_scale, "quantize_activation");
  at::Tensor q = at::empty(x2d.sizes(), x2d.options().dtype(at::kChar));
  quantize_rows(x2d, scales, q);
  return {q.view(x.sizes()), scales};
}

at::Tensor int8_mm_cpu(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.scalar_type() == at::kChar && b.scalar_type() == at::kChar,
              "glufx::int8_mm: expects int8 operands, got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1),
              "glufx::int8_mm: expects a [M, K] and b [N, K], got ", a.sizes(), " and ", b.sizes());
  at::Tensor a_c = a.contiguous(), b_c = b.contiguous();
  at::Tensor c = at::empty({a.size(0), b.size(0)}, a.options().dtype(at::kInt));
  gemm_s8s8s32(a_c.data_ptr<int8_t>(), b_c.data_ptr<int8_t>(), c.data_ptr<int32_t>(), a.size(0), b.size(0), a.size(1));
  return c;
}

}  // namespace

TORCH_LIBRARY_IMPL(glufx, CPU, m) {
  m.impl("quantize_weight", &quantize_weight_cpu);
  m.impl("quantize_activation", &quantize_activation_cpu);
  m.impl("int8_mm", &int8_mm_cpu);
}

}  // namespace glufx
