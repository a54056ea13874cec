"""Inductor with the float math of eager PyTorch: how glufx graphs are compiled and AOT-packaged.

Why: W8A8 rounds every quantized linear's input to an INT8 code. Inductor sums reductions in
another order and evaluates tanh/exp/rsqrt with other approximations than ATen's kernels, which
moves FP32 values by an ulp; where one crosses a rounding boundary the INT8 code changes, that
error feeds the next layer's inputs and more codes flip. On Gemma 3 270M (W8A8 + QFeM + QFeP) the
fully Inductor-generated program's logits differ from eager's by 6.8 on a logit scale of 29 after
18 layers, with an equally good perplexity: another valid W8A8 result, not the same one.

So in `exact` mode the ops whose generated code is not bit-identical to ATen are neither
decomposed nor lowered: Inductor calls their ATen kernels (implicit fallbacks) and still fuses the
IEEE-exact elementwise arithmetic around them (+, -, *, / on CPU, comparisons, copies, views),
and its algebraic pattern rewrites are off. Measured: Gemma 3 270M logits equal eager's bit for bit
(tests/deploy). The lowering and decomposition tables are module-level dicts of
`torch._inductor` and `torch._decomp`; they are edited only for the duration of one compile, under
a lock, and restored: importing glufx changes nothing.
"""
from __future__ import annotations

import contextlib
import hashlib
import threading
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass

aten = torch.ops.aten

# ATen ops whose Inductor code differs from the eager kernel in the last bits: reductions
# (summation order), transcendentals (Sleef or decompositions vs ATen's vectorised forms),
# and composites Inductor decomposes into either.
EAGER_FLOAT_OPS = tuple(
    getattr(aten, name) for name in (
        "sum", "mean", "prod", "var", "var_mean", "std", "std_mean", "norm", "linalg_vector_norm",
        "cumsum", "cumprod", "logsumexp", "_softmax", "_log_softmax", "_safe_softmax",
        "native_layer_norm", "native_group_norm", "_fused_rms_norm",
        "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sqrt", "rsqrt", "pow",
        "sin", "cos", "tan", "tanh", "sinh", "cosh", "asin", "acos", "atan", "atan2",
        "sigmoid", "silu", "gelu", "mish", "softplus", "elu", "erf", "erfc", "erfinv", "logit",
    ) if hasattr(aten, name)
)
_VERSION = "4"  # bump when EAGER_FLOAT_OPS or the config below changes: it keys Inductor's caches
_lock = threading.Lock()


def _packet(op: Any) -> Any:
    return getattr(op, "overloadpacket", None)


@contextlib.contextmanager
def eager_float_ops(ops: Sequence[Any] = EAGER_FLOAT_OPS) -> Iterator[None]:
    """Within the block, Inductor neither decomposes nor lowers `ops`: they run as ATen kernels."""
    from torch._inductor import decomposition, lowering

    packets = set(ops)
    # torch._decomp's own table too: Inductor's implicit fallback asserts (under CI=1) that no
    # decomposition exists for an op it falls back on
    tables = {id(t): t for t in (lowering.lowerings, decomposition.decompositions, decomposition.select_decomp_table(),
                                 torch._decomp.decomposition_table)}.values()
    with _lock:
        removed = []
        for table in tables:
            hits = {k: v for k, v in table.items() if _packet(k) in packets}
            for k in hits:
                del table[k]
            removed.append((table, hits))
        try:
            yield
        finally:
            for table, hits in removed:
                table.update(hits)


class _CacheKey(CustomGraphPass):
    """A no-op post-grad pass whose uuid separates exact-mode artifacts in Inductor's caches: the
    edited lowering table is not part of their keys, the pass's uuid is."""

    def __call__(self, graph: fx.Graph) -> None:
        pass

    def uuid(self) -> str:
        names = ",".join(sorted(str(op) for op in EAGER_FLOAT_OPS))
        return hashlib.sha256(f"glufx-eager-float-ops-{_VERSION}:{names}".encode()).hexdigest()


def inductor_options(exact: bool) -> dict[str, Any]:
    if not exact:
        return {}
    return {"pattern_matcher": False, "implicit_fallbacks": True, "post_grad_custom_post_pass": _CacheKey()}


def compile_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], exact: bool = True,
                  cpp_wrapper: bool = False, inductor_configs: Optional[dict[str, Any]] = None) -> Any:
    """`compile_fx` of a rewritten dynamo graph; `exact` keeps eager's float math (module doc); `cpp_wrapper`
    makes Inductor's wrapper C++ (deploy/decode.py); `inductor_configs`: further Inductor settings."""
    from torch._inductor.compile_fx import compile_fx

    patches = {**inductor_options(exact), **({"cpp_wrapper": True} if cpp_wrapper else {}), **(inductor_configs or {})}
    with eager_float_ops() if exact else contextlib.nullcontext():
        return compile_fx(gm, example_inputs, config_patches=patches)


def aoti_package(program: torch.export.ExportedProgram, package_path: str, exact: bool = True,
                 inductor_configs: Optional[dict[str, Any]] = None) -> str:
    """`torch._inductor.aoti_compile_and_package` of a `glufx.export` program; with `exact` its
    outputs equal the program's (and the eager model's) bit for bit."""
    configs = {**inductor_options(exact), **(inductor_configs or {})}
    with eager_float_ops() if exact else contextlib.nullcontext():
        return torch._inductor.aoti_compile_and_package(program, package_path=package_path,
                                                        inductor_configs=configs)
