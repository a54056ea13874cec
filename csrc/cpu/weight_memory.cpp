// Prepared weights on transparent huge pages.
//
// A decode step reads every weight once, and at one thread it is bound by how fast one core streams memory. On
// 4 KiB pages each weight costs a TLB miss per page, and a core's stream prefetchers stop at every page boundary:
// a Gemma 3 270M step (270 MB of INT8 weights) misses on ~66k pages. With the kernels' packed weights on 2 MiB
// pages its linears ran 5-15 % faster at one thread (the 168 MB lm_head 37 -> 41 GB/s; Zen 5, THP "always"
// against "madvise" in back-to-back runs). Most kernels run THP in "madvise" mode, so the memory is advised
// explicitly before its first touch; where THP is off (or not Linux) it is ordinary memory.
//
// GLUFX_HUGE_PAGES=0 turns the advice off (read once, when the library loads); glufx::set_huge_pages switches it for
// weights prepared afterwards.
#include "weight_memory.h"

#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace glufx {
namespace detail {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
// Weights up to a quarter of a chunk share chunks; larger ones get their own 2 MiB-rounded block.
constexpr size_t kChunk = size_t(32) << 20;
constexpr size_t kAlign = 64;

size_t round_up(size_t v, size_t m) { return (v + m - 1) / m * m; }

std::atomic<bool> g_advise{[] {
  const char* env = std::getenv("GLUFX_HUGE_PAGES");
  return !(env && std::strcmp(env, "0") == 0);
}()};

struct Block {
  void* base = nullptr;
  size_t size = 0;
  explicit Block(size_t bytes) : size(bytes) {
    if (posix_memalign(&base, kHugePage, bytes) != 0) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    // A hint: it fails harmlessly where THP is unavailable.
    if (g_advise.load(std::memory_order_relaxed)) madvise(base, bytes, MADV_HUGEPAGE);
#endif
  }
  ~Block() { std::free(base); }
  Block(const Block&) = delete;
  Block& operator=(const Block&) = delete;
};

std::mutex g_mutex;
// The chunk small weights are placed in. Held weakly: a chunk lives exactly as long as one of its weights.
std::weak_ptr<Block> g_chunk;
size_t g_used = 0;

}  // namespace

at::Tensor empty_weight(at::IntArrayRef sizes, at::ScalarType dtype) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = round_up(std::max<size_t>(1, static_cast<size_t>(numel) * c10::elementSize(dtype)), kAlign);
  std::shared_ptr<Block> block;
  size_t offset = 0;
  if (bytes > kChunk / 4) {
    block = std::make_shared<Block>(round_up(bytes, kHugePage));
  } else {
    std::lock_guard<std::mutex> lock(g_mutex);
    block = g_chunk.lock();
    if (!block || g_used + bytes > block->size) {
      block = std::make_shared<Block>(kChunk);
      g_chunk = block;
      g_used = 0;
    }
    offset = g_used;
    g_used += bytes;
  }
  void* data = static_cast<char*>(block->base) + offset;
  return at::from_blob(data, sizes, [block](void*) mutable { block.reset(); }, at::TensorOptions().dtype(dtype));
}

}  // namespace detail

namespace {
// Returns the previous setting. A shared chunk keeps the advice it was made with; the switch starts a new one.
bool set_huge_pages(bool enabled) {
  std::lock_guard<std::mutex> lock(detail::g_mutex);
  const bool old = detail::g_advise.exchange(enabled);
  if (old != enabled) detail::g_chunk.reset();
  return old;
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(glufx, m) { m.def("set_huge_pages(bool enabled) -> bool", &set_huge_pages); }

}  // namespace glufx
