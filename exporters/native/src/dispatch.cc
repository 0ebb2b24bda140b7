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
    const Kernels* named = name != nullptr && *name != '\0' ? named_kernels(name, &why) : nullptr;
    if (named != nullptr) {
      return named;
    }
    __builtin_cpu_init();
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
