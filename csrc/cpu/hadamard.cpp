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
__attribute__((target("avx2"))) void fwht_block_avx2(const float* src, const float* d, float* x, int64_t b) {
  // b >= 8 (the caller checks). The first three stages read src (times the signs d, exact) and write x.
  // Upper lanes of a pair take partner - self (= a - c), the others self + partner (= a + c,
  // commutative in IEEE arithmetic).
  for (int64_t i = 0; i < b; i += 8) {
    __m256 v = _mm256_loadu_ps(src + i);
    if (d) v = _mm256_mul_ps(v, _mm256_loadu_ps(d + i));
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

// A block of 16 * NV floats (16 to 128) wholly in zmm registers: signs, every butterfly stage, 1/sqrt(b)
// and the absmax in one load and one store per value. Within a register the stages h = 1, 2, 4, 8 pair
// lanes by permutes (upper lane of a pair: partner - self = a - c); h >= 16 pairs whole registers.
template <int NV>
__attribute__((target("avx512f"))) void rotate_block_avx512(const float* src, const float* d, float* dst, float inv,
                                                          __m512& amax, __mmask16& ok) {
  __m512 v[NV];
  for (int r = 0; r < NV; ++r) {
    v[r] = _mm512_loadu_ps(src + 16 * r);
    if (d) v[r] = _mm512_mul_ps(v[r], _mm512_loadu_ps(d + 16 * r));
    __m512 s = _mm512_permute_ps(v[r], 0xB1);  // h = 1
    v[r] = _mm512_mask_blend_ps(0xAAAA, _mm512_add_ps(v[r], s), _mm512_sub_ps(s, v[r]));
    s = _mm512_permute_ps(v[r], 0x4E);  // h = 2
    v[r] = _mm512_mask_blend_ps(0xCCCC, _mm512_add_ps(v[r], s), _mm512_sub_ps(s, v[r]));
    s = _mm512_shuffle_f32x4(v[r], v[r], 0xB1);  // h = 4: 128-bit lanes (1, 0, 3, 2)
    v[r] = _mm512_mask_blend_ps(0xF0F0, _mm512_add_ps(v[r], s), _mm512_sub_ps(s, v[r]));
    s = _mm512_shuffle_f32x4(v[r], v[r], 0x4E);  // h = 8: 128-bit lanes (2, 3, 0, 1)
    v[r] = _mm512_mask_blend_ps(0xFF00, _mm512_add_ps(v[r], s), _mm512_sub_ps(s, v[r]));
  }
  for (int h = 1; h < NV; h *= 2)  // h registers = 16 h floats
    for (int i = 0; i < NV; i += 2 * h)
      for (int j = i; j < i + h; ++j) {
        const __m512 a = v[j], c = v[j + h];
        v[j] = _mm512_add_ps(a, c);
        v[j + h] = _mm512_sub_ps(a, c);
      }
  const __m512 vs = _mm512_set1_ps(inv), big = _mm512_set1_ps(3.402823466e38f);
  for (int r = 0; r < NV; ++r) {
    const __m512 y = _mm512_mul_ps(v[r], vs);
    _mm512_storeu_ps(dst + 16 * r, y);
    const __m512 m = _mm512_abs_ps(y);
    ok &= _mm512_cmp_ps_mask(m, big, _CMP_LE_OQ);  // false for NaN and Inf
    amax = _mm512_max_ps(amax, m);
  }
}

__attribute__((target("avx512f"))) void rotate_row_avx512(const float* src, const float* d, float* dst, int64_t K,
                                                        int64_t block, float inv, float& amax, bool& finite) {
  __m512 a = _mm512_setzero_ps();
  __mmask16 ok = 0xFFFF;
  for (int64_t o = 0; o < K; o += block) {
    const float* so = d ? d + o : nullptr;
    switch (block) {
      case 16: rotate_block_avx512<1>(src + o, so, dst + o, inv, a, ok); break;
      case 32: rotate_block_avx512<2>(src + o, so, dst + o, inv, a, ok); break;
      case 64: rotate_block_avx512<4>(src + o, so, dst + o, inv, a, ok); break;
      default: rotate_block_avx512<8>(src + o, so, dst + o, inv, a, ok); break;
    }
  }
  amax = std::max(amax, _mm512_reduce_max_ps(a));
  finite &= ok == 0xFFFF;
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

void rotate_row(const float* src, const float* signs, float* dst, int64_t K, int64_t block, float& amax,
                bool& finite) {
  const float inv = static_cast<float>(1.0 / std::sqrt(static_cast<double>(block)));
  int64_t k = 0;
#ifdef GLUFX_X86
  const int level = cpu_kernel_level();
  if (level >= 2 && block >= 16 && block <= 128) {  // level 2 (vnni) implies AVX-512F
    rotate_row_avx512(src, signs, dst, K, block, inv, amax, finite);
    return;
  }
  if (level >= 1 && block >= 8) {
    for (int64_t o = 0; o < K; o += block) fwht_block_avx2(src + o, signs ? signs + o : nullptr, dst + o, block);
    k = scale_absmax_avx2(dst, K, inv, amax, finite);
  } else
#endif
  {
    if (signs) {
      for (int64_t j = 0; j < K; ++j) dst[j] = src[j] * signs[j];  // +-1: exact
    } else {
      std::copy(src, src + K, dst);
    }
    for (int64_t o = 0; o < K; o += block) fwht_block_generic(dst + o, block);
  }
  for (; k < K; ++k) {
    dst[k] = dst[k] * inv;
    const float v = std::fabs(dst[k]);
    finite &= v <= 3.402823466e38f;
    amax = std::max(amax, v);
  }
}

at::Tensor rotate_rows(const at::Tensor& x2d, int64_t block, const c10::optional<at::Tensor>& signs) {
  const int64_t M = x2d.size(0), K = x2d.size(1);
  at::Tensor out = at::empty_like(x2d);
  at::Tensor d = signs.has_value() ? signs->contiguous() : at::Tensor();
  const float* xs = x2d.data_ptr<float>();
  const float* ds = d.defined() ? d.data_ptr<float>() : nullptr;
  float* y = out.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 8192 / std::max<int64_t>(K, 1)), [&](int64_t b, int64_t e) {
    float amax = 0.f;  // unused here; the fused linear (packed_linear.cpp) takes its scales from it
    bool finite = true;
    for (int64_t m = b; m < e; ++m) rotate_row(xs + m * K, ds, y + m * K, K, block, amax, finite);
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
