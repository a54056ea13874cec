// Op schemas of the glufx library, declared once. Fake (meta) kernels live beside the Python
// mirror of these strings in glufx/ops/__init__.py; CPU kernels in csrc/cpu/.
//
// granularity (activation quantization), shared by every op that takes it:
//   0 per_sequence  dynamic, one scale per leading index of a >=3-D input (per batch row),
//                   one scale for the whole tensor when the input is 2-D
//   1 per_token     dynamic, one scale per row of the flattened [M, K] input
//   2 static        the calibrated per-tensor scale `x_scale` (shape [1])
//   3 per_tensor    dynamic, one scale over the whole call (batch mates interact)
#include <torch/library.h>

TORCH_LIBRARY(glufx, m) {
  m.def("quantize_weight(Tensor w) -> (Tensor, Tensor)");
  m.def("quantize_activation(Tensor x, int granularity, Tensor? x_scale=None) -> (Tensor, Tensor)");
  m.def("int8_mm(Tensor a, Tensor b) -> Tensor");
  // The canonical ops: INT8 weights [N, K] as saved and exported; the CPU kernels prepare (pack)
  // them on first use and cache the packed form (csrc/cpu/packed_linear.cpp).
  m.def(
      "int8_linear(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias=None, Tensor? x_scale=None, "
      "int granularity=0, Tensor? rot_signs=None, int rot_block=0) -> Tensor");
  m.def(
      "int8_glu(Tensor x, Tensor w_gate, Tensor s_gate, Tensor w_up, Tensor s_up, str activation, "
      "Tensor? x_scale=None, int granularity=0, Tensor? rot_signs=None, int rot_block=0) -> Tensor");
  // Weight-only INT8: x stays floating point, y = x (w_scale * w_q)^T + bias (csrc/cpu/weight_only.cpp); for
  // the linears QFeM keeps out of INT8 activations, with GlufxConfig(fp_weights="int8").
  m.def("int8_weight_linear(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias=None) -> Tensor");
  // Online rotation of the input (rot_block > 0): x' = H_b (rot_signs * x), the block-diagonal
  // Walsh-Hadamard transform of blocks of rot_block features, then quantized; the weights carry the
  // inverse (glufx/rotate.py). hadamard is that transform alone.
  m.def("hadamard(Tensor x, int block, Tensor? signs=None) -> Tensor");
  // The kernel layout, explicit (benchmarks, and callers that manage their own packing).
  m.def("pack_weight(Tensor w_q) -> Tensor");
  m.def("unpack_weight(Tensor w_packed, int N, int K) -> Tensor");
  m.def(
      "int8_linear_packed(Tensor x, Tensor w_packed, Tensor w_scale, Tensor? bias=None, Tensor? x_scale=None, "
      "int granularity=0) -> Tensor");
  // act(x W_gate^T) * (x W_up^T) from one quantized x; w_packed interleaves 16-channel blocks of
  // gate and up (glufx.nn.pack_glu); activation: silu | gelu | gelu_tanh.
  m.def(
      "int8_glu_packed(Tensor x, Tensor w_packed, Tensor w_scale, int hidden, str activation, "
      "Tensor? x_scale=None, int granularity=0) -> Tensor");
  // softmax(scale * q k^T + mask) v for a decode step's few query rows per key-value head, over float32
  // q [B, H_kv, R, D] and a KV cache k, v [B, H_kv, S, D]; mask: SDPA's, bool or additive float
  // (csrc/cpu/decode_attention.cpp).
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
  // The same for a prompt's queries, q [B, H, T, D] against k, v [B, H_kv, S, D] (H a multiple of H_kv), skipping
  // the keys a block of queries cannot attend; is_causal as SDPA's (excludes a mask). Returns [B, T, H, D], the
  // layout the output projection reads (csrc/cpu/prefill_attention.cpp).
  m.def("prefill_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, bool is_causal, float scale) -> Tensor");
}
