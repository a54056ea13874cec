// Online rotation of activations: a block-diagonal Walsh-Hadamard transform of each row, optionally
// after a diagonal of signs (x' = H_b (d * x), H_b = blockdiag(H_b, ...) / sqrt(b)). It is orthogonal,
// so W x = (W d H_b) x' and the weight carries the inverse offline (glufx/rotate.py); the rotated
// activations spread a channel outlier over its block, which is what lets per-token INT8 scales fit
// every channel (docs/method.md, "Rotation").
//
// Butterflies in the order of glufx/ops/reference.py::hadamard (stage h = 1, 2, 4, ...; a + b then
// a - b), one multiplication by float(1 / sqrt(b)) at the end: the same float operations, the same bits.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GLUFX_X86 1
#endif

#include "quant.h"

namespace glufx {
namespace detail {
namespace {

void fwht_block_generic(float* x, int64_t b) {
  for (int64_t h = 1; h < b; h *= 2)
    for (int64_t i = 0; i < b; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) {
        const float a = x[j], c = x[j + h];
        x[j] = a + c;
        x[j + h] = a - c;
      }
}

#ifdef GLUFX_X86
// Stages h = 1, 2, 4 in registers (lane permutes; each lane computes exactly the scalar a + c or
// a - c), stages h >= 8 on whole vectors.
__attribute__((target("avx2"))) void fwht_block_avx2(float* x, int64_t b) {
  // b >= 8 (the caller checks). Upper lanes of a pair take partner - self (= a - c), the others self +
  // partner (= a + c, commutative in IEEE arithmetic).
  for (int64_t i = 0; i < b; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    __m256 s = _mm256_permute_ps(v, 0xB1);  // h = 1: partners (0,1) (2,3) ...
    v = _mm256_blend_ps(_mm256_add_ps(v, s), _mm256_sub_ps(s, v), 0xAA);
    s = _mm256_permute_ps(v, 0x4E);  // h = 2: partners (0,2) (1,3) ...
    v = _mm256_blend_ps(_mm256_add_ps(v, s), _mm256_sub_ps(s, v), 0xCC);
    s = _mm256_permute2f128_ps(v, v, 0x01);  // h = 4: the other 128-bit half
    v = _mm256_blend_ps(_mm256_add_ps(v, s), _mm256_sub_ps(s, v), 0xF0);
    _mm256_storeu_ps(x + i, v);
  }
  for (int64_t h = 8; h < b; h *= 2)
    for (int64_t i = 0; i < b; i += 2 * h)
      for (int64_t j = i; j < i + h; j += 8) {
        const __m256 a = _mm256_loadu_ps(x + j), c = _mm256_loadu_ps(x + j + h);
        _mm256_storeu_ps(x + j, _mm256_add_ps(a, c));
        _mm256_storeu_ps(x + j + h, _mm256_sub_ps(a, c));
      }
}

__attribute__((target("avx2"))) void scale_row_avx2(float* x, int64_t K, float s, int64_t& k) {
  const __m256 v = _mm256_set1_ps(s);
  for (; k + 8 <= K; k += 8) _mm256_storeu_ps(x + k, _mm256_mul_ps(_mm256_loadu_ps(x + k), v));
}
#endif

}  // namespace

void check_rotation(int64_t K, int64_t block, const c10::optional<at::Tensor>& signs, const char* op) {
  TORCH_CHECK(block >= 0, "glufx::", op, ": rotation block must be >= 0 (0: no rotation), got ", block);
  if (block == 0) {
    TORCH_CHECK(!signs.has_value(), "glufx::", op, ": rotation signs given without a rotation block");
    return;
  }
  TORCH_CHECK((block & (block - 1)) == 0 && K % block == 0, "glufx::", op, ": rotation block ", block,
              " must be a power of two dividing the ", K, " input features");
  TORCH_CHECK(!signs.has_value() || (signs->scalar_type() == at::kFloat && signs->numel() == K),
              "glufx::", op, ": rotation signs must be float32 with one value per input feature (", K, ")");
}

at::Tensor rotate_rows(const at::Tensor& x2d, int64_t block, const c10::optional<at::Tensor>& signs) {
  const int64_t M = x2d.size(0), K = x2d.size(1);
  at::Tensor out = at::empty_like(x2d);
  at::Tensor d = signs.has_value() ? signs->contiguous() : at::Tensor();
  const float* xs = x2d.data_ptr<float>();
  const float* ds = d.defined() ? d.data_ptr<float>() : nullptr;
  float* y = out.data_ptr<float>();
  const float inv = static_cast<float>(1.0 / std::sqrt(static_cast<double>(block)));
#ifdef GLUFX_X86
  const bool avx2 = cpu_has_avx2() && block >= 8;
#endif
  at::parallel_for(0, M, std::max<int64_t>(1, 8192 / std::max<int64_t>(K, 1)), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      float* row = y + m * K;
      const float* src = xs + m * K;
      if (ds) {
        for (int64_t j = 0; j < K; ++j) row[j] = src[j] * ds[j];  // +-1: exact
      } else {
        std::copy(src, src + K, row);
      }
      int64_t k = 0;
#ifdef GLUFX_X86
      if (avx2) {
        for (int64_t o = 0; o < K; o += block) fwht_block_avx2(row + o, block);
        scale_row_avx2(row, K, inv, k);
      } else
#endif
        for (int64_t o = 0; o < K; o += block) fwht_block_generic(row + o, block);
      for (; k < K; ++k) row[k] = row[k] * inv;
    }
  });
  return out;
}

namespace {

at::Tensor hadamard_cpu(const at::Tensor& x, int64_t block, const c10::optional<at::Tensor>& signs) {
  check_float(x, "hadamard");
  check_rotation(x.size(-1), block, signs, "hadamard");
  TORCH_CHECK(block > 0, "glufx::hadamard: block must be > 0");
  auto [x2d, rows] = flatten_activations(x);
  (void)rows;
  return rotate_rows(x2d, block, signs).to(x.scalar_type()).view(x.sizes());
}

}  // namespace
}  // namespace detail

TORCH_LIBRARY_IMPL(glufx, CPU, m) { m.impl("hadamard", &detail::hadamard_cpu); }

}  // namespace glufx
