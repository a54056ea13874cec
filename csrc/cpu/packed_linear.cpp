// Packed-weight INT8 linear: weights packed once (at rewrite time) into the micro-kernels' layout,
// activation quantization fused, exact int32 accumulation, dequantization + bias fused in the epilogue.
//
// Layout: N padded to a multiple of 16, K to a multiple of 4; for each block of 16 output channels
// and each quad of input channels kq, 64 bytes w[n0][4kq..4kq+3] w[n1][4kq..] ... w[n15][4kq..],
// i.e. a tensor [N/16, K/4, 16, 4] int8. Kernels, chosen at run time:
//  * AVX-512 VNNI: one vpdpbusd multiplies a broadcast activation quad by 16 channels x 4 inputs
//    into int32 (64 MACs, no int16 intermediate, so no saturation). It takes u8 activations: we feed
//    q + 128 and subtract 128 * sum_k w[n, k], computed by a second vpdpbusd with a 0x80 broadcast
//    on the same weight vector (shared by every row of the tile). Exact for the full 8-bit range.
//  * AVX2: sign-extends 4 channels x 4 inputs to int16 and multiply-adds pairs (vpmaddwd) with the
//    broadcast activation quad; pairs of lanes are folded at the end. Exact; u8 x s8 vpmaddubsw would
//    saturate int16 on 8-bit activations.
//  * generic C++ everywhere else.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "quant.h"
#include "weight_memory.h"

namespace glufx {
namespace {
using namespace detail;

constexpr int64_t kNR = 16;  // output channels per packed block
constexpr int64_t kKQ = 4;   // input channels per packed group

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

bool cpu_has_vnni() {
#ifdef GLUFX_X86
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vnni");
  return has;
#else
  return false;
#endif
}

at::Tensor pack_weight_cpu(const at::Tensor& w_q) {
  TORCH_CHECK(w_q.scalar_type() == at::kChar && w_q.dim() == 2, "glufx::pack_weight: expects an int8 [N, K] weight");
  const int64_t N = w_q.size(0), K = w_q.size(1), Np = round_up(N, kNR), Kp = round_up(K, kKQ);
  at::Tensor padded = at::zeros({Np, Kp}, w_q.options());
  padded.narrow(0, 0, N).narrow(1, 0, K).copy_(w_q);
  at::Tensor packed = empty_weight({Np / kNR, Kp / kKQ, kNR, kKQ}, at::kChar);
  packed.copy_(padded.view({Np / kNR, kNR, Kp / kKQ, kKQ}).permute({0, 2, 1, 3}));
  return packed;
}

at::Tensor unpack_weight_cpu(const at::Tensor& packed, int64_t N, int64_t K) {
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 4 && packed.size(2) == kNR && packed.size(3) == kKQ,
              "glufx::unpack_weight: expects a packed int8 [N/16, K/4, 16, 4] weight");
  const int64_t Np = packed.size(0) * kNR, Kp = packed.size(1) * kKQ;
  return packed.permute({0, 2, 1, 3}).reshape({Np, Kp}).narrow(0, 0, N).narrow(1, 0, K).contiguous();
}

struct PackedArgs {
  const void* A;  // quantized activations [M, Kp]: uint8 (q + 128) for VNNI, int16 otherwise
  const int8_t* W;
  const float *sx, *sw, *bias;
  float* Y;    // [M, N]
  float* Y2;   // GLU: even blocks (gate) go to Y, odd blocks (up) to Y2, both [M, N] with N = hidden
  int64_t M, N, Kp;
};

// Where block nb of row m lands: its output row pointer at the block's first channel, and how many
// of its 16 channels exist.
inline float* block_out(const PackedArgs& p, int64_t m, int64_t nb, int64_t& n_valid) {
  const int64_t n0 = p.Y2 ? (nb / 2) * kNR : nb * kNR;
  n_valid = std::max<int64_t>(0, std::min(kNR, p.N - n0));
  return (p.Y2 && (nb & 1) ? p.Y2 : p.Y) + m * p.N + n0;
}

void rows_generic(const PackedArgs& p, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
  const int16_t* A = static_cast<const int16_t*>(p.A);
  const int64_t kq_n = p.Kp / kKQ;
  int32_t acc[kNR];
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    const int8_t* wb = p.W + nb * kq_n * kNR * kKQ;
    const int64_t n0 = nb * kNR;
    for (int64_t m = m0; m < m1; ++m) {
      int64_t n;
      float* y = block_out(p, m, nb, n);
      const int16_t* a = A + m * p.Kp;
      std::fill(acc, acc + kNR, 0);
      for (int64_t kq = 0; kq < kq_n; ++kq)
        for (int64_t j = 0; j < kNR; ++j)
          for (int64_t t = 0; t < kKQ; ++t) acc[j] += int32_t(a[kq * kKQ + t]) * wb[(kq * kNR + j) * kKQ + t];
      dequantize_row(acc, p.sx[m], p.sw + n0, p.bias ? p.bias + n0 : nullptr, y, n);
    }
  }
}

#ifdef GLUFX_X86
// ---- AVX-512 VNNI ---------------------------------------------------------------------------
#define GLUFX_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define GLUFX_UNROLL _Pragma("GCC unroll 16")

// acc += a (u8) . b (s8), 4-wide dot products into int32. GCC 12's _mm512_dpbusd_epi32 does not tie
// the accumulator to the destination register: every call copies it, and with a tile of 16
// accumulators the copies spill to the stack (measured: half the throughput of this form).
GLUFX_VNNI inline void dpbusd(__m512i& acc, __m512i a, __m512i b) {
#if defined(__GNUC__)
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
#else
  acc = _mm512_dpbusd_epi32(acc, a, b);
#endif
}

GLUFX_VNNI inline void store16(__m512i acc, float sx, const float* sw, const float* bias, float* out, int64_t n) {
  if (n == kNR) {
    __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(sx));
    v = _mm512_mul_ps(v, _mm512_loadu_ps(sw));
    if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias));
    _mm512_storeu_ps(out, v);
    return;
  }
  alignas(64) int32_t tmp[kNR];
  _mm512_store_si512(tmp, acc);
  dequantize_row(tmp, sx, sw, bias, out, n);
}

// One row, one block (a decode step): dot_vnni<1, 1> is a single chain of dependent vpdpbusd, one per 64 weight
// bytes, and its latency, not memory, bounded it. Four chains along K keep the loads streaming: a Gemma 3 270M
// lm_head at one row 1.11x, its layers' linears 1.14-1.36x, a whole decode step 1.11x at one thread (Zen 5;
// two threads are memory-bound either way). A software prefetch 16 quads ahead was slower.
__attribute__((noinline)) GLUFX_VNNI void dot_vnni_row(const uint8_t* A, const int8_t* w, int64_t kq_n, int32_t* acc) {
  __m512i c[4], s[4];
  for (int i = 0; i < 4; ++i) c[i] = s[i] = _mm512_setzero_si512();
  const __m512i k128 = _mm512_set1_epi8(static_cast<char>(0x80));
  int64_t kq = 0;
  for (; kq + 4 <= kq_n; kq += 4) {
    GLUFX_UNROLL
    for (int i = 0; i < 4; ++i) {
      const __m512i b = _mm512_loadu_si512(w + (kq + i) * kNR * kKQ);
      int32_t quad;
      std::memcpy(&quad, A + (kq + i) * kKQ, sizeof(quad));
      dpbusd(s[i], k128, b);
      dpbusd(c[i], _mm512_set1_epi32(quad), b);
    }
  }
  for (; kq < kq_n; ++kq) {
    const __m512i b = _mm512_loadu_si512(w + kq * kNR * kKQ);
    int32_t quad;
    std::memcpy(&quad, A + kq * kKQ, sizeof(quad));
    dpbusd(s[0], k128, b);
    dpbusd(c[0], _mm512_set1_epi32(quad), b);
  }
  const __m512i sum = _mm512_add_epi32(_mm512_add_epi32(c[0], c[1]), _mm512_add_epi32(c[2], c[3]));
  const __m512i sub = _mm512_add_epi32(_mm512_add_epi32(s[0], s[1]), _mm512_add_epi32(s[2], s[3]));
  _mm512_storeu_si512(acc, _mm512_sub_epi32(sum, sub));
}

// acc[r][0..NB*16) = sum over the kq_n k-quads of row r of A against NB channel blocks (w0, and w1 when NB
// is 2), exact int32. Nothing but the dot products, and not inlined: inlined into the tile's bookkeeping,
// GCC 12 keeps the accumulator arrays on the stack (a load and a store around every vpdpbusd).
template <int MR, int NB>
__attribute__((noinline)) GLUFX_VNNI void dot_vnni(const uint8_t* A, int64_t lda, const int8_t* w0, const int8_t* w1, int64_t kq_n,
                         int32_t* acc) {
  static_assert(NB == 1 || NB == 2, "one or two 16-channel blocks");
  __m512i c[NB][MR];
  GLUFX_UNROLL
  for (int r = 0; r < MR; ++r) for (int j = 0; j < NB; ++j) c[j][r] = _mm512_setzero_si512();
  __m512i s[NB];
  for (int j = 0; j < NB; ++j) s[j] = _mm512_setzero_si512();
  const __m512i k128 = _mm512_set1_epi8(static_cast<char>(0x80));
  const int8_t* w[2] = {w0, w1};
  for (int64_t kq = 0; kq < kq_n; ++kq) {
    __m512i b[NB];
    GLUFX_UNROLL
    for (int j = 0; j < NB; ++j) {
      b[j] = _mm512_loadu_si512(w[j] + kq * kNR * kKQ);
      dpbusd(s[j], k128, b[j]);
    }
    GLUFX_UNROLL
    for (int r = 0; r < MR; ++r) {
      int32_t quad;
      std::memcpy(&quad, A + r * lda + kq * kKQ, sizeof(quad));
      const __m512i a = _mm512_set1_epi32(quad);
      GLUFX_UNROLL
      for (int j = 0; j < NB; ++j) dpbusd(c[j][r], a, b[j]);
    }
  }
  GLUFX_UNROLL
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j) _mm512_storeu_si512(acc + (r * NB + j) * kNR, _mm512_sub_epi32(c[j][r], s[j]));
}

// MR rows x NB blocks (16 channels each) over the whole K, dequantized straight into Y. Two blocks share
// each broadcast of A; at one row that sharing buys nothing and the second block is a second stream through
// memory (10 KiB apart at K = 640): one core's prefetchers kept 12 GB/s on two streams against 18 GB/s on
// blocks read one after another (a Gemma-sized lm_head, Zen 4), so one row takes one block at a time.
template <int MR, int NB>
GLUFX_VNNI void tile_vnni(const PackedArgs& p, int64_t m0, int64_t nb) {
  const int64_t block = (p.Kp / kKQ) * kNR * kKQ;
  const int8_t* w0 = p.W + nb * block;
  alignas(64) int32_t acc[MR * NB * kNR];
  if constexpr (MR == 1 && NB == 1)
    dot_vnni_row(static_cast<const uint8_t*>(p.A) + m0 * p.Kp, w0, p.Kp / kKQ, acc);
  else
    dot_vnni<MR, NB>(static_cast<const uint8_t*>(p.A) + m0 * p.Kp, p.Kp, w0, w0 + (NB - 1) * block, p.Kp / kKQ, acc);
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j) {
      const int64_t n0 = (nb + j) * kNR;
      int64_t n;
      float* y = block_out(p, m0 + r, nb + j, n);
      store16(_mm512_load_si512(acc + (r * NB + j) * kNR), p.sx[m0 + r], p.sw + n0, p.bias ? p.bias + n0 : nullptr,
              y, n);
    }
}

template <int NB>
GLUFX_VNNI void rows_vnni_nb(const PackedArgs& p, int64_t m0, int64_t m1, int64_t nb) {
  int64_t m = m0;
  // 12-row tiles (24 accumulators + 6 operands fill the 32 zmm registers), 8 rows where a 12 would
  // leave a 4-row tail (M = 16: two 8s beat 12 + 4)
  for (; m + 12 <= m1 && m1 - m != 16; m += 12) tile_vnni<12, NB>(p, m, nb);
  for (; m + 8 <= m1; m += 8) tile_vnni<8, NB>(p, m, nb);
  for (; m + 4 <= m1; m += 4) tile_vnni<4, NB>(p, m, nb);
  for (; m < m1; ++m) tile_vnni<1, NB>(p, m, nb);
}

GLUFX_VNNI void rows_vnni(const PackedArgs& p, int64_t m0, int64_t m1, int64_t nb, bool two) {
  if (two) rows_vnni_nb<2>(p, m0, m1, nb);
  else rows_vnni_nb<1>(p, m0, m1, nb);
}

// ---- AVX2 -----------------------------------------------------------------------------------
#define GLUFX_AVX2 __attribute__((target("avx2")))

// 8 channels of int32 from two accumulators holding (channel, pair) lanes [c0 c0 c1 c1 c2 c2 c3 c3].
GLUFX_AVX2 inline __m256i fold_pairs(__m256i lo, __m256i hi) {
  return _mm256_permute4x64_epi64(_mm256_hadd_epi32(lo, hi), 0xD8);
}

GLUFX_AVX2 inline void store8(__m256i acc, float sx, const float* sw, const float* bias, float* out, int64_t n) {
  if (n >= 8) {
    __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(sx));
    v = _mm256_mul_ps(v, _mm256_loadu_ps(sw));
    if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias));
    _mm256_storeu_ps(out, v);
    return;
  }
  alignas(32) int32_t tmp[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), acc);
  if (n > 0) dequantize_row(tmp, sx, sw, bias, out, n);
}

// MR rows x 1 block (16 channels): 4 accumulators of 4 channels per row.
template <int MR>
GLUFX_AVX2 void tile_avx2(const PackedArgs& p, int64_t m0, int64_t nb) {
  const int16_t* A = static_cast<const int16_t*>(p.A) + m0 * p.Kp;
  const int8_t* w = p.W + nb * (p.Kp / kKQ) * kNR * kKQ;
  const int64_t n0 = nb * kNR;
  __m256i c[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) c[r][j] = _mm256_setzero_si256();
  for (int64_t kq = 0; kq < p.Kp / kKQ; ++kq) {
    __m256i b[4];
    for (int j = 0; j < 4; ++j)
      b[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + kq * kNR * kKQ + 16 * j)));
    for (int r = 0; r < MR; ++r) {
      int64_t quad;
      std::memcpy(&quad, A + r * p.Kp + kq * kKQ, sizeof(quad));
      const __m256i a = _mm256_set1_epi64x(quad);
      for (int j = 0; j < 4; ++j) c[r][j] = _mm256_add_epi32(c[r][j], _mm256_madd_epi16(a, b[j]));
    }
  }
  for (int r = 0; r < MR; ++r) {
    __m256i lo = fold_pairs(c[r][0], c[r][1]), hi = fold_pairs(c[r][2], c[r][3]);  // channels 0-7, 8-15
    const float sx = p.sx[m0 + r];
    int64_t n;
    float* y = block_out(p, m0 + r, nb, n);
    store8(lo, sx, p.sw + n0, p.bias ? p.bias + n0 : nullptr, y, std::min<int64_t>(8, n));
    store8(hi, sx, p.sw + n0 + 8, p.bias ? p.bias + n0 + 8 : nullptr, y + 8, n - 8);
  }
}

GLUFX_AVX2 void rows_avx2(const PackedArgs& p, int64_t m0, int64_t m1, int64_t nb) {
  int64_t m = m0;
  for (; m + 2 <= m1; m += 2) tile_avx2<2>(p, m, nb);
  for (; m < m1; ++m) tile_avx2<1>(p, m, nb);
}
#endif

enum class Path { kGeneric, kAvx2, kVnni };

Path best_path() {
  if (cpu_has_vnni()) return Path::kVnni;
  if (cpu_has_avx2()) return Path::kAvx2;
  return Path::kGeneric;
}

// A requested kernel the CPU lacks falls back to the best available one.
Path path_from_name(c10::string_view name) {
  if (name == "generic") return Path::kGeneric;
  if (name == "avx2" && cpu_has_avx2()) return Path::kAvx2;
  if (name == "vnni" && cpu_has_vnni()) return Path::kVnni;
  TORCH_CHECK(name == "auto" || name == "avx2" || name == "vnni",
              "glufx: unknown CPU kernel '", std::string(name), "'; choose generic, avx2, vnni or auto");
  return best_path();
}

const char* path_name(Path p) { return p == Path::kVnni ? "vnni" : p == Path::kAvx2 ? "avx2" : "generic"; }

// GLUFX_CPU_KERNEL=generic|avx2|vnni is read once, when the library loads; glufx::set_cpu_kernel
// switches at run time (tests run every variant in one process). Every variant reads the same
// prepared layout, so switching needs no repacking.
std::atomic<int> g_path{[] {
  const char* force = std::getenv("GLUFX_CPU_KERNEL");
  return static_cast<int>(force ? path_from_name(force) : best_path());
}()};

Path choose_path() { return static_cast<Path>(g_path.load(std::memory_order_relaxed)); }

}  // namespace

namespace detail {
int cpu_kernel_level() { return static_cast<int>(choose_path()); }
}  // namespace detail

namespace {

std::string set_cpu_kernel(c10::string_view name) {
  const Path old = choose_path();
  g_path.store(static_cast<int>(path_from_name(name)));
  return path_name(old);
}

// Each thread owns pairs of 16-channel blocks; a pair's weights (32 x K bytes) are read from memory
// once and stay in L2 while every row tile streams past them over the whole K, so the int32 sums
// never leave the registers. (K-blocking with partial sums in memory was measured slower: at
// 11008 channels the partial sums of one row block outgrow L2.)
void run_blocks(const PackedArgs& p, Path path, int64_t nb0, int64_t nb1) {
  if (path == Path::kGeneric) return rows_generic(p, 0, p.M, nb0, nb1);
#ifdef GLUFX_X86
  if (path == Path::kVnni) {
    const int64_t step = p.M == 1 ? 1 : 2;  // one row: one weight stream (tile_vnni)
    for (int64_t nb = nb0; nb < nb1; nb += step) rows_vnni(p, 0, p.M, nb, step == 2 && nb + 1 < nb1);
  } else {
    for (int64_t nb = nb0; nb < nb1; ++nb) rows_avx2(p, 0, p.M, nb);
  }
#endif
}

// An online rotation to apply row by row inside the quantization loop (block 0: none).
struct RowRotation {
  const float* signs = nullptr;
  int64_t block = 0;
};

// The packed GEMM shared by the linear and the GLU: x2d [M, K] float32 -> Y [M, N] (and, for the
// GLU, Y2 [M, N] from the odd blocks), activation quantization fused. Per-token scales are reduced in
// the quantization loop, row by row while the row is in L1 (a separate reduction pass cost ~30 % of a
// decode-sized call). With `rot`, each row is rotated into an L1 buffer, its absmax taken in the same
// pass, and quantized from there: one pass instead of three (rotate, reduce, quantize), the same bits.
void packed_gemm(const at::Tensor& x2d, int64_t rows_per_sequence, const at::Tensor& w_packed, const at::Tensor& ws,
                 const at::Tensor& b32, const c10::optional<at::Tensor>& x_scale, int64_t granularity, at::Tensor& out,
                 at::Tensor* out2, const char* op, RowRotation rot = {}) {
  const int64_t M = x2d.size(0), K = x2d.size(1), Kp = w_packed.size(1) * kKQ, NB = w_packed.size(0);
  const int64_t N = out.size(1);
  // Row-local scales (per token, static) are all a fused rotation can serve; the caller checks.
  TORCH_INTERNAL_ASSERT(rot.block == 0 || granularity == kPerToken || granularity == kStatic);
  const bool scales_in_loop = granularity == kPerToken;
  at::Tensor s_x = scales_in_loop ? at::empty({M}, x2d.options())
                                  : row_scales(x2d, rows_per_sequence, granularity, x_scale, op);
  const Path path = choose_path();

  // Quantize straight into the kernel's operand type, K padded with zeros.
  const bool u8 = path == Path::kVnni;
  at::Tensor aq = at::empty({M, Kp}, x2d.options().dtype(u8 ? at::kByte : at::kShort));
  {
    const float* xs = x2d.data_ptr<float>();
    float* s = s_x.data_ptr<float>();
    at::parallel_for(0, M, std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1)), [&](int64_t b, int64_t e) {
      std::vector<float> rotated(rot.block > 0 ? K : 0);
      for (int64_t m = b; m < e; ++m) {
        const float* row = xs + m * K;
        float amax = 0.f;
        bool finite = true;
        if (rot.block > 0) {
          rotate_row(row, rot.signs, rotated.data(), K, rot.block, amax, finite);
          row = rotated.data();
        } else if (scales_in_loop) {
          row_absmax(row, K, amax, finite);
        }
        if (scales_in_loop) s[m] = finite ? scale_from_absmax(amax) : NAN;  // checked below
        if (u8) {
          uint8_t* a = aq.data_ptr<uint8_t>() + m * Kp;
          quantize_row(row, K, s[m], 128, a);
          for (int64_t k = K; k < Kp; ++k) a[k] = 128;  // q = 0 (padded weights are 0 too)
        } else {
          int16_t* a = aq.data_ptr<int16_t>() + m * Kp;
          quantize_row(row, K, s[m], 0, a);
          for (int64_t k = K; k < Kp; ++k) a[k] = 0;
        }
      }
    });
    if (scales_in_loop)
      for (int64_t m = 0; m < M; ++m)
        TORCH_CHECK(!std::isnan(s[m]), "glufx::", op, ": input has NaN or Inf at row ", m,
                    "; INT8 cannot represent it (check the model's floating-point outputs first)");
  }
  PackedArgs args{aq.data_ptr(), w_packed.data_ptr<int8_t>(), s_x.data_ptr<float>(), ws.data_ptr<float>(),
                  b32.defined() ? b32.data_ptr<float>() : nullptr, out.data_ptr<float>(),
                  out2 ? out2->data_ptr<float>() : nullptr, M, N, Kp};
  if (M > 0 && N > 0) {
    // Threads split output-channel blocks (pairs of 16): each streams its own slice of the weight. A
    // slice of 128 KiB (at one row) is worth a thread: a decode step's q/k/v/o linears (0.2-0.7 MB
    // here) ran on one core under a 1 MiB threshold while the other waited.
    const int64_t pairs = (NB + 1) / 2;
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 12) / std::max<int64_t>(Kp * std::min<int64_t>(M, 64), 1));
    at::parallel_for(0, pairs, grain, [&](int64_t pb, int64_t pe) {
      run_blocks(args, path, pb * 2, std::min(NB, pe * 2));
    });
  }
}

// x [..., K] -> float32 [M, K] and the rotation packed_gemm fuses. A rotation that per-token or static
// scales follow is fused; per-sequence and per-tensor scales need every row rotated before the first is
// quantized, so those rows are rotated here.
struct Activations {
  at::Tensor x2d;
  int64_t rows_per_sequence;
  int64_t granularity;  // the plan's, or per-token where that is the same scale (one row per group)
  at::Tensor signs;  // keeps the fused rotation's signs alive and contiguous
  RowRotation rot;
};

Activations activations(const at::Tensor& x, int64_t granularity, const c10::optional<at::Tensor>& rot_signs,
                        int64_t rot_block) {
  auto [x2d, rows_per_sequence] = flatten_activations(x);
  // A decode step's sequences are one row each: a per-sequence (or, at one row, per-tensor) scale is then
  // the row's own, the same bits as per-token, which reduces and rotates inside the quantization loop.
  if ((granularity == kPerSequence && rows_per_sequence == 1) || (granularity == kPerTensor && x2d.size(0) == 1))
    granularity = kPerToken;
  Activations a{x2d, rows_per_sequence, granularity, at::Tensor(), {}};
  if (rot_block == 0) return a;
  if (granularity == kPerToken || granularity == kStatic) {
    if (rot_signs.has_value()) a.signs = rot_signs->contiguous();
    a.rot = {a.signs.defined() ? a.signs.data_ptr<float>() : nullptr, rot_block};
  } else {
    a.x2d = rotate_rows(x2d, rot_block, rot_signs);
  }
  return a;
}

// Both linear ops (explicit layout and canonical) end here: x [..., K] -> [..., N] in x's dtype.
at::Tensor linear_on_packed(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale,
                            const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& x_scale,
                            int64_t granularity, const char* op, const c10::optional<at::Tensor>& rot_signs = {},
                            int64_t rot_block = 0) {
  const int64_t N = w_scale.numel();
  Activations a = activations(x, granularity, rot_signs, rot_block);
  at::Tensor out = at::empty({a.x2d.size(0), N}, a.x2d.options());
  at::Tensor b32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  packed_gemm(a.x2d, a.rows_per_sequence, w_packed, w_scale.contiguous(), b32, x_scale, a.granularity, out, nullptr,
              op, a.rot);
  return to_output(out, x, N);
}

void check_activation(c10::string_view activation, const char* op) {
  TORCH_CHECK(activation == "silu" || activation == "gelu" || activation == "gelu_tanh", "glufx::", op,
              ": activation must be silu, gelu or gelu_tanh, got ", std::string(activation));
}

// Both GLU ops end here: gate and up in one pass over one quantized x (their 16-channel blocks
// interleave in w_packed), then act(gate) * up by ATen's kernels in x's dtype: the same bits as the
// two linears and the model's own activation and product, so fusing changes no result.
at::Tensor glu_on_packed(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale, int64_t hidden,
                         c10::string_view activation, const c10::optional<at::Tensor>& x_scale, int64_t granularity,
                         const char* op, const c10::optional<at::Tensor>& rot_signs = {}, int64_t rot_block = 0) {
  Activations a = activations(x, granularity, rot_signs, rot_block);
  at::Tensor gate = at::empty({a.x2d.size(0), hidden}, a.x2d.options());
  at::Tensor up = at::empty_like(gate);
  packed_gemm(a.x2d, a.rows_per_sequence, w_packed, w_scale.contiguous(), at::Tensor(), x_scale, a.granularity, gate,
              &up, op, a.rot);
  gate = to_output(gate, x, hidden);
  up = to_output(up, x, hidden);
  if (activation == "silu") return at::silu(gate).mul_(up);
  return at::gelu(gate, activation == "gelu_tanh" ? "tanh" : "none").mul_(up);
}

void check_packed(const at::Tensor& w_packed, const char* op) {
  TORCH_CHECK(w_packed.scalar_type() == at::kChar && w_packed.dim() == 4 && w_packed.size(2) == kNR &&
                  w_packed.size(3) == kKQ && w_packed.is_contiguous(),
              "glufx::", op, ": w_packed must come from glufx::pack_weight");
}

at::Tensor int8_linear_packed_cpu(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale,
                                  const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& x_scale,
                                  int64_t granularity) {
  check_float(x, "int8_linear_packed");
  check_packed(w_packed, "int8_linear_packed");
  const int64_t N = w_scale.numel(), K = x.size(-1), Kp = w_packed.size(1) * kKQ, NB = w_packed.size(0);
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && NB == (N + kNR - 1) / kNR && Kp == round_up(K, kKQ),
              "glufx::int8_linear_packed: packed weight [", NB * kNR, ", ", Kp, "] does not fit ", N,
              " channels of ", K, " features");
  return linear_on_packed(x, w_packed, w_scale, bias, x_scale, granularity, "int8_linear_packed");
}

at::Tensor int8_glu_packed_cpu(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale, int64_t hidden,
                               c10::string_view activation, const c10::optional<at::Tensor>& x_scale,
                               int64_t granularity) {
  check_float(x, "int8_glu_packed");
  check_packed(w_packed, "int8_glu_packed");
  const int64_t K = x.size(-1), Kp = w_packed.size(1) * kKQ, NB = w_packed.size(0);
  TORCH_CHECK(hidden > 0 && NB == 2 * ((hidden + kNR - 1) / kNR) && w_scale.scalar_type() == at::kFloat &&
                  w_scale.numel() == NB * kNR && Kp == round_up(K, kKQ),
              "glufx::int8_glu_packed: packed weight [", NB * kNR, ", ", Kp, "] is not gate and up of ", hidden,
              " channels over ", K, " features (pack them with glufx.nn.pack_glu)");
  check_activation(activation, "int8_glu_packed");
  return glu_on_packed(x, w_packed, w_scale, hidden, activation, x_scale, granularity, "int8_glu_packed");
}


// ---- prepared weights ---------------------------------------------------------------------------
// A quantized model holds canonical INT8 [N, K] weights (what is saved, exported and handed to other
// engines); the kernels read the packed layout above. The packed form is made from the canonical
// tensor on its first use and cached here, keyed by the weight's storage, so a saved model, an
// exported program or an AOTInductor package carries no kernel layout and runs under any kernel.
// The cache holds weak references: an entry dies with its weight (and its storage address cannot be
// reused while the entry exists, so a later model never hits a stale entry). An in-place write to a
// cached weight (its version counter moves) repacks it.
struct WeightRef {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  const void* data;
  std::vector<int64_t> sizes, strides;
  const c10::TensorImpl* impl;
  int64_t version;
};

int64_t version_of(const at::Tensor& t) {
  return t.is_inference() ? -1 : static_cast<int64_t>(t.unsafeGetTensorImpl()->version_counter().current_version());
}

WeightRef ref_of(const at::Tensor& t) {
  return {c10::weak_intrusive_ptr<c10::StorageImpl>(t.storage().getWeakStorageImpl()), t.data_ptr(),
          t.sizes().vec(), t.strides().vec(), t.unsafeGetTensorImpl(), version_of(t)};
}

// The same view of the same live storage (compared without allocating: this runs on every call).
bool same_view(const WeightRef& r, const at::Tensor& t) {
  return !r.storage.expired() && r.storage._unsafe_get_target() == t.storage().unsafeGetStorageImpl() &&
         r.data == t.data_ptr() && t.sizes() == c10::IntArrayRef(r.sizes) && t.strides() == c10::IntArrayRef(r.strides);
}

// Unchanged since it was packed: the same tensor object at the same version. A new tensor object over
// the same view (AOTInductor hands constants as fresh handles) is the same weight; it is adopted.
bool unchanged(WeightRef& r, const at::Tensor& t) {
  const int64_t v = version_of(t);
  if (r.impl == t.unsafeGetTensorImpl()) return r.version == v;
  r.impl = t.unsafeGetTensorImpl();
  r.version = v;
  return true;
}

// What a prepared form is for: forms of one weight for different ops must not be mistaken for each other.
enum class Form { kPacked, kGluPacked, kCopy };

struct PreparedEntry {
  Form form;
  std::vector<WeightRef> refs;
  at::Tensor packed, scale;
};

std::mutex g_prepared_mutex;
std::unordered_map<const void*, std::vector<PreparedEntry>> g_prepared;  // by the first weight's data

bool expired(const PreparedEntry& e) {
  for (const auto& r : e.refs)
    if (r.storage.expired()) return true;
  return false;
}

// (packed, scale) of the prepared form; returned by value: the entry may be dropped by another thread.
template <typename Make>
std::pair<at::Tensor, at::Tensor> prepared(Form form, const std::vector<at::Tensor>& weights, Make make) {
  std::lock_guard<std::mutex> lock(g_prepared_mutex);
  auto& bucket = g_prepared[weights[0].data_ptr()];
  for (auto it = bucket.begin(); it != bucket.end();) {
    if (it->form != form) {
      it = expired(*it) ? bucket.erase(it) : it + 1;
      continue;
    }
    bool same = it->refs.size() == weights.size();
    for (size_t i = 0; same && i < weights.size(); ++i) same = same_view(it->refs[i], weights[i]);
    bool fresh = same;
    for (size_t i = 0; fresh && i < weights.size(); ++i) fresh = unchanged(it->refs[i], weights[i]);
    if (fresh) return {it->packed, it->scale};
    // Drop a stale form of these weights (written in place) and entries of freed ones; another view
    // starting at the same address (a slice of a fused weight) keeps its own entry.
    it = same || expired(*it) ? bucket.erase(it) : it + 1;
  }
  // Drop entries of freed weights elsewhere too, so the cache never outgrows the live models.
  for (auto it = g_prepared.begin(); it != g_prepared.end();) {
    auto& b = it->second;
    b.erase(std::remove_if(b.begin(), b.end(), expired), b.end());
    it = b.empty() && &b != &bucket ? g_prepared.erase(it) : std::next(it);
  }
  PreparedEntry e;
  e.form = form;
  for (const auto& w : weights) e.refs.push_back(ref_of(w));
  std::tie(e.packed, e.scale) = make();
  bucket.push_back(e);
  return {e.packed, e.scale};
}

int64_t prepared_weights() {
  std::lock_guard<std::mutex> lock(g_prepared_mutex);
  int64_t n = 0;
  for (const auto& kv : g_prepared)
    for (const auto& e : kv.second) n += !expired(e);
  return n;
}

}  // namespace

namespace detail {
at::Tensor weight_copy(const at::Tensor& w) {
  return prepared(Form::kCopy, {w}, [&] {
           at::Tensor copy = empty_weight(w.sizes(), w.scalar_type());
           copy.copy_(w);
           return std::make_pair(copy, at::Tensor());
         }).first;
}
}  // namespace detail

namespace {

void check_canonical(const at::Tensor& w_q, const at::Tensor& w_scale, int64_t K, const char* op, const char* what) {
  TORCH_CHECK(w_q.scalar_type() == at::kChar && w_q.dim() == 2,
              "glufx::", op, ": ", what, " must be a 2-D int8 [N, K] weight (glufx::quantize_weight makes one)");
  TORCH_CHECK(w_q.size(1) == K, "glufx::", op, ": input has ", K, " features, ", what, " expects ", w_q.size(1));
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.numel() == w_q.size(0),
              "glufx::", op, ": the scale of ", what, " must be float32 with one value per output channel (",
              w_q.size(0), ")");
}

// The canonical W8A8 linear: x [..., K], w_q [N, K] int8 -> [..., N] in x's dtype.
at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_scale,
                           const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& x_scale,
                           int64_t granularity, const c10::optional<at::Tensor>& rot_signs, int64_t rot_block) {
  check_float(x, "int8_linear");
  check_canonical(w_q, w_scale, x.size(-1), "int8_linear", "w_q");
  check_rotation(x.size(-1), rot_block, rot_signs, "int8_linear");
  const int64_t N = w_q.size(0);
  TORCH_CHECK(!bias.has_value() || bias->numel() == N, "glufx::int8_linear: bias has ", bias->numel(),
              " elements, expected ", N);
  const auto prep = prepared(Form::kPacked, {w_q}, [&] { return std::make_pair(pack_weight_cpu(w_q.contiguous()), at::Tensor()); });
  return linear_on_packed(x, prep.first, w_scale, bias, x_scale, granularity, "int8_linear", rot_signs, rot_block);
}

// gate's and up's 16-channel blocks interleaved (gate block, up block, ...), channels padded to 16
// with zero weights and unit scales: one kernel tile yields a gate block and its up block.
std::pair<at::Tensor, at::Tensor> pack_glu(const at::Tensor& w_gate, const at::Tensor& s_gate, const at::Tensor& w_up,
                                           const at::Tensor& s_up) {
  const int64_t hidden = w_gate.size(0), K = w_gate.size(1), padded = round_up(hidden, kNR);
  auto blocks = [&](const at::Tensor& t, double fill) {
    return at::constant_pad_nd(t, {0, 0, 0, padded - hidden}, fill).view({padded / kNR, kNR, t.size(1)});
  };
  at::Tensor w = at::stack({blocks(w_gate, 0), blocks(w_up, 0)}, 1).reshape({2 * padded, K});
  at::Tensor s = at::stack({blocks(s_gate.reshape({hidden, 1}), 1.0), blocks(s_up.reshape({hidden, 1}), 1.0)}, 1)
                     .reshape({2 * padded})
                     .contiguous();
  return {pack_weight_cpu(w.contiguous()), s};
}

// act(x W_gate^T) * (x W_up^T) on the prepared interleaved form of gate's and up's canonical weights.
at::Tensor int8_glu_cpu(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& s_gate, const at::Tensor& w_up,
                        const at::Tensor& s_up, c10::string_view activation, const c10::optional<at::Tensor>& x_scale,
                        int64_t granularity, const c10::optional<at::Tensor>& rot_signs, int64_t rot_block) {
  check_float(x, "int8_glu");
  check_canonical(w_gate, s_gate, x.size(-1), "int8_glu", "w_gate");
  check_canonical(w_up, s_up, x.size(-1), "int8_glu", "w_up");
  TORCH_CHECK(w_gate.size(0) == w_up.size(0), "glufx::int8_glu: gate has ", w_gate.size(0), " channels, up ",
              w_up.size(0));
  check_activation(activation, "int8_glu");
  check_rotation(x.size(-1), rot_block, rot_signs, "int8_glu");
  const auto prep = prepared(Form::kGluPacked, {w_gate, s_gate, w_up, s_up}, [&] {
    return pack_glu(w_gate.contiguous(), s_gate.contiguous(), w_up.contiguous(), s_up.contiguous());
  });
  return glu_on_packed(x, prep.first, prep.second, w_gate.size(0), activation, x_scale, granularity, "int8_glu",
                       rot_signs, rot_block);
}

}  // namespace

TORCH_LIBRARY_IMPL(glufx, CPU, m) {
  m.impl("pack_weight", &pack_weight_cpu);
  m.impl("unpack_weight", &unpack_weight_cpu);
  m.impl("int8_linear_packed", &int8_linear_packed_cpu);
  m.impl("int8_glu_packed", &int8_glu_packed_cpu);
  m.impl("int8_linear", &int8_linear_cpu);
  m.impl("int8_glu", &int8_glu_cpu);
}

// Kernel controls, no tensor arguments: registered for every dispatch key.
TORCH_LIBRARY_FRAGMENT(glufx, m) {
  m.def("set_cpu_kernel(str name) -> str", &set_cpu_kernel);
  m.def("prepared_weights() -> int", &prepared_weights);
}

}  // namespace glufx
