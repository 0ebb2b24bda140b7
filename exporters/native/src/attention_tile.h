// The shared inner loop of both attention ops: a block of up to kRows query rows takes key tiles of up to
// kKeys keys, with an online softmax (running max per row, the accumulator rescaled when it grows), so no
// row ever holds more than one tile of scores (Milakov & Gimelshein 2018, "Online normalizer calculation
// for softmax"; the tiling of FlashAttention, Dao et al. 2022).
//
// The hot loops use 8-float vector values (GCC vector extensions, not intrinsics), the rest are plain loops
// over contiguous arrays with compile-time widths that -O3 vectorises. kernels.cc includes this file once
// per instruction set, each time in its own namespace EC_ISA (see dispatch.cc).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "kernels.h"

#ifndef EC_ISA
#error "compile with -DEC_ISA=<instruction set name>: this header is instantiated once per instruction set"
#endif
#define EC_INLINE inline __attribute__((always_inline))

namespace ec {
namespace EC_ISA {  // every definition below differs per instruction set: keep them apart for the linker
namespace {  // and local to kernels.cc: nothing here may become a weak symbol another ISA's copy could replace


// exp(x) for x <= 0, branch-free so it vectorises: 2^n · e^r with |r| <= ln2/2 and a degree-6 Taylor
// polynomial (relative error about 2e-7). Below -87 (where expf is subnormal) it returns exactly 0, which
// also makes exp(-inf) = 0 for masked scores.
EC_INLINE float exp_nonpositive(float x) {
  const float clamped = x < -87.0f ? -87.0f : x;
  const float t = clamped * 1.44269504088896341f;  // x / ln 2
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest: adding 1.5 * 2^23 drops the fraction
  const float r = (clamped - n * 0.693145751953125f) - n * 1.428606765330187e-06f;  // ln 2 split hi + lo
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 0]
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.0f ? 0.0f : p * scale;
}

// Eight floats as one value, kept in registers. With AVX it is one native vector; otherwise (SSE2, NEON)
// two 4-float ones: GCC would spill a 32-byte vector type through memory on 16-byte-vector targets.
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x4 __attribute__((vector_size(16)));

// exp_nonpositive on every lane of a GCC vector V (int lanes I), in vector instructions. Written out
// because GCC leaves the scalar version's loop scalar on AVX2 and NEON (the float -> int conversion and
// the select), and the softmax step then costs about a third of the kernel's time.
template <typename V, typename I>
EC_INLINE V exp_nonpositive_lanes(V x) {
  const I tiny = x < -87.0f;  // all ones where the result is 0
  const V clamped = tiny ? V{} - 87.0f : x;
  const V t = clamped * 1.44269504088896341f;
  const V n = (t + 12582912.0f) - 12582912.0f;
  const V r = (clamped - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  V p = V{} + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const I bits = (__builtin_convertvector(n, I) + 127) << 23;
  return tiny ? V{} : p * (V)bits;  // a cast between vectors of one size keeps the bits
}

#if defined(__AVX__)
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
EC_INLINE f32x8 max8(f32x8 a, f32x8 b) { return a > b ? a : b; }
EC_INLINE f32x8 exp8(f32x8 x) { return exp_nonpositive_lanes<f32x8, i32x8>(x); }
EC_INLINE f32x8 splat8(float a) { return f32x8{} + a; }
#else
struct f32x8 {
  f32x4 lo, hi;
};
EC_INLINE f32x8 operator*(float a, const f32x8& v) { return f32x8{a * v.lo, a * v.hi}; }
EC_INLINE f32x8 operator-(const f32x8& a, const f32x8& b) { return f32x8{a.lo - b.lo, a.hi - b.hi}; }
EC_INLINE f32x8 max8(const f32x8& a, const f32x8& b) {
  return f32x8{a.lo > b.lo ? a.lo : b.lo, a.hi > b.hi ? a.hi : b.hi};
}
EC_INLINE f32x8& operator+=(f32x8& x, const f32x8& y) {
  x.lo += y.lo;
  x.hi += y.hi;
  return x;
}
EC_INLINE f32x8 exp8(const f32x8& x) {
  return f32x8{exp_nonpositive_lanes<f32x4, i32x4>(x.lo), exp_nonpositive_lanes<f32x4, i32x4>(x.hi)};
}
EC_INLINE f32x8 splat8(float a) { return f32x8{f32x4{} + a, f32x4{} + a}; }
#endif

EC_INLINE f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

EC_INLINE void store8(float* p, const f32x8& v) { std::memcpy(p, &v, sizeof v); }

// Register blocking of the two products, per instruction set. An FMA takes 4 cycles and two issue per
// cycle, so each loop keeps at least 8 independent accumulators, and more where the registers allow
// (f32x8 values: AVX-512 32, AVX2 16, NEON 32 / 2, SSE2 16 / 2 registers). A tile of kKeys need not be a
// multiple of kScoreKeys: the rest is scored by a narrower pass.
#if defined(__AVX512F__)
constexpr int kScoreRows = 2;  // query rows per pass over D in scores: 2 x 64 keys = 16 accumulators
constexpr int kScoreKeys = 64;
constexpr int kValueCols = 64;  // columns of D per pass in accumulate: 2 rows x 64 = 16 accumulators
constexpr int kAccRows = 2;     // query rows per pass in accumulate
#elif defined(__AVX__)
// 12 accumulators in both (measured on Zen 3 at S=4096, against 8: accumulate 9% faster, scores 3%).
constexpr int kScoreRows = 2;  // 2 x 48 keys: 6 key loads and 2 broadcasts feed 12 FMAs
constexpr int kScoreKeys = 48;
constexpr int kValueCols = 32;  // 3 rows x 32: 4 V loads and 3 broadcasts feed 12 FMAs
constexpr int kAccRows = 3;
#elif defined(__aarch64__)
constexpr int kScoreRows = 1;  // 64 keys = 8 accumulators (16 of the 32 128-bit registers)
constexpr int kScoreKeys = 64;
constexpr int kValueCols = 32;  // 2 rows x 32 = 8 accumulators
constexpr int kAccRows = 2;
#else
constexpr int kScoreRows = 1;  // SSE2: 32 keys = 8 registers
constexpr int kScoreKeys = 32;
constexpr int kValueCols = 16;  // 2 rows x 16 = 8 registers
constexpr int kAccRows = 2;
#endif
// Rows past the block that scores and accumulate read: zero queries, zero probabilities.
constexpr int kPadRows = (kAccRows > kScoreRows ? kAccRows : kScoreRows) - 1;

// One (batch, head) slice: rows of d floats at q, v, y; kt: its keys transposed, (D, ldk).
struct Head {
  const float* q;
  const float* v;
  float* y;
  int64_t d;
  const float* kt;
  int64_t ldk;
};

// kt (D, ldk) = k (S, D) transposed, in 64 x 64 tiles.
inline void transpose_keys(const float* __restrict k, int64_t s, int64_t d, float* __restrict kt, int64_t ldk) {
  for (int64_t j0 = 0; j0 < s; j0 += 64) {
    const int64_t j1 = std::min(s, j0 + 64);
    for (int64_t i0 = 0; i0 < d; i0 += 64) {
      const int64_t i1 = std::min(d, i0 + 64);
      for (int64_t j = j0; j < j1; ++j) {
        for (int64_t i = i0; i < i1; ++i) {
          kt[i * ldk + j] = k[j * d + i];
        }
      }
    }
  }
}

// n floats, zeroed, from a 64-byte boundary, so that vector loads and stores never straddle cache lines.
class Floats {
 public:
  explicit Floats(int64_t n)
      : mem_(new float[n + 16]), p_(mem_.get() + (64 - reinterpret_cast<uintptr_t>(mem_.get()) % 64) % 64 / 4) {}
  float* data() { return p_; }
  const float* data() const { return p_; }
  float* begin() { return p_; }

 private:
  std::unique_ptr<float[]> mem_;
  float* p_;
};

// Online-softmax accumulator for a block of query rows against a stream of key tiles.
class RowBlock {
 public:
  explicit RowBlock(int64_t d)
      : d_(d), q_((kRows + kPadRows) * d), s_((kRows + kPadRows) * kKeys), acc_((kRows + kPadRows) * d), m_(kRows), l_(kRows) {}

  // Starts a block: query rows at positions rows[0..n), pre-scaled by 1/sqrt(D).
  EC_INLINE void start(const Head& h, const int32_t* rows, int n) {
    n_ = n;
    const float scale = 1.0f / std::sqrt(static_cast<float>(d_));
    for (int r = 0; r < n; ++r) {
      const float* src = h.q + rows[r] * d_;
      float* dst = q_.data() + r * d_;
      for (int64_t i = 0; i < d_; ++i) {
        dst[i] = src[i] * scale;
      }
      m_[r] = -std::numeric_limits<float>::infinity();
      l_[r] = 0.0f;
    }
    // scores() takes rows in groups of kScoreRows and accumulate() in groups of kAccRows: the rows past n
    // are padding, zero queries (zero scores) and zero probabilities (the softmax skips them), never stored.
    std::fill(acc_.begin(), acc_.begin() + (n + kPadRows) * d_, 0.0f);
    std::fill(skip_ + n, skip_ + n + kPadRows, true);
    std::fill(s_.begin() + n * kKeys, s_.begin() + (n + kPadRows) * kKeys, 0.0f);
    std::fill(q_.begin() + n * d_, q_.begin() + (n + kPadRows) * d_, 0.0f);
  }

  // Adds the keys at positions idx[0..nk) (nk <= kKeys). Which keys row r may see: with allow (n x kKeys
  // bytes), key c when allow[r * kKeys + c] != 0; else with span (n pairs), keys c in [span[2r], span[2r+1])
  // (a band: no per-key mask to build); else every key of the tile.
  EC_INLINE void add(const Head& h, const int32_t* idx, int nk, const uint8_t* allow, const int32_t* span = nullptr) {
    const int64_t d = d_;
    // Keys transposed, (D, kKeys) with leading dimension ldk, so that scores vectorise over keys: a run of
    // consecutive positions is read in place from the head's transposed keys, other tiles are gathered.
    const float* kt = h.kt + idx[0];
    int64_t ldk = h.ldk;
    if (idx[nk - 1] - idx[0] != nk - 1 || idx[0] + kKeys > h.ldk) {
      if (!kt_) {
        kt_.reset(new float[kKeys * d]());  // the first gathered tile of this block (a band needs none)
      }
      float* __restrict packed = kt_.get();
      for (int64_t i = 0; i < d; ++i) {
        const float* src = h.kt + i * h.ldk;
        for (int c = 0; c < nk; ++c) {
          packed[i * kKeys + c] = src[idx[c]];
        }
      }
      kt = packed;
      ldk = kKeys;
    }
    const int width = (nk + 7) / 8 * 8;  // a short tile costs its own width, rounded up to 8 keys
    for (int r = 0; r < n_; r += kScoreRows) {
      const float* qr = q_.data() + r * d;
      float* sr = s_.data() + r * kKeys;
      int c = 0;
      for (; c + kScoreKeys <= width; c += kScoreKeys) {
        scores<kScoreKeys / 8>(qr, kt + c, ldk, sr + c);
      }
      if (c < width) {
        scores_tail((width - c) / 8, qr, kt + c, ldk, sr + c);
      }
    }
    // The softmax step works on whole 8-key groups up to `width` (keys past nk are masked) and keeps 8
    // partial maxima and sums, so that every loop vectorises (a float reduction in one variable would
    // not: it must keep its order).
    const float neg_inf = -std::numeric_limits<float>::infinity();
    for (int r = 0; r < n_; ++r) {
      float* __restrict s = s_.data() + r * kKeys;
      if (allow != nullptr) {
        const uint8_t* a = allow + r * kKeys;
        for (int c = 0; c < width; ++c) {
          s[c] = (c < nk) & (a[c] != 0) ? s[c] : neg_inf;  // no short circuit: the loop vectorises
        }
      } else if (span != nullptr) {
        const int from = std::max(0, std::min(span[2 * r], width));
        const int to = std::max(from, std::min(span[2 * r + 1], nk));
        std::fill(s, s + from, neg_inf);
        std::fill(s + to, s + width, neg_inf);
      } else {
        for (int c = nk; c < width; ++c) {
          s[c] = neg_inf;
        }
      }
      f32x8 running = load8(s);
      for (int c = 8; c < width; c += 8) {
        running = max8(running, load8(s + c));
      }
      float lane_max[8];
      store8(lane_max, running);
      float tile_max = lane_max[0];
      for (int j = 1; j < 8; ++j) {
        tile_max = lane_max[j] > tile_max ? lane_max[j] : tile_max;
      }
      if (tile_max == neg_inf) {
        skip_[r] = true;  // no key of this tile is allowed for this row
        std::fill(s, s + width, 0.0f);
        continue;
      }
      skip_[r] = false;
      if (tile_max > m_[r]) {  // rescale what was accumulated under the smaller max
        const float alpha = exp_nonpositive(m_[r] - tile_max);
        float* __restrict acc = acc_.data() + r * d;
        for (int64_t i = 0; i < d; ++i) {
          acc[i] *= alpha;
        }
        l_[r] *= alpha;
        m_[r] = tile_max;
      }
      const f32x8 m = splat8(m_[r]);
      f32x8 sum = splat8(0.0f);
      for (int c = 0; c < width; c += 8) {
        const f32x8 e = exp8(load8(s + c) - m);
        store8(s + c, e);
        sum += e;
      }
      float lane_sum[8];
      store8(lane_sum, sum);
      l_[r] += ((lane_sum[0] + lane_sum[1]) + (lane_sum[2] + lane_sum[3])) +
               ((lane_sum[4] + lane_sum[5]) + (lane_sum[6] + lane_sum[7]));
    }
    // Values: a run of consecutive positions (the band) is addressed from its first row, other tiles
    // through idx.
    const bool run = idx[nk - 1] - idx[0] == nk - 1;
    for (int r = 0; r < n_; r += kAccRows) {  // a skipped row's probabilities are zeros
      if (std::all_of(skip_ + r, skip_ + r + kAccRows, [](bool b) { return b; })) {
        continue;
      }
      int lo = 0;
      int hi = nk;
      if (allow != nullptr || span != nullptr) {  // only the keys from the first to the last one a row sees
        const float* p = s_.data() + r * kKeys;
        const auto seen = [p](int c) {
          bool any = false;
          for (int j = 0; j < kAccRows; ++j) {
            any |= p[j * kKeys + c] != 0.0f;
          }
          return any;
        };
        while (lo < hi && !seen(lo)) {
          ++lo;
        }
        while (hi > lo && !seen(hi - 1)) {
          --hi;
        }
      }
      if (run) {
        accumulate<true>(h, idx, lo, hi, r);
      } else {
        accumulate<false>(h, idx, lo, hi, r);
      }
    }
  }

  // Writes Y for every row whose skip_row flag is 0 (skip_row may be nullptr): acc / l, or 0 when the row
  // had no allowed key.
  EC_INLINE void store(const Head& h, const int32_t* rows, const uint8_t* skip_row) const {
    for (int r = 0; r < n_; ++r) {
      if (skip_row != nullptr && skip_row[r]) {
        continue;
      }
      float* __restrict dst = h.y + rows[r] * d_;
      const float* acc = acc_.data() + r * d_;
      const float inv = l_[r] > 0.0f ? 1.0f / l_[r] : 0.0f;
      for (int64_t i = 0; i < d_; ++i) {
        dst[i] = acc[i] * inv;
      }
    }
  }

 private:
  // The scores of the last keys of a tile: fewer than kScoreKeys, `vecs` groups of 8.
  template <int kVecs = kScoreKeys / 8 - 1>
  EC_INLINE void scores_tail(int vecs, const float* __restrict q, const float* __restrict kt, int64_t ldk,
                             float* __restrict s) const {
    if (vecs == kVecs) {
      scores<kVecs>(q, kt, ldk, s);
    } else if constexpr (kVecs > 1) {
      scores_tail<kVecs - 1>(vecs, q, kt, ldk, s);
    }
  }

  // s[r][0..8 kVecs) = q[r] · kt[:, c] for kScoreRows rows, in registers across D. The keys past the
  // tile (up to the next multiple of 8) read finite keys or padding and are never used.
  template <int kVecs>
  EC_INLINE void scores(const float* __restrict q, const float* __restrict kt, int64_t ldk,
                        float* __restrict s) const {
    f32x8 t[kScoreRows][kVecs] = {};
    for (int64_t i = 0; i < d_; ++i) {
      const float* row = kt + i * ldk;
      f32x8 k[kVecs];
#pragma GCC unroll 8
      for (int c = 0; c < kVecs; ++c) {
        k[c] = load8(row + 8 * c);
      }
#pragma GCC unroll 2
      for (int r = 0; r < kScoreRows; ++r) {
        const float a = q[r * d_ + i];
#pragma GCC unroll 8
        for (int c = 0; c < kVecs; ++c) {
          t[r][c] += a * k[c];
        }
      }
    }
#pragma GCC unroll 2
    for (int r = 0; r < kScoreRows; ++r) {
#pragma GCC unroll 8
      for (int c = 0; c < kVecs; ++c) {
        store8(s + r * kKeys + 8 * c, t[r][c]);
      }
    }
  }

  // acc[r] += sum_c p[r][c] · V[idx[c]] over keys c in [lo, hi), for the kAccRows rows from r0 (the last
  // ones may be zero padding rows): kValueCols columns of D at a time in registers across the keys, each V
  // load feeding every row. kRun: idx holds consecutive positions, so V rows are addressed from the first.
  template <bool kRun>
  EC_INLINE void accumulate(const Head& h, const int32_t* idx, int lo, int hi, int r0) {
    constexpr int kVecs = kValueCols / 8;
    const int64_t d = d_;
    const float* p = s_.data() + r0 * kKeys;
    float* acc = acc_.data() + r0 * d;
    const float* vrun = h.v + idx[0] * d;
    int64_t i = 0;
    for (; i + kValueCols <= d; i += kValueCols) {
      f32x8 a[kAccRows][kVecs];
#pragma GCC unroll 3
      for (int r = 0; r < kAccRows; ++r) {
#pragma GCC unroll 8
        for (int j = 0; j < kVecs; ++j) {
          a[r][j] = load8(acc + r * d + i + 8 * j);
        }
      }
      for (int c = lo; c < hi; ++c) {
        const float* v = (kRun ? vrun + c * d : h.v + idx[c] * d) + i;
        f32x8 vj[kVecs];
#pragma GCC unroll 8
        for (int j = 0; j < kVecs; ++j) {
          vj[j] = load8(v + 8 * j);
        }
#pragma GCC unroll 3
        for (int r = 0; r < kAccRows; ++r) {
          const float x = p[r * kKeys + c];
#pragma GCC unroll 8
          for (int j = 0; j < kVecs; ++j) {
            a[r][j] += x * vj[j];
          }
        }
      }
#pragma GCC unroll 3
      for (int r = 0; r < kAccRows; ++r) {
#pragma GCC unroll 8
        for (int j = 0; j < kVecs; ++j) {
          store8(acc + r * d + i + 8 * j, a[r][j]);
        }
      }
    }
    if (i < d) {  // the columns past the last full block, key by key
      for (int c = lo; c < hi; ++c) {
        const float* v = h.v + idx[c] * d;
        for (int r = 0; r < kAccRows; ++r) {
          const float x = p[r * kKeys + c];
          for (int64_t j = i; j < d; ++j) {
            acc[r * d + j] += x * v[j];
          }
        }
      }
    }
  }

  int64_t d_;
  int n_ = 0;
  Floats q_;    // (kRows, D) scaled queries
  std::unique_ptr<float[]> kt_;  // (D, kKeys) transposed key tile, gathered
  Floats s_;    // (kRows + kPadRows, kKeys) scores, then probabilities (padding rows)
  Floats acc_;  // (kRows + kPadRows, D) unnormalised outputs (padding rows)
  std::vector<float> m_;    // running max per row
  std::vector<float> l_;    // running sum of exp per row
  bool skip_[kRows + kPadRows] = {};
};

}  // namespace
}  // namespace EC_ISA
}  // namespace ec
