// Memory policy for the outputs fastllm allocates on the CPU.
#pragma once
#include <cstdint>

namespace fastllm {

// Ask the kernel to back the 2 MiB-aligned part of [p, p + bytes) with transparent huge pages
// (madvise MADV_HUGEPAGE), before the range is first written. A fresh 64 MiB output otherwise
// costs 16384 page faults, which take longer than the kernel that fills it. Returns whether the
// advice was taken (false for small ranges, unsupported systems, or a refused madvise).
bool advise_huge_pages(uintptr_t p, int64_t bytes);

}  // namespace fastllm
