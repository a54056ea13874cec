"""Activation-quantization granularities shared by every glufx op (same numbering as csrc/glufx_ops.cpp)."""

PER_SEQUENCE = 0  # dynamic, one scale per batch row (whole tensor when 2-D)
PER_TOKEN = 1  # dynamic, one scale per token
STATIC = 2  # calibrated per-tensor scale
PER_TENSOR = 3  # dynamic, one scale over the whole call: batch mates change each other's results

GRANULARITIES = {"per_sequence": PER_SEQUENCE, "per_token": PER_TOKEN, "static": STATIC, "per_tensor": PER_TENSOR}

# The schemas TORCH_LIBRARY(glufx, m) declares in csrc/glufx_ops.cpp. Used to define the ops in
# Python when the native library was not built (GLUFX_SKIP_NATIVE=1), and checked against the
# native registration by tests/ops/test_schema.py so the two cannot drift.
SCHEMAS = {
    "quantize_weight": "quantize_weight(Tensor w) -> (Tensor, Tensor)",
    "quantize_activation": "quantize_activation(Tensor x, int granularity, Tensor? x_scale=None) -> (Tensor, Tensor)",
    "int8_mm": "int8_mm(Tensor a, Tensor b) -> Tensor",
    "int8_linear": "int8_linear(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias=None, Tensor? x_scale=None, "
    "int granularity=0, Tensor? rot_signs=None, int rot_block=0) -> Tensor",
    "int8_glu": "int8_glu(Tensor x, Tensor w_gate, Tensor s_gate, Tensor w_up, Tensor s_up, str activation, "
    "Tensor? x_scale=None, int granularity=0, Tensor? rot_signs=None, int rot_block=0) -> Tensor",
    "int8_weight_linear": "int8_weight_linear(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias=None) -> Tensor",
    "decode_attention": "decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor",
    "prefill_attention": "prefill_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, bool is_causal, float scale) "
    "-> Tensor",
    "hadamard": "hadamard(Tensor x, int block, Tensor? signs=None) -> Tensor",
    "pack_weight": "pack_weight(Tensor w_q) -> Tensor",
    "unpack_weight": "unpack_weight(Tensor w_packed, int N, int K) -> Tensor",
    "int8_linear_packed": "int8_linear_packed(Tensor x, Tensor w_packed, Tensor w_scale, Tensor? bias=None, "
    "Tensor? x_scale=None, int granularity=0) -> Tensor",
    "int8_glu_packed": "int8_glu_packed(Tensor x, Tensor w_packed, Tensor w_scale, int hidden, str activation, "
    "Tensor? x_scale=None, int granularity=0) -> Tensor",
}

# Kernel controls (no tensor arguments): which CPU kernel runs, how many prepared (packed) weights are
# cached, and whether weights prepared from now on are advised for huge pages. The reference library has
# one kernel and prepares nothing.
CONTROL_SCHEMAS = {
    "set_cpu_kernel": "set_cpu_kernel(str name) -> str",
    "prepared_weights": "prepared_weights() -> int",
    "set_huge_pages": "set_huge_pages(bool enabled) -> bool",
}

PACK_NR, PACK_KQ = 16, 4  # output channels per packed block, input channels per group (csrc/cpu/packed_linear.cpp)
