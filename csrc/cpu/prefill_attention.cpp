// Prefill attention: out = softmax(scale * q k^T + mask) v for a prompt's queries, skipping the keys a
// block of queries cannot attend.
//
// ATen's CPU flash kernel cuts the keys into blocks of 512 and computes every block a query block touches, masked
// or not: at a 512-token prompt a causal mask's upper half is computed and thrown away, and a sliding window's
// far keys too. It also repeats each key-value head's work for every query head of a grouped-query model. Here:
//  * a task is one block of kBlockQ query positions of one key-value head, with all of that head's query heads
//    stacked as rows of one matrix (G * kBlockQ rows): one GEMM per task for the scores, one for the values;
//  * a task's keys are the span its mask can attend: [0, last query + 1) when causal, the first to the last
//    attendable key of its rows under a mask (a sliding window's band, a padded batch's live keys);
//  * the scores pass (scale, mask, row max) and the exponential use AVX-512 or AVX2 by the CPU
//    (glufx::set_cpu_kernel), scalar C++ otherwise; the GEMMs are ATen's (one thread each, inside the task);
//  * tasks run over ATen's thread pool, the query blocks of a head in an order that gives each thread a similar
//    share of a causal mask's triangle. A task's arithmetic does not depend on which thread runs it.
// A mask is SDPA's: boolean (true attends) or additive float, broadcastable to [B, H, T, S]; `is_causal` is SDPA's
// (query i attends keys 0..i) and excludes a mask. A row with no key left to attend gets zeros. The output is
// [B, T, H, D], the layout an attention block's output projection reads (transformers transposes SDPA's to it).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "quant.h"
#include "softmax.h"

namespace glufx {
namespace {
using namespace detail;

constexpr int64_t kBlockQ = 64;     // query positions per task
constexpr int64_t kRowsTarget = 256;  // rows per scores GEMM worth aiming for: fewer positions per task for large G
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// s[j] = scale * s[j] (+ mask) for j < n, masked positions -inf; returns the row's max. bm / fm: the row's mask
// (contiguous) or null.
float prepare_row_generic(float* s, int64_t n, float scale, const bool* bm, const float* fm) {
  float mx = kNegInf;
  for (int64_t j = 0; j < n; ++j) {
    float x = s[j] * scale;
    if (bm && !bm[j]) x = kNegInf;
    if (fm) x += fm[j];
    s[j] = x;
    mx = std::max(mx, x);
  }
  return mx;
}

#ifdef GLUFX_X86
__attribute__((target("avx512f"))) float prepare_row_avx512(float* s, int64_t n, float scale, const bool* bm,
                                                         const float* fm) {
  const __m512 vs = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(kNegInf);
  __m512 vmax = ninf;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __m512 x = _mm512_mul_ps(_mm512_loadu_ps(s + j), vs);
    if (bm) {  // 16 bools widened to 16 lanes: nonzero attends
      const __m512i wide = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bm + j)));
      x = _mm512_mask_mov_ps(ninf, _mm512_test_epi32_mask(wide, wide), x);
    }
    if (fm) x = _mm512_add_ps(x, _mm512_loadu_ps(fm + j));
    _mm512_storeu_ps(s + j, x);
    vmax = _mm512_max_ps(vmax, x);
  }
  const float tail = prepare_row_generic(s + j, n - j, scale, bm ? bm + j : nullptr, fm ? fm + j : nullptr);
  return std::max(_mm512_reduce_max_ps(vmax), tail);
}

__attribute__((target("avx2,fma"))) float prepare_row_avx2(float* s, int64_t n, float scale, const bool* bm,
                                                           const float* fm) {
  const __m256 vs = _mm256_set1_ps(scale), ninf = _mm256_set1_ps(kNegInf);
  __m256 vmax = ninf;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 x = _mm256_mul_ps(_mm256_loadu_ps(s + j), vs);
    if (bm) {  // 8 bools -> 8 lanes of all-ones where the byte is nonzero
      int64_t bytes;
      std::memcpy(&bytes, bm + j, 8);
      const __m256i wide = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bytes));
      const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(wide, _mm256_setzero_si256()));
      x = _mm256_blendv_ps(ninf, x, keep);
    }
    if (fm) x = _mm256_add_ps(x, _mm256_loadu_ps(fm + j));
    _mm256_storeu_ps(s + j, x);
    vmax = _mm256_max_ps(vmax, x);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float mx = *std::max_element(lanes, lanes + 8);
  const float tail = prepare_row_generic(s + j, n - j, scale, bm ? bm + j : nullptr, fm ? fm + j : nullptr);
  return std::max(mx, tail);
}
#endif

struct Kernels {
  float (*prepare_row)(float*, int64_t, float, const bool*, const float*);
  float (*exp_sum)(float*, int64_t, float);
};

Kernels kernels() {
#ifdef GLUFX_X86
  const int level = cpu_kernel_level();
  if (level >= 2) return {prepare_row_avx512, exp_sum_avx512};
  if (level == 1) return {prepare_row_avx2, exp_sum_avx2};
#endif
  return {prepare_row_generic, exp_sum_generic};
}

// The keys [lo, hi) any of a task's rows can attend under a mask m4 [B, H, T, S] whose elements are T (bool: true
// attends; float: anything but -inf). Rows are the query positions [i0, i1) of heads [h0, h0 + G).
template <typename T>
std::pair<int64_t, int64_t> mask_span(const at::Tensor& m4, int64_t b, int64_t h0, int64_t G, int64_t i0, int64_t i1,
                                      int64_t S) {
  const T* base = m4.data_ptr<T>();
  const auto masked = [](T x) { return std::is_same_v<T, bool> ? !x : x == kNegInf; };
  int64_t lo = S, hi = 0;
  const int64_t heads = m4.stride(1) == 0 ? 1 : G;  // a mask shared by the heads is scanned once
  for (int64_t g = 0; g < heads; ++g)
    for (int64_t i = i0; i < i1; ++i) {
      const T* row = base + b * m4.stride(0) + (h0 + g) * m4.stride(1) + i * m4.stride(2);
      int64_t j = 0;
      while (j < lo && masked(row[j])) ++j;
      lo = std::min(lo, j);
      j = S;
      while (j > hi && masked(row[j - 1])) --j;
      hi = std::max(hi, j);
    }
  return {lo, hi};
}

at::Tensor prefill_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const c10::optional<at::Tensor>& mask, bool is_causal, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "glufx::prefill_attention: expects q [B, H, T, D], k and v [B, H_kv, S, D], got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "glufx::prefill_attention: expects float32 q, k and v, got ", q.scalar_type(), ", ", k.scalar_type(),
              ", ", v.scalar_type(), " (other dtypes take F.scaled_dot_product_attention)");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && v.sizes() == k.sizes() && Hkv > 0 && H % Hkv == 0,
              "glufx::prefill_attention: q ", q.sizes(), ", k ", k.sizes(), " and v ", v.sizes(), " do not agree ",
              "(k and v alike, the same batch and head size, query heads a multiple of key-value heads)");
  TORCH_CHECK(!(is_causal && mask.has_value()),
              "glufx::prefill_attention: pass either a mask or is_causal=True, not both (as SDPA)");
  at::Tensor out = at::zeros({B, T, H, D}, q.options());
  if (B == 0 || H == 0 || T == 0 || D == 0 || S == 0) return out;
  const int64_t G = H / Hkv;
  at::Tensor m4;
  bool bool_mask = false;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool || mask->scalar_type() == at::kFloat,
                "glufx::prefill_attention: the mask must be bool (true attends) or float32 (added to the scores), "
                "got ", mask->scalar_type());
    TORCH_CHECK(mask->dim() <= 4, "glufx::prefill_attention: a mask has at most 4 dims, got ", mask->sizes());
    // a row's keys are read as one contiguous run; batch, head and query dims broadcast by strides
    at::Tensor m = *mask;
    while (m.dim() < 4) m = m.unsqueeze(0);
    if (m.size(3) != S || m.stride(3) != 1) m = m.expand({m.size(0), m.size(1), m.size(2), S}).contiguous();
    m4 = m.expand({B, H, T, S});
    bool_mask = mask->scalar_type() == at::kBool;
  }
  const at::Tensor qc = q.stride(3) == 1 ? q : q.contiguous();
  const at::Tensor kc = k.stride(3) == 1 ? k : k.contiguous();
  const at::Tensor vc = v.stride(3) == 1 ? v : v.contiguous();
  const int64_t bq = std::max<int64_t>(1, std::min(kBlockQ, kRowsTarget / G));  // query positions per task
  const int64_t blocks = (T + bq - 1) / bq;
  const int64_t tasks = B * Hkv * blocks;
  const Kernels kern = kernels();
  const float sc = static_cast<float>(scale);
  float* op = out.data_ptr<float>();
  const bool* bmask = m4.defined() && bool_mask ? m4.data_ptr<bool>() : nullptr;
  const float* fmask = m4.defined() && !bool_mask ? m4.data_ptr<float>() : nullptr;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    const int64_t R_max = G * bq;
    at::Tensor q_buf = at::empty({R_max, D}, q.options());    // the task's query rows, packed
    at::Tensor s_buf = at::empty({R_max * S}, q.options());   // scores, then unnormalised probabilities
    at::Tensor o_buf = at::empty({R_max, D}, q.options());    // probabilities x values
    std::vector<float> row_sum(static_cast<size_t>(R_max));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / blocks, k_ord = t % blocks;
      // causal work grows with the block index: interleave the cheapest and dearest blocks of a head
      const int64_t blk = k_ord % 2 == 0 ? k_ord / 2 : blocks - 1 - k_ord / 2;
      const int64_t b = bh / Hkv, hk = bh % Hkv, h0 = hk * G;
      const int64_t i0 = blk * bq, i1 = std::min(T, i0 + bq), rows = i1 - i0, R = G * rows;
      int64_t lo = 0, hi = S;
      if (is_causal) {
        hi = std::min(S, i1);
      } else if (m4.defined()) {
        std::tie(lo, hi) = bool_mask ? mask_span<bool>(m4, b, h0, G, i0, i1, S)
                                     : mask_span<float>(m4, b, h0, G, i0, i1, S);
      }
      if (hi <= lo) continue;  // nothing to attend: zeros
      const int64_t n = hi - lo;
      float* qp = q_buf.data_ptr<float>();
      for (int64_t g = 0; g < G; ++g)
        for (int64_t r = 0; r < rows; ++r)
          std::memcpy(qp + (g * rows + r) * D,
                      qc.data_ptr<float>() + b * qc.stride(0) + (h0 + g) * qc.stride(1) + (i0 + r) * qc.stride(2),
                      D * sizeof(float));
      at::Tensor scores = s_buf.narrow(0, 0, R * n).view({R, n});
      const at::Tensor keys = kc.select(0, b).select(0, hk).narrow(0, lo, n);    // [n, D]
      const at::Tensor values = vc.select(0, b).select(0, hk).narrow(0, lo, n);  // [n, D]
      at::mm_out(scores, q_buf.narrow(0, 0, R), keys.t());
      float* sp = scores.data_ptr<float>();
      for (int64_t row = 0; row < R; ++row) {
        const int64_t g = row / rows, i = i0 + row % rows;
        float* s = sp + row * n;
        // causal: key j <= i, so the row ends early; the rest of it weighs 0
        const int64_t end = is_causal ? std::min(n, i + 1 - lo) : n;
        const bool* bm = nullptr;
        const float* fm = nullptr;
        if (m4.defined()) {
          const int64_t off = b * m4.stride(0) + (h0 + g) * m4.stride(1) + i * m4.stride(2) + lo;
          if (bmask) bm = bmask + off; else fm = fmask + off;
        }
        const float mx = end > 0 ? kern.prepare_row(s, end, sc, bm, fm) : kNegInf;
        if (mx == kNegInf) {  // nothing to attend in this row
          row_sum[row] = 0.f;
          std::fill(s, s + n, 0.f);
          continue;
        }
        row_sum[row] = kern.exp_sum(s, end, mx);
        std::fill(s + end, s + n, 0.f);
      }
      at::Tensor weighted = o_buf.narrow(0, 0, R);
      at::mm_out(weighted, scores, values);
      const float* wp = weighted.data_ptr<float>();
      for (int64_t row = 0; row < R; ++row) {
        if (row_sum[row] == 0.f) continue;
        const int64_t g = row / rows, i = i0 + row % rows;
        const float inv = 1.f / row_sum[row];
        float* o = op + ((b * T + i) * H + h0 + g) * D;
        const float* w = wp + row * D;
        for (int64_t d = 0; d < D; ++d) o[d] = w[d] * inv;
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(glufx, CPU, m) { m.impl("prefill_attention", &prefill_attention_cpu); }

}  // namespace glufx
