// Picks the compute kernels for this CPU once: kernels.cc is compiled once per instruction set (build.py),
// each copy in its own namespace with its own table.
#include "kernels.h"

namespace ec {

#if defined(__x86_64__)
namespace sse2 {
extern const Kernels table;  // x86-64 baseline: loads on any x86-64
}
namespace avx2 {
extern const Kernels table;  // x86-64-v3: AVX2 + FMA
}
namespace avx512 {
extern const Kernels table;  // x86-64-v4: AVX-512
}

const Kernels& kernels() {
  static const Kernels* chosen = [] {
    __builtin_cpu_init();  // may run before the library's constructors
    if (__builtin_cpu_supports("x86-64-v4")) {
      return &avx512::table;
    }
    if (__builtin_cpu_supports("x86-64-v3")) {
      return &avx2::table;
    }
    return &sse2::table;
  }();
  return *chosen;
}
#elif defined(__aarch64__)
namespace neon {
extern const Kernels table;  // AArch64: NEON is part of the baseline
}

const Kernels& kernels() { return neon::table; }
#else
#error "edge-compress native ops are built for x86-64 and aarch64"
#endif

}  // namespace ec
