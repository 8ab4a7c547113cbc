#include "memory.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastllm {

bool advise_huge_pages(uintptr_t p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (p == 0 || bytes < int64_t(2 * kHuge)) return false;
  uintptr_t begin = (p + kHuge - 1) & ~(kHuge - 1);
  uintptr_t end = (p + uintptr_t(bytes)) & ~(kHuge - 1);
  if (end <= begin) return false;
  return madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE) == 0;
#else
  (void)p;
  (void)bytes;
  return false;
#endif
}

}  // namespace fastllm
