// Packed-weight INT8 linear: weights packed once (at rewrite time) into the micro-kernel's layout,
// activation quantization fused, int32 accumulation, dequantization + bias fused in the epilogue.
//
// Layout (both paths): N padded to a multiple of 8, K to a multiple of 2; for each block of 8
// output channels and each pair of input channels kp, 16 bytes
//     w[n0][2kp] w[n0][2kp+1] w[n1][2kp] w[n1][2kp+1] ... w[n7][2kp] w[n7][2kp+1]
// i.e. a tensor [N/8, K/2, 8, 2] int8. Sign-extended to int16, one 256-bit vpmaddwd with the
// broadcast activation pair (a[2kp], a[2kp+1]) yields 8 int32 partial sums, one per channel:
// exact for the full [-127, 127] range (the u8 x s8 vpmaddubsw alternative saturates int16 on
// 8-bit activations unless they are cut to 7 bits, which costs accuracy).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GLUFX_X86 1
#endif

#include "quant.h"

namespace glufx {
namespace {
using namespace detail;

constexpr int64_t kNR = 8;  // output channels per packed block (one ymm of int32)
constexpr int64_t kBlockedMinRows = 32, kKC = 256, kMC = 128;  // blocking of the many-rows path

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

at::Tensor pack_weight_cpu(const at::Tensor& w_q) {
  TORCH_CHECK(w_q.scalar_type() == at::kChar && w_q.dim() == 2, "glufx::pack_weight: expects an int8 [N, K] weight");
  const int64_t N = w_q.size(0), K = w_q.size(1), Np = round_up(N, kNR), Kp = round_up(K, 2);
  at::Tensor padded = at::zeros({Np, Kp}, w_q.options());
  padded.narrow(0, 0, N).narrow(1, 0, K).copy_(w_q);
  // [Np, Kp] -> [Np/8, 8, Kp/2, 2] -> [Np/8, Kp/2, 8, 2]
  return padded.view({Np / kNR, kNR, Kp / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

at::Tensor unpack_weight_cpu(const at::Tensor& packed, int64_t N, int64_t K) {
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 4 && packed.size(2) == kNR,
              "glufx::unpack_weight: expects a packed int8 [N/8, K/2, 8, 2] weight");
  const int64_t Np = packed.size(0) * kNR, Kp = packed.size(1) * 2;
  return packed.permute({0, 2, 1, 3}).reshape({Np, Kp}).narrow(0, 0, N).narrow(1, 0, K).contiguous();
}

// Epilogue shared by both paths: y = (float(acc) * s_x) * s_w + b, same order as the reference.
inline void store_row(const int32_t* acc, float sx, const float* sw, const float* bias, float* out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    float v = static_cast<float>(acc[j]) * sx;
    v = v * sw[j];
    if (bias) v = v + bias[j];
    out[j] = v;
  }
}

void packed_generic(const int16_t* A, int64_t lda, const int8_t* W, const float* sx, const float* sw,
                    const float* bias, float* Y, int64_t ldy, int64_t M, int64_t N, int64_t Kp, int64_t nb0,
                    int64_t nb1) {
  int32_t acc[kNR];
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    const int8_t* wb = W + nb * (Kp / 2) * 2 * kNR;
    const int64_t n0 = nb * kNR, n = std::min(kNR, N - n0);
    for (int64_t m = 0; m < M; ++m) {
      const int16_t* a = A + m * lda;
      std::fill(acc, acc + kNR, 0);
      for (int64_t kp = 0; kp < Kp / 2; ++kp)
        for (int64_t j = 0; j < kNR; ++j)
          acc[j] += int32_t(a[2 * kp]) * wb[(kp * kNR + j) * 2] + int32_t(a[2 * kp + 1]) * wb[(kp * kNR + j) * 2 + 1];
      store_row(acc, sx[m], sw + n0, bias ? bias + n0 : nullptr, Y + m * ldy + n0, n);
    }
  }
}

#ifdef GLUFX_X86
// MR rows x 2 blocks (16 channels) register tile over k-pairs [kp0, kp1): 2*MR int32 accumulators,
// two weight vectors sign-extended once per k-pair and reused by every row. `acc_in` (int32 [MR][ldc])
// continues a sum started on earlier k-blocks.
template <int MR>
__attribute__((target("avx2"))) inline void tile_avx2(const int16_t* A, int64_t lda, const int8_t* w0,
                                                       const int8_t* w1, int64_t kp0, int64_t kp1,
                                                       const int32_t* acc_in, int64_t ldc, __m256i* c0, __m256i* c1) {
  for (int r = 0; r < MR; ++r) {
    if (acc_in) {
      c0[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc_in + r * ldc));
      c1[r] = w1 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc_in + r * ldc + kNR))
                 : _mm256_setzero_si256();
    } else {
      c0[r] = c1[r] = _mm256_setzero_si256();
    }
  }
  for (int64_t kp = kp0; kp < kp1; ++kp) {
    const __m256i b0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w0 + kp * 16)));
    const __m256i b1 = w1 ? _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w1 + kp * 16)))
                          : _mm256_setzero_si256();
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, A + r * lda + 2 * kp, sizeof(pair));
      const __m256i a = _mm256_set1_epi32(pair);
      c0[r] = _mm256_add_epi32(c0[r], _mm256_madd_epi16(a, b0));
      c1[r] = _mm256_add_epi32(c1[r], _mm256_madd_epi16(a, b1));
    }
  }
}

__attribute__((target("avx2"))) inline void store_avx2(__m256i acc, float sx, const float* sw, const float* bias,
                                                        float* out, int64_t n) {
  if (n == kNR) {
    __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(sx));
    v = _mm256_mul_ps(v, _mm256_loadu_ps(sw));
    if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias));
    _mm256_storeu_ps(out, v);
    return;
  }
  alignas(32) int32_t tmp[kNR];
  _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), acc);
  store_row(tmp, sx, sw, bias, out, n);
}

struct PackedArgs {
  const int16_t* A;  // [M, Kp] quantized activations
  const int8_t* W;   // packed weight
  const float *sx, *sw, *bias;
  float* Y;          // [M, N]
  int32_t* C;        // [M, Np] partial sums between k-blocks (blocked path only)
  int64_t M, N, Np, Kp;
};

// Rows [m0, m0+MR) x channel blocks [nb0, nb1) over k-pairs [kp0, kp1); `first`/`last` k-block
// decide whether partial sums are read from / written to C or finished through the epilogue.
template <int MR>
__attribute__((target("avx2"))) void rows_avx2(const PackedArgs& p, int64_t m0, int64_t nb0, int64_t nb1,
                                                int64_t kp0, int64_t kp1, bool first, bool last) {
  const int64_t block = p.Kp * kNR;  // bytes per packed 8-channel block
  __m256i c0[MR], c1[MR];
  const int16_t* A = p.A + m0 * p.Kp;
  for (int64_t nb = nb0; nb < nb1; nb += 2) {
    const bool two = nb + 1 < nb1;
    const int64_t n0 = nb * kNR;
    int32_t* C = p.C ? p.C + m0 * p.Np + n0 : nullptr;
    tile_avx2<MR>(A, p.Kp, p.W + nb * block, two ? p.W + (nb + 1) * block : nullptr, kp0, kp1,
                  first ? nullptr : C, p.Np, c0, c1);
    for (int r = 0; r < MR; ++r) {
      if (!last) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(C + r * p.Np), c0[r]);
        if (two) _mm256_storeu_si256(reinterpret_cast<__m256i*>(C + r * p.Np + kNR), c1[r]);
        continue;
      }
      float* y = p.Y + (m0 + r) * p.N;
      const float sx = p.sx[m0 + r];
      store_avx2(c0[r], sx, p.sw + n0, p.bias ? p.bias + n0 : nullptr, y + n0, std::min(kNR, p.N - n0));
      if (two)
        store_avx2(c1[r], sx, p.sw + n0 + kNR, p.bias ? p.bias + n0 + kNR : nullptr, y + n0 + kNR,
                   std::min(kNR, p.N - n0 - kNR));
    }
  }
}

// Few rows: stream each weight slice once over the whole K (memory-bound regime). Many rows:
// GotoBLAS-style blocking, KC k-pairs x MC rows, so a 16-channel weight block (16 x 2KC bytes)
// stays in L1 while the MC x KC activation block stays in L2; int32 partial sums go through C.

__attribute__((target("avx2"))) void packed_avx2(const PackedArgs& p, int64_t nb0, int64_t nb1) {
  const int64_t kpairs = p.Kp / 2;
  const bool blocked = p.C != nullptr;
  const int64_t kc = blocked ? kKC : kpairs, mc = blocked ? kMC : p.M;
  for (int64_t kp0 = 0; kp0 < kpairs || kp0 == 0; kp0 += kc) {
    const int64_t kp1 = std::min(kpairs, kp0 + kc);
    const bool first = kp0 == 0, last = kp1 == kpairs;
    for (int64_t m0 = 0; m0 < p.M; m0 += mc) {
      const int64_t m1 = std::min(p.M, m0 + mc);
      for (int64_t nb = nb0; nb < nb1; nb += 2) {  // one 16-channel block at a time, all rows of the m-block
        const int64_t nbe = std::min(nb1, nb + 2);
        int64_t m = m0;
        for (; m + 4 <= m1; m += 4) rows_avx2<4>(p, m, nb, nbe, kp0, kp1, first, last);
        for (; m < m1; ++m) rows_avx2<1>(p, m, nb, nbe, kp0, kp1, first, last);
      }
    }
    if (kpairs == 0) break;
  }
}
#endif

at::Tensor int8_linear_packed_cpu(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale,
                                  const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& x_scale,
                                  int64_t granularity) {
  check_float(x, "int8_linear_packed");
  TORCH_CHECK(w_packed.scalar_type() == at::kChar && w_packed.dim() == 4 && w_packed.size(2) == kNR &&
                  w_packed.is_contiguous(),
              "glufx::int8_linear_packed: w_packed must come from glufx::pack_weight");
  const int64_t N = w_scale.numel(), K = x.size(-1), Kp = w_packed.size(1) * 2, NB = w_packed.size(0);
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && NB == (N + kNR - 1) / kNR && Kp == round_up(K, 2),
              "glufx::int8_linear_packed: packed weight [", NB * kNR, ", ", Kp, "] does not fit ", N,
              " channels of ", K, " features");
  auto [x2d, rows_per_sequence] = flatten_activations(x);
  const int64_t M = x2d.size(0);
  at::Tensor s_x = row_scales(x2d, rows_per_sequence, granularity, x_scale, "int8_linear_packed");

  // Quantize straight into int16 (the micro-kernel's operand width), K padded with zeros.
  at::Tensor a16 = at::empty({M, Kp}, x2d.options().dtype(at::kShort));
  {
    const float* xs = x2d.data_ptr<float>();
    const float* s = s_x.data_ptr<float>();
    int16_t* a = a16.data_ptr<int16_t>();
    at::parallel_for(0, M, std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1)), [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; ++m) {
        for (int64_t k = 0; k < K; ++k) a[m * Kp + k] = quantize_one(xs[m * K + k], s[m]);
        for (int64_t k = K; k < Kp; ++k) a[m * Kp + k] = 0;
      }
    });
  }
  at::Tensor out = at::empty({M, N}, x2d.options());
  at::Tensor b32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor ws = w_scale.contiguous();
  const int16_t* A = a16.data_ptr<int16_t>();
  const int8_t* W = w_packed.data_ptr<int8_t>();
  const float* sx = s_x.data_ptr<float>();
  const float* sw = ws.data_ptr<float>();
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  float* Y = out.data_ptr<float>();
  at::Tensor C;
  if (M >= kBlockedMinRows && cpu_has_avx2()) C = at::empty({M, NB * kNR}, x2d.options().dtype(at::kInt));
  PackedArgs args{A, W, sx, sw, bp, Y, C.defined() ? C.data_ptr<int32_t>() : nullptr, M, N, NB * kNR, Kp};
  if (M > 0 && N > 0) {
    // Threads split output-channel blocks (pairs of 8): each streams its own slice of the weight.
    const int64_t pairs = (NB + 1) / 2;
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(Kp * std::min<int64_t>(M, 64), 1));
    at::parallel_for(0, pairs, grain, [&](int64_t pb, int64_t pe) {
      const int64_t nb0 = pb * 2, nb1 = std::min(NB, pe * 2);
#ifdef GLUFX_X86
      if (cpu_has_avx2()) return packed_avx2(args, nb0, nb1);
#endif
      packed_generic(A, Kp, W, sx, sw, bp, Y, N, M, N, Kp, nb0, nb1);
    });
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return out.to(x.scalar_type()).view(shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(glufx, CPU, m) {
  m.impl("pack_weight", &pack_weight_cpu);
  m.impl("unpack_weight", &unpack_weight_cpu);
  m.impl("int8_linear_packed", &int8_linear_packed_cpu);
}

}  // namespace glufx
