// The compute kernels of both ops, compiled once per instruction set: -DEC_ISA=<name> names the namespace
// and the dispatch table (see dispatch.cc and build.py).
#include <algorithm>

#include "attention_tile.h"
#include "kernels.h"

namespace ec {
namespace EC_ISA {
namespace {

// WindowedAttention: query i may attend key j iff key j is real, j <= i when causal, and |i - j| <= window
// or j is global or i is global.
EC_INLINE void band_allow(const Windowed& w, int64_t b, const int32_t* rows, int n, const int32_t* idx, int nk,
                          uint8_t* allow) {
  const uint8_t* real = w.real.data() + b * w.s;
  const uint8_t* glob = w.glob.data() + b * w.s;
  uint8_t key_real[kKeys];
  uint8_t key_glob[kKeys];
  for (int c = 0; c < nk; ++c) {
    key_real[c] = real[idx[c]];
    key_glob[c] = glob[idx[c]];
  }
  const int32_t window = w.window;
  const bool causal = w.causal;
  for (int r = 0; r < n; ++r) {
    const int32_t i = rows[r];
    const uint8_t query_glob = glob[i];
    uint8_t* a = allow + r * kKeys;
    for (int c = 0; c < nk; ++c) {
      const int32_t j = idx[c];
      const int32_t dist = i > j ? i - j : j - i;
      const uint8_t near = dist <= window;
      const uint8_t order = !causal || j <= i;
      a[c] = key_real[c] & (query_glob | key_glob[c] | near) & order;
    }
  }
}

// Whether any of the nk positions from a is a global token.
EC_INLINE bool any_global(const uint8_t* glob, int32_t a, int nk) {
  uint8_t any = 0;
  for (int c = 0; c < nk; ++c) {
    any |= glob[a + c];
  }
  return any != 0;
}

void windowed_item(const Windowed& w, int64_t item) {
  const int64_t bh = item / w.items_per_head;
  const int64_t blk = item % w.items_per_head;
  const int64_t b = bh / w.heads;
  const int64_t offset = bh * w.s * w.d;
  const int64_t ldk = transposed_stride(w.s);
  const Head h{w.q + offset, w.v + offset, w.y + offset, w.d, w.kt + bh * w.d * ldk, ldk};
  const int32_t* prefix = w.real_prefix.data() + b * (w.s + 1);
  const std::vector<int32_t>& globals = w.globals[b];
  const int32_t s = static_cast<int32_t>(w.s);
  const int32_t window = w.window;
  RowBlock block(w.d);
  int32_t rows[kRows];
  int32_t idx[kKeys];
  uint8_t allow[kRows * kKeys];
  int32_t span[2 * kRows];
  const uint8_t* glob = w.glob.data() + b * w.s;

  if (blk < w.row_blocks) {
    // A band block: rows [i0, i1) see keys [lo, hi) through the window, plus the global keys outside it.
    const int32_t i0 = static_cast<int32_t>(blk * w.rows_per_block);
    const int32_t i1 = std::min(s, i0 + w.rows_per_block);
    const int n = i1 - i0;
    for (int r = 0; r < n; ++r) {
      rows[r] = i0 + r;
    }
    const int32_t lo = std::max(0, i0 - window);
    const int32_t hi = w.causal ? i1 : std::min(s, i1 + window);
    block.start(h, rows, n);
    for (int32_t a = lo; a < hi; a += kKeys) {
      const int nk = std::min(kKeys, hi - a);
      for (int c = 0; c < nk; ++c) {
        idx[c] = a + c;
      }
      const bool all_real = prefix[a + nk] - prefix[a] == nk;
      const bool in_band = a >= i1 - 1 - window && a + nk - 1 <= (w.causal ? i0 : i0 + window);
      if (all_real && in_band) {
        block.add(h, idx, nk, nullptr);  // the middle of the band: every row sees every key
      } else if (all_real && !any_global(glob, a, nk)) {
        // An edge of the band: row i sees keys [i - window, i + window] (i when causal), a range per row.
        for (int r = 0; r < n; ++r) {
          const int32_t i = i0 + r;
          span[2 * r] = i - window - a;
          span[2 * r + 1] = (w.causal ? i : i + window) + 1 - a;
        }
        block.add(h, idx, nk, nullptr, span);
      } else {
        band_allow(w, b, rows, n, idx, nk, allow);
        block.add(h, idx, nk, allow);
      }
    }
    int nk = 0;
    for (const int32_t j : globals) {
      if (w.causal && j >= i1) {
        break;  // ascending: no later global key precedes any row of the block
      }
      if (j >= lo && j < hi) {
        continue;  // already scored in the band
      }
      idx[nk++] = j;
      if (nk == kKeys) {
        band_allow(w, b, rows, n, idx, nk, allow);
        block.add(h, idx, nk, allow);
        nk = 0;
      }
    }
    if (nk > 0) {
      band_allow(w, b, rows, n, idx, nk, allow);
      block.add(h, idx, nk, allow);
    }
    block.store(h, rows, glob + i0);  // global rows are written by their own blocks
    return;
  }

  // A block of global query rows: each sees every real key (before it, when causal). O(G·S) in all.
  const int64_t first = (blk - w.row_blocks) * kRows;
  if (first >= static_cast<int64_t>(globals.size())) {
    return;
  }
  const int n = static_cast<int>(std::min<int64_t>(kRows, static_cast<int64_t>(globals.size()) - first));
  std::copy(globals.begin() + first, globals.begin() + first + n, rows);
  const int32_t hi = w.causal ? rows[n - 1] + 1 : s;
  block.start(h, rows, n);
  for (int32_t a = 0; a < hi; a += kKeys) {
    const int nk = std::min(kKeys, hi - a);
    for (int c = 0; c < nk; ++c) {
      idx[c] = a + c;
    }
    const bool all_real = prefix[a + nk] - prefix[a] == nk;
    if (all_real && (!w.causal || a + nk - 1 <= rows[0])) {
      block.add(h, idx, nk, nullptr);
    } else {
      band_allow(w, b, rows, n, idx, nk, allow);
      block.add(h, idx, nk, allow);
    }
  }
  block.store(h, rows, nullptr);
}

// BlockSparseAttention: a query block sees the precomputed list of real keys of its allowed key blocks.
void block_sparse_item(const BlockSparse& w, int64_t item) {
  const int64_t per_head = w.blocks * w.pieces;
  const int64_t bh = item / per_head;
  const int64_t bi = item % per_head / w.pieces;
  const int64_t piece = item % w.pieces;
  const int64_t b = bh / w.heads;
  const int64_t offset = bh * w.s * w.d;
  const int64_t ldk = transposed_stride(w.s);
  const Head h{w.q + offset, w.v + offset, w.y + offset, w.d, w.kt + bh * w.d * ldk, ldk};
  const int64_t first = bi * w.block_size + piece * kRows;
  const int n = static_cast<int>(std::min<int64_t>(kRows, (bi + 1) * w.block_size - first));
  int32_t rows[kRows];
  for (int r = 0; r < n; ++r) {
    rows[r] = static_cast<int32_t>(first + r);
  }
  const std::vector<int32_t>& keys = w.keys[b * w.blocks + bi];
  RowBlock block(w.d);
  block.start(h, rows, n);
  for (size_t a = 0; a < keys.size(); a += kKeys) {
    // The key list holds only allowed keys, shared by every row of the block: no per-pair mask.
    block.add(h, keys.data() + a, static_cast<int>(std::min<size_t>(kKeys, keys.size() - a)), nullptr);
  }
  block.store(h, rows, nullptr);
}

#include "lsh_kernel.h"

void transpose(const float* k, int64_t s, int64_t d, float* kt) { transpose_keys(k, s, d, kt, transposed_stride(s)); }

}  // namespace

#define EC_STRINGIFY2(x) #x
#define EC_STRINGIFY(x) EC_STRINGIFY2(x)
extern const Kernels table = {EC_STRINGIFY(EC_ISA), transpose, windowed_item, block_sparse_item, lsh_item};

}  // namespace EC_ISA
}  // namespace ec
