// The exponential of softmax rows, shared by the attention kernels (decode_attention.cpp, prefill_attention.cpp).
// exp_sum_*(x, n, mx): x[i] = exp(x[i] - mx) for i < n in place, returns their sum (in one fixed order per
// variant). x[i] - mx <= 0 (a row minus its max); a masked -inf gives exactly 0.
#pragma once
#include <cmath>
#include <cstdint>

#include "quant.h"

namespace glufx {
namespace detail {

#ifdef GLUFX_X86
// exp by range reduction: x = m ln2 + t, |t| <= ln2 / 2, e^t by its Taylor polynomial to t^6 (Horner), times 2^m.
// Inputs are <= 0 here (a score minus its row's max); below -87.3 (a masked -inf included) the result is 0.
__attribute__((target("avx512f"))) inline __m512 exp512(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 m = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 t = _mm512_fnmadd_ps(m, _mm512_set1_ps(0.693145752f), x);  // ln2 in two parts (Cody-Waite)
  t = _mm512_fnmadd_ps(m, _mm512_set1_ps(1.42860677e-6f), t);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.f));
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, m));
}

__attribute__((target("avx2,fma"))) inline __m256 exp256(__m256 x) {
  const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_GE_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 m = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 t = _mm256_fnmadd_ps(m, _mm256_set1_ps(0.693145752f), x);
  t = _mm256_fnmadd_ps(m, _mm256_set1_ps(1.42860677e-6f), t);
  __m256 p = _mm256_set1_ps(1.f / 720);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(m), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(live, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));  // m >= -126: 2^m is a normal float
}

// x[i] = exp(x[i] - mx) for i < n, returns their sum (in one fixed order per variant).
__attribute__((target("avx512f"))) inline float exp_sum_avx512(float* x, int64_t n, float mx) {
  const __m512 vm = _mm512_set1_ps(mx);
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(x + i), vm));
    _mm512_storeu_ps(x + i, e);
    acc = _mm512_add_ps(acc, e);
  }
  if (i < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), vm));
    _mm512_mask_storeu_ps(x + i, k, e);
    acc = _mm512_mask_add_ps(acc, k, acc, e);
  }
  return _mm512_reduce_add_ps(acc);
}

__attribute__((target("avx2,fma"))) inline float exp_sum_avx2(float* x, int64_t n, float mx) {
  const __m256 vm = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
    _mm256_storeu_ps(x + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  float s = hsum256_ps(acc);
  for (; i < n; ++i) {
    alignas(32) float tail[8] = {x[i] - mx, 0, 0, 0, 0, 0, 0, 0};
    _mm256_store_ps(tail, exp256(_mm256_load_ps(tail)));
    x[i] = tail[0];
    s += tail[0];
  }
  return s;
}

#endif

inline float exp_sum_generic(float* x, int64_t n, float mx) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - mx);
    s += x[i];
  }
  return s;
}

}  // namespace detail
}  // namespace glufx
