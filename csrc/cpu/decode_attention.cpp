// Decode attention: out = softmax(scale * q k^T + mask) v for a few query rows per key-value head.
//
// A decode step's attention is a handful of query rows (one token's query heads, packed onto their key-value
// head under grouped-query attention) against the whole static KV cache. ATen's CPU flash kernel spends most
// of its time on blocking and per-block softmax bookkeeping built for long queries: 77 us per Gemma 3 270M layer
// over 546 cached positions at one thread (AMD Zen 5), where reading the 1.1 MB of keys and values takes 31 us,
// and it is no faster at two threads. Here every key and value row is read once for all of its head's query
// rows:
//  * the cache is cut into chunks of kChunk positions; a chunk's partial softmax (its max, its sum of
//    exponentials, its weighted sum of values) is one task, tasks run over ATen's thread pool, and the
//    partials of a head are merged in chunk order afterwards: the result does not depend on the thread count;
//  * scores and the value sum use AVX-512 or AVX2 by the CPU (glufx::set_cpu_kernel), else scalar C++; the
//    exponential is a degree-6 polynomial after range reduction (within 2 ulp of expf), scalar expf generically.
// A mask is SDPA's: boolean (true attends) or additive float, broadcastable to [B, H_kv, R, S]. A row with no
// position left to attend gets zeros.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "quant.h"
#include "softmax.h"

namespace glufx {
namespace {
using namespace detail;

constexpr int64_t kChunk = 128;   // cache positions per task (fixed: results independent of threads)
constexpr int64_t kMaxRows = 16;  // query rows per key-value head this kernel takes (a decode step's few)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---- scores: sc[r * n + j] = q[r] . k[j] for r < R, j < n -------------------------------------------------

void scores_generic(const float* q, int64_t R, const float* k, int64_t k_stride, int64_t n, int64_t D, float* sc,
                    const float*, int64_t) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t r = 0; r < R; ++r) {
      float s = 0.f;
      for (int64_t d = 0; d < D; ++d) s += q[r * D + d] * k[j * k_stride + d];
      sc[r * n + j] = s;
    }
}

#ifdef GLUFX_X86
// The value rows a chunk will weigh are fetched while its scores are computed: the values are then read in
// strips of 64 columns (registers), a strided pattern the hardware prefetchers serve poorly from memory.
inline void prefetch_row(const float* row, int64_t D) {
  for (int64_t d = 0; d < D; d += 16) _mm_prefetch(reinterpret_cast<const char*>(row + d), _MM_HINT_T0);
}

// Four query rows at a time: a key row's 16-float block is loaded once and multiplied into each.
__attribute__((target("avx512f"))) void scores_avx512(const float* q, int64_t R, const float* k, int64_t k_stride,
                                                     int64_t n, int64_t D, float* sc, const float* v,
                                                     int64_t v_stride) {
  const int64_t Dv = D - D % 16;
  for (int64_t j = 0; j < n; ++j) {
    const float* kr = k + j * k_stride;
    prefetch_row(v + j * v_stride, D);
    for (int64_t r0 = 0; r0 < R; r0 += 4) {
      const int64_t rn = std::min<int64_t>(4, R - r0);
      __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t d = 0; d < Dv; d += 16) {
        const __m512 kv = _mm512_loadu_ps(kr + d);
        for (int64_t r = 0; r < rn; ++r) a[r] = _mm512_fmadd_ps(_mm512_loadu_ps(q + (r0 + r) * D + d), kv, a[r]);
      }
      for (int64_t r = 0; r < rn; ++r) {
        float s = _mm512_reduce_add_ps(a[r]);
        for (int64_t d = Dv; d < D; ++d) s += q[(r0 + r) * D + d] * kr[d];
        sc[(r0 + r) * n + j] = s;
      }
    }
  }
}

__attribute__((target("avx2,fma"))) void scores_avx2(const float* q, int64_t R, const float* k, int64_t k_stride,
                                                    int64_t n, int64_t D, float* sc, const float* v,
                                                    int64_t v_stride) {
  const int64_t Dv = D - D % 8;
  for (int64_t j = 0; j < n; ++j) {
    const float* kr = k + j * k_stride;
    prefetch_row(v + j * v_stride, D);
    for (int64_t r0 = 0; r0 < R; r0 += 4) {
      const int64_t rn = std::min<int64_t>(4, R - r0);
      __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int64_t d = 0; d < Dv; d += 8) {
        const __m256 kv = _mm256_loadu_ps(kr + d);
        for (int64_t r = 0; r < rn; ++r) a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q + (r0 + r) * D + d), kv, a[r]);
      }
      for (int64_t r = 0; r < rn; ++r) {
        float s = hsum256_ps(a[r]);
        for (int64_t d = Dv; d < D; ++d) s += q[(r0 + r) * D + d] * kr[d];
        sc[(r0 + r) * n + j] = s;
      }
    }
  }
}

// acc[r] += sum_j p[r * n + j] * v[j] for r < R (acc rows of D floats). A strip of 64 value columns of RN rows'
// accumulators stays in registers across the chunk's positions; each value block is loaded once for the rows.
template <int RN>
__attribute__((target("avx512f"))) void weighted_values_rows_avx512(const float* p, const float* v, int64_t v_stride,
                                                                   int64_t n, int64_t D, float* acc) {
  int64_t d = 0;
  for (; d + 64 <= D; d += 64) {
    __m512 a[RN][4];
    for (int r = 0; r < RN; ++r)
      for (int u = 0; u < 4; ++u) a[r][u] = _mm512_loadu_ps(acc + r * D + d + 16 * u);
    for (int64_t j = 0; j < n; ++j) {
      const float* vr = v + j * v_stride + d;
      const __m512 v0 = _mm512_loadu_ps(vr), v1 = _mm512_loadu_ps(vr + 16), v2 = _mm512_loadu_ps(vr + 32),
                   v3 = _mm512_loadu_ps(vr + 48);
      for (int r = 0; r < RN; ++r) {
        const __m512 pr = _mm512_set1_ps(p[r * n + j]);
        a[r][0] = _mm512_fmadd_ps(pr, v0, a[r][0]);
        a[r][1] = _mm512_fmadd_ps(pr, v1, a[r][1]);
        a[r][2] = _mm512_fmadd_ps(pr, v2, a[r][2]);
        a[r][3] = _mm512_fmadd_ps(pr, v3, a[r][3]);
      }
    }
    for (int r = 0; r < RN; ++r)
      for (int u = 0; u < 4; ++u) _mm512_storeu_ps(acc + r * D + d + 16 * u, a[r][u]);
  }
  for (; d + 16 <= D; d += 16) {
    __m512 a[RN];
    for (int r = 0; r < RN; ++r) a[r] = _mm512_loadu_ps(acc + r * D + d);
    for (int64_t j = 0; j < n; ++j) {
      const __m512 vv = _mm512_loadu_ps(v + j * v_stride + d);
      for (int r = 0; r < RN; ++r) a[r] = _mm512_fmadd_ps(_mm512_set1_ps(p[r * n + j]), vv, a[r]);
    }
    for (int r = 0; r < RN; ++r) _mm512_storeu_ps(acc + r * D + d, a[r]);
  }
  for (; d < D; ++d)
    for (int64_t j = 0; j < n; ++j)
      for (int r = 0; r < RN; ++r) acc[r * D + d] += p[r * n + j] * v[j * v_stride + d];
}

__attribute__((target("avx512f"))) void weighted_values_avx512(const float* p, int64_t R, const float* v,
                                                              int64_t v_stride, int64_t n, int64_t D, float* acc) {
  for (int64_t r0 = 0; r0 < R; r0 += 4) {
    const float* pr = p + r0 * n;
    float* ar = acc + r0 * D;
    switch (std::min<int64_t>(4, R - r0)) {
      case 1: weighted_values_rows_avx512<1>(pr, v, v_stride, n, D, ar); break;
      case 2: weighted_values_rows_avx512<2>(pr, v, v_stride, n, D, ar); break;
      case 3: weighted_values_rows_avx512<3>(pr, v, v_stride, n, D, ar); break;
      default: weighted_values_rows_avx512<4>(pr, v, v_stride, n, D, ar);
    }
  }
}

__attribute__((target("avx2,fma"))) void weighted_values_avx2(const float* p, int64_t R, const float* v,
                                                              int64_t v_stride, int64_t n, int64_t D, float* acc) {
  const int64_t Dv = D - D % 8;
  for (int64_t j = 0; j < n; ++j) {
    const float* vr = v + j * v_stride;
    for (int64_t d = 0; d < Dv; d += 8) {
      const __m256 vv = _mm256_loadu_ps(vr + d);
      for (int64_t r = 0; r < R; ++r)
        _mm256_storeu_ps(acc + r * D + d,
                         _mm256_fmadd_ps(_mm256_set1_ps(p[r * n + j]), vv, _mm256_loadu_ps(acc + r * D + d)));
    }
    for (int64_t d = Dv; d < D; ++d)
      for (int64_t r = 0; r < R; ++r) acc[r * D + d] += p[r * n + j] * vr[d];
  }
}
#endif

void weighted_values_generic(const float* p, int64_t R, const float* v, int64_t v_stride, int64_t n, int64_t D,
                             float* acc) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t d = 0; d < D; ++d) acc[r * D + d] += p[r * n + j] * v[j * v_stride + d];
}

struct Kernels {
  void (*scores)(const float*, int64_t, const float*, int64_t, int64_t, int64_t, float*, const float*, int64_t);
  float (*exp_sum)(float*, int64_t, float);
  void (*weighted_values)(const float*, int64_t, const float*, int64_t, int64_t, int64_t, float*);
};

Kernels kernels() {
#ifdef GLUFX_X86
  const int level = cpu_kernel_level();
  if (level >= 2) return {scores_avx512, exp_sum_avx512, weighted_values_avx512};
  if (level == 1) return {scores_avx2, exp_sum_avx2, weighted_values_avx2};
#endif
  return {scores_generic, exp_sum_generic, weighted_values_generic};
}

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const c10::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "glufx::decode_attention: expects q [B, H_kv, R, D], k and v [B, H_kv, S, D], got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "glufx::decode_attention: expects float32 q, k and v, got ", q.scalar_type(), ", ", k.scalar_type(),
              ", ", v.scalar_type(), " (other dtypes take F.scaled_dot_product_attention)");
  const int64_t B = q.size(0), G = q.size(1), R = q.size(2), D = q.size(3), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == G && k.size(3) == D && v.sizes() == k.sizes(),
              "glufx::decode_attention: q ", q.sizes(), ", k ", k.sizes(), " and v ", v.sizes(), " do not agree");
  TORCH_CHECK(R <= kMaxRows, "glufx::decode_attention: takes at most ", kMaxRows, " query rows per key-value head (a ",
              "decode step's), got ", R, "; longer queries take F.scaled_dot_product_attention");
  at::Tensor out = at::zeros({B, G, R, D}, q.options());
  if (B == 0 || G == 0 || R == 0 || D == 0 || S == 0) return out;
  at::Tensor m4;
  bool bool_mask = false;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool || mask->scalar_type() == at::kFloat,
                "glufx::decode_attention: the mask must be bool (true attends) or float32 (added to the scores), got ",
                mask->scalar_type());
    TORCH_CHECK(mask->dim() <= 4, "glufx::decode_attention: a mask has at most 4 dims, got ", mask->sizes());
    m4 = mask->expand({B, G, R, S});  // broadcast by strides; read in place
    bool_mask = mask->scalar_type() == at::kBool;
  }
  // The inner loops read rows of D contiguous floats; the cache layers are already laid out that way.
  const at::Tensor qc = q.contiguous();
  const at::Tensor kc = k.stride(3) == 1 ? k : k.contiguous();
  const at::Tensor vc = v.stride(3) == 1 ? v : v.contiguous();
  const int64_t chunks = (S + kChunk - 1) / kChunk;
  const int64_t tasks = B * G * chunks;
  // partials per task: R maxima, R sums, R x D weighted values
  std::vector<float> part(static_cast<size_t>(tasks * R * (D + 2)));
  const Kernels kern = kernels();
  const float sc = static_cast<float>(scale);
  const float* qp = qc.data_ptr<float>();
  const float* kbase = kc.data_ptr<float>();
  const float* vbase = vc.data_ptr<float>();
  const bool* bmask = m4.defined() && bool_mask ? m4.data_ptr<bool>() : nullptr;
  const float* fmask = m4.defined() && !bool_mask ? m4.data_ptr<float>() : nullptr;
  const int64_t ms0 = m4.defined() ? m4.stride(0) : 0, ms1 = m4.defined() ? m4.stride(1) : 0;
  const int64_t ms2 = m4.defined() ? m4.stride(2) : 0, ms3 = m4.defined() ? m4.stride(3) : 0;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> s_buf(static_cast<size_t>(R * kChunk));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / (G * chunks), g = (t / chunks) % G, c = t % chunks;
      const int64_t j0 = c * kChunk, n = std::min(kChunk, S - j0);
      const float* kp = kbase + b * kc.stride(0) + g * kc.stride(1) + j0 * kc.stride(2);
      const float* vp = vbase + b * vc.stride(0) + g * vc.stride(1) + j0 * vc.stride(2);
      float* mx = part.data() + t * R * (D + 2);
      float* sum = mx + R;
      float* acc = sum + R;
      float* s = s_buf.data();
      kern.scores(qp + (b * G + g) * R * D, R, kp, kc.stride(2), n, D, s, vp, vc.stride(2));
      for (int64_t r = 0; r < R; ++r) {
        float* sr = s + r * n;
        float row_max = kNegInf;
        const int64_t moff = b * ms0 + g * ms1 + r * ms2 + j0 * ms3;
        if (bmask) {
          for (int64_t j = 0; j < n; ++j) sr[j] = bmask[moff + j * ms3] ? sr[j] * sc : kNegInf;
        } else if (fmask) {
          for (int64_t j = 0; j < n; ++j) sr[j] = sr[j] * sc + fmask[moff + j * ms3];
        } else {
          for (int64_t j = 0; j < n; ++j) sr[j] = sr[j] * sc;
        }
        for (int64_t j = 0; j < n; ++j) row_max = std::max(row_max, sr[j]);
        mx[r] = row_max;
        if (row_max == kNegInf) {  // nothing to attend in this chunk: no weight, no values
          sum[r] = 0.f;
          for (int64_t j = 0; j < n; ++j) sr[j] = 0.f;
        } else {
          sum[r] = kern.exp_sum(sr, n, row_max);
        }
      }
      std::fill(acc, acc + R * D, 0.f);
      kern.weighted_values(s, R, vp, vc.stride(2), n, D, acc);
    }
  });
  // Merge each head's chunks in chunk order: rescale each partial to the overall max, then normalise.
  float* op = out.data_ptr<float>();
  for (int64_t bg = 0; bg < B * G; ++bg)
    for (int64_t r = 0; r < R; ++r) {
      float gmax = kNegInf;
      for (int64_t c = 0; c < chunks; ++c) gmax = std::max(gmax, part[(bg * chunks + c) * R * (D + 2) + r]);
      float* o = op + (bg * R + r) * D;
      if (gmax == kNegInf) continue;  // no position to attend: zeros
      float total = 0.f;
      for (int64_t c = 0; c < chunks; ++c) {
        const float* base = part.data() + (bg * chunks + c) * R * (D + 2);
        if (base[r] == kNegInf) continue;
        const float w = std::exp(base[r] - gmax);
        total += w * base[R + r];
        const float* acc = base + 2 * R + r * D;
        for (int64_t d = 0; d < D; ++d) o[d] += w * acc[d];
      }
      const float inv = 1.f / total;
      for (int64_t d = 0; d < D; ++d) o[d] *= inv;
    }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(glufx, CPU, m) { m.impl("decode_attention", &decode_attention_cpu); }

}  // namespace glufx
