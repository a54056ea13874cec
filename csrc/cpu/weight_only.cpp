// Weight-only INT8 linear: y = x (s * w_q)^T + b, x in floating point, w_q [N, K] int8 with per-channel scales s.
//
// For the linears kept out of INT8 activations (QFeM's, an FP lm_head) under GlufxConfig(fp_weights="int8"): a
// quarter of an FP32 weight's bytes, which is what a decode step at one row pays for (docs/decode.md measures
// the speed and the perplexity it costs).
//  * Few rows (M <= kGemvRows): each weight row is read once, as one sequential stream, widened to float in
//    registers and multiplied into every input row (four accumulator chains along K per row). Threads split
//    output channels and each channel's sum runs in one fixed order: results do not depend on the thread count.
//    AVX-512 or AVX2 by the CPU (and glufx::set_cpu_kernel), else scalar C++.
//  * More rows: the weight is dequantized once into float32 and ATen's GEMM does the M x N x K work (the widening
//    is cheap next to it).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "quant.h"
#include "weight_memory.h"

namespace glufx {
namespace {
using namespace detail;

constexpr int64_t kGemvRows = 4;  // up to this many rows take the weight-streaming loop
constexpr int64_t kChannels = 4;  // output channels per call of dots()

// acc[m * kChannels + c] = sum_k x[m, k] * w[c, k] for c < nc (nc <= kChannels), m < M.
void dots_generic(const int8_t* w, int64_t nc, const float* x, int64_t M, int64_t K, float* acc) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < nc; ++c) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += static_cast<float>(w[c * K + k]) * x[m * K + k];
      acc[m * kChannels + c] = s;
    }
}

#ifdef GLUFX_X86
// One channel at a time, so the weight is read as one sequential stream (four channels side by side ran at
// half the bandwidth at one thread, measured), with four accumulator chains along K per row; the row count is
// a template parameter so that every accumulator lives in a register.
template <int64_t M>
__attribute__((target("avx512f"))) void dots_avx512(const int8_t* w, int64_t nc, const float* x, int64_t K,
                                                    float* acc) {
  for (int64_t c = 0; c < nc; ++c) {  // one channel at a time: one sequential weight stream
    const int8_t* wr = w + c * K;
    __m512 a[M][4];
    for (int64_t m = 0; m < M; ++m)
      for (int64_t u = 0; u < 4; ++u) a[m][u] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      __m512 wf[4];
      for (int64_t u = 0; u < 4; ++u)
        wf[u] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k + 16 * u))));
      for (int64_t m = 0; m < M; ++m)
        for (int64_t u = 0; u < 4; ++u) a[m][u] = _mm512_fmadd_ps(wf[u], _mm512_loadu_ps(x + m * K + k + 16 * u), a[m][u]);
    }
    for (; k + 16 <= K; k += 16) {
      const __m512 wf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k))));
      for (int64_t m = 0; m < M; ++m) a[m][0] = _mm512_fmadd_ps(wf, _mm512_loadu_ps(x + m * K + k), a[m][0]);
    }
    for (int64_t m = 0; m < M; ++m) {
      float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[m][0], a[m][1]), _mm512_add_ps(a[m][2], a[m][3])));
      for (int64_t j = k; j < K; ++j) s += static_cast<float>(wr[j]) * x[m * K + j];
      acc[m * kChannels + c] = s;
    }
  }
}

template <int64_t M>
__attribute__((target("avx2,fma"))) void dots_avx2(const int8_t* w, int64_t nc, const float* x, int64_t K,
                                                   float* acc) {
  for (int64_t c = 0; c < nc; ++c) {
    const int8_t* wr = w + c * K;
    __m256 a[M][4];
    for (int64_t m = 0; m < M; ++m)
      for (int64_t u = 0; u < 4; ++u) a[m][u] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      __m256 wf[4];
      for (int64_t u = 0; u < 4; ++u)
        wf[u] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr + k + 8 * u))));
      for (int64_t m = 0; m < M; ++m)
        for (int64_t u = 0; u < 4; ++u) a[m][u] = _mm256_fmadd_ps(wf[u], _mm256_loadu_ps(x + m * K + k + 8 * u), a[m][u]);
    }
    for (; k + 8 <= K; k += 8) {
      const __m256 wf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr + k))));
      for (int64_t m = 0; m < M; ++m) a[m][0] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(x + m * K + k), a[m][0]);
    }
    for (int64_t m = 0; m < M; ++m) {
      float s = hsum256_ps(_mm256_add_ps(_mm256_add_ps(a[m][0], a[m][1]), _mm256_add_ps(a[m][2], a[m][3])));
      for (int64_t j = k; j < K; ++j) s += static_cast<float>(wr[j]) * x[m * K + j];
      acc[m * kChannels + c] = s;
    }
  }
}
#endif

// acc[m * kChannels + c] = x[m] . w[c] for m < M <= kGemvRows, c < nc, by the variant in force
// (glufx::set_cpu_kernel: 0 generic, 1 avx2, 2 AVX-512; what the CPU has).
void dots(const int8_t* w, int64_t nc, const float* x, int64_t M, int64_t K, float* acc) {
#ifdef GLUFX_X86
  const int level = cpu_kernel_level();
  if (level >= 2) {
    switch (M) {
      case 1: return dots_avx512<1>(w, nc, x, K, acc);
      case 2: return dots_avx512<2>(w, nc, x, K, acc);
      case 3: return dots_avx512<3>(w, nc, x, K, acc);
      default: return dots_avx512<4>(w, nc, x, K, acc);
    }
  }
  if (level == 1) {
    switch (M) {  // 16 ymm registers: two rows at a time keep 8 accumulators and 4 weights in them
      case 1: return dots_avx2<1>(w, nc, x, K, acc);
      case 2: return dots_avx2<2>(w, nc, x, K, acc);
      default:
        dots_avx2<2>(w, nc, x, K, acc);
        return M == 3 ? dots_avx2<1>(w, nc, x + 2 * K, K, acc + 2 * kChannels)
                      : dots_avx2<2>(w, nc, x + 2 * K, K, acc + 2 * kChannels);
    }
  }
#endif
  dots_generic(w, nc, x, M, K, acc);
}

at::Tensor int8_weight_linear_cpu(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_scale,
                                  const c10::optional<at::Tensor>& bias) {
  check_float(x, "int8_weight_linear");
  TORCH_CHECK(w_q.scalar_type() == at::kChar && w_q.dim() == 2,
              "glufx::int8_weight_linear: expects an int8 [N, K] weight, got ", w_q.scalar_type(), " ", w_q.sizes());
  const int64_t N = w_q.size(0), K = w_q.size(1);
  TORCH_CHECK(x.size(-1) == K, "glufx::int8_weight_linear: input has ", x.size(-1), " features, the weight ", K);
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.numel() == N,
              "glufx::int8_weight_linear: expects float32 scales, one per output channel (", N, ")");
  at::Tensor x2d = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t M = x2d.size(0);
  const at::Tensor ws = w_scale.contiguous();
  const at::Tensor b32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  if (M == 0 || N == 0) return to_output(at::zeros({M, N}, x2d.options()), x, N);
  if (M > kGemvRows) {
    const at::Tensor w = w_q.to(at::kFloat).mul_(ws.unsqueeze(1));
    return to_output(b32.defined() ? at::addmm(b32, x2d, w.t()) : at::mm(x2d, w.t()), x, N);
  }
  const at::Tensor wc = weight_copy(w_q);  // on huge pages: the stream this loop is bound by
  at::Tensor out = at::empty({M, N}, x2d.options());
  const int8_t* wp = wc.data_ptr<int8_t>();
  const float* xp = x2d.data_ptr<float>();
  const float* sp = ws.data_ptr<float>();
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  // A thread's slice is at least 64 KiB of weight: smaller ones cost more to hand out than to read.
  const int64_t groups = (N + kChannels - 1) / kChannels;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(kChannels * K, 1));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    float acc[kGemvRows * kChannels];
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t n0 = g * kChannels, nc = std::min(kChannels, N - n0);
      dots(wp + n0 * K, nc, xp, M, K, acc);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t c = 0; c < nc; ++c) {
          float v = acc[m * kChannels + c] * sp[n0 + c];
          if (bp) v = v + bp[n0 + c];
          op[m * N + n0 + c] = v;
        }
    }
  });
  return to_output(out, x, N);
}

}  // namespace

TORCH_LIBRARY_IMPL(glufx, CPU, m) { m.impl("int8_weight_linear", &int8_weight_linear_cpu); }

}  // namespace glufx
