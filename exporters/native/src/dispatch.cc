// Picks the compute kernels for this CPU once: kernels.cc is compiled once per instruction set (build.py),
// each copy in its own namespace with its own table. $EDGE_COMPRESS_KERNELS names another set the CPU
// also runs (to test or compare them); RegisterCustomOps refuses a name this CPU cannot run.
#include <cstdlib>
#include <cstring>
#include <string>

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

const Kernels* named_kernels(const char* name, std::string* why) {
  __builtin_cpu_init();  // may run before the library's constructors
  if (std::strcmp(name, "sse2") == 0) {
    return &sse2::table;
  }
  if (std::strcmp(name, "avx2") == 0) {
    if (__builtin_cpu_supports("x86-64-v3")) {
      return &avx2::table;
    }
    *why = "this CPU lacks AVX2 + FMA (x86-64-v3)";
    return nullptr;
  }
  if (std::strcmp(name, "avx512") == 0) {
    if (__builtin_cpu_supports("x86-64-v4")) {
      return &avx512::table;
    }
    *why = "this CPU lacks AVX-512 (x86-64-v4)";
    return nullptr;
  }
  *why = "unknown kernel set (this x86-64 build has sse2, avx2 and avx512)";
  return nullptr;
}

const Kernels& kernels() {
  static const Kernels* chosen = [] {
    std::string why;
    const char* name = std::getenv("EDGE_COMPRESS_KERNELS");
    if (name != nullptr && *name != '\0') {
      if (const Kernels* named = named_kernels(name, &why)) {
        return named;
      }
    }
    for (const char* best : {"avx512", "avx2", "sse2"}) {  // the widest set this CPU runs
      if (const Kernels* found = named_kernels(best, &why)) {
        return found;
      }
    }
    return &sse2::table;  // not reached: every x86-64 CPU runs sse2
  }();
  return *chosen;
}
#elif defined(__aarch64__)
namespace neon {
extern const Kernels table;  // AArch64: NEON is part of the baseline
}

const Kernels* named_kernels(const char* name, std::string* why) {
  if (std::strcmp(name, "neon") == 0) {
    return &neon::table;
  }
  *why = "unknown kernel set (this aarch64 build has neon)";
  return nullptr;
}

const Kernels& kernels() { return neon::table; }
#else
#error "edge-compress native ops are built for x86-64 and aarch64"
#endif

}  // namespace ec
