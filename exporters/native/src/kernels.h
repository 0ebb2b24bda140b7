// The work of one call of either op, as plain data, and the compute kernels that run its items. The op
// files (ORT glue, validation, masks) fill a job; kernels.cc is compiled once per instruction set and
// dispatch.cc picks the best one the CPU has.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ec {

constexpr int kRows = 64;  // query rows per block
constexpr int kKeys = 96;  // keys per tile: one tile of scores is kRows x kKeys floats (24 KB)
// (64 x 96 measured 9% faster than 32 x 64 at S=4096, w=256 on Zen 3: fewer per-tile softmax steps.)

// Leading dimension of a transposed (D, S) key matrix. Past S there is room for one more tile, so every
// run of consecutive keys is read in place, and rows do not all fall into the same cache sets when S is a
// power of two.
inline int64_t transposed_stride(int64_t s) { return (s + 15) / 16 * 16 + 80; }

// n floats in storage, from a 64-byte boundary: vector loads of a row of transposed keys then never straddle
// two cache lines (malloc aligns to 16 bytes; a split load costs two, and the score loop is made of them).
// Called by the op files only (not per instruction set).
inline float* aligned_floats(std::vector<float>& storage, int64_t n) {
  storage.resize(n + 16);
  const auto address = reinterpret_cast<uintptr_t>(storage.data());
  return storage.data() + (64 - address % 64) % 64 / sizeof(float);
}

// WindowedAttention, one call. Items: per (batch, head), row_blocks band blocks then blocks of global rows.
struct Windowed {
  const float* q;
  const float* k;
  const float* v;
  float* y;
  int64_t heads, s, d;
  int32_t window;  // clamped to S, so position arithmetic stays in int32
  bool causal;
  int rows_per_block;  // query rows per band block: narrow windows use smaller blocks (less wasted span)
  int64_t row_blocks;  // band blocks per head
  int64_t items_per_head;  // band blocks, then blocks of global query rows
  std::vector<uint8_t> real;  // (B, S): a real token (attendable key)
  std::vector<uint8_t> glob;  // (B, S): a global position that is also real
  std::vector<int32_t> real_prefix;  // (B, S + 1): real keys before each position
  std::vector<std::vector<int32_t>> globals;  // per batch row: the global positions, ascending
  std::vector<float> kt_storage;
  float* kt = nullptr;  // (B, H, D, ldk): K transposed, in kt_storage, 64-byte aligned (see aligned_floats)
};

// BlockSparseAttention, one call. Items: per (batch, head, query block), pieces of at most kRows rows.
struct BlockSparse {
  const float* q;
  const float* k;
  const float* v;
  float* y;
  int64_t heads, s, d, block_size, blocks;
  int64_t pieces;
  std::vector<std::vector<int32_t>> keys;  // (B · nb): the real key positions query block bi may see
  std::vector<float> kt_storage;
  float* kt = nullptr;  // (B, H, D, ldk): K transposed, in kt_storage, 64-byte aligned (see aligned_floats)
};

// LSHAttention, one call. Items: one per (batch, head), every round.
struct Lsh {
  const float* qk;
  const float* v;
  float* y;
  const float* rot;  // (rounds, D, half): half = buckets / 2
  const uint8_t* real;  // (B, S), or nullptr: every token real
  int64_t heads, s, d, rounds, half, chunk;
  bool causal;
  int32_t* ints;  // scratch: lsh_ints(job) per item
  float* floats;  // scratch: lsh_floats(job) per item
};

inline int64_t lsh_ints(const Lsh& job) { return 2 * job.s + 2 * job.half + 2; }
inline int64_t lsh_floats(const Lsh& job) {
  return job.half + 2 * job.s + 3 * job.s * job.d + job.chunk * (2 * job.chunk + job.d + 1);
}

struct Kernels {
  const char* isa;
  void (*transpose)(const float* k, int64_t s, int64_t d, float* kt);  // one head: (S, D) -> (D, ldk)
  void (*windowed)(const Windowed& job, int64_t item);
  void (*block_sparse)(const BlockSparse& job, int64_t item);
  void (*lsh)(const Lsh& job, int64_t item);
};

// The kernels for this CPU (chosen once): the best set it runs, or the one $EDGE_COMPRESS_KERNELS names.
const Kernels& kernels();

// The kernel set called `name` ("sse2", "avx2", "avx512"; "neon"), or nullptr with the reason in *why when
// this build has no such set or this CPU cannot run it.
const Kernels* named_kernels(const char* name, std::string* why);

}  // namespace ec
