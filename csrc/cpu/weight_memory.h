// Memory for the kernels' prepared weights (csrc/cpu/weight_memory.cpp).
#pragma once
#include <ATen/ATen.h>

namespace glufx {
namespace detail {

// An uninitialised contiguous tensor in memory advised for transparent huge pages (Linux), where the kernels'
// prepared weights live. Small weights share 2 MiB-aligned chunks, in the order they are prepared (a model's
// first forward prepares them in execution order, so a decode step reads one nearly sequential stream).
at::Tensor empty_weight(at::IntArrayRef sizes, at::ScalarType dtype);

// A contiguous copy of weight `w` in that memory, made on first use and cached with the kernels' other prepared
// forms (csrc/cpu/packed_linear.cpp): it lives as long as `w` and is remade when `w` is written in place.
at::Tensor weight_copy(const at::Tensor& w);

}  // namespace detail
}  // namespace glufx
