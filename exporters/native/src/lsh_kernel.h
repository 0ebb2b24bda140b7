// The compute of LSHAttention for one (batch, head): hash, sort, attend within chunks, combine the rounds.
// Included by kernels.cc once per instruction set (inside namespace EC_ISA); its loops run over contiguous
// arrays with the vector dimension innermost, which -O3 vectorises for the set being compiled.
//
// Per round r: bucket_j = first argmax of [x_j R_r, -x_j R_r] (padding: the last bucket); a counting sort
// by bucket keeps positions ascending within a bucket, which is the (bucket, position) order. In the
// sorted order, the queries of chunk c see the keys of chunks c - 1 and c (chunk 0: its own), a
// contiguous range. Round results are merged as they come, by a running log-sum-exp per position.
#pragma once

#include <cmath>
#include <limits>

constexpr float kLshSelf = -1e5f;  // a position's score for itself (compress.models.lsh.SELF)
constexpr float kLshMasked = -1e9f;  // a key it may not see (the ops' NEG)

// Views of one item's scratch memory (Lsh::ints and Lsh::floats, lsh_ints / lsh_floats per item): no
// std::vector here, whose inline members would be shared between the instruction sets' copies.
struct LshScratch {
  int32_t *bucket, *order, *start;  // S, S, K + 2
  float *proj, *inv_norm, *qs, *kt, *vs, *scores, *out, *total;  // K/2, S, S·D, D·S, S·D, 2·chunk, D, S
  LshScratch(const Lsh& job, int64_t item) {
    const int64_t n = job.s, d = job.d;
    bucket = job.ints + item * lsh_ints(job);
    order = bucket + n;
    start = order + n;
    proj = job.floats + item * lsh_floats(job);
    inv_norm = proj + job.half;
    qs = inv_norm + n;
    kt = qs + n * d;
    vs = kt + d * n;
    scores = vs + n * d;
    out = scores + 2 * job.chunk;
    total = out + d;
  }
};

// Buckets of one round into s.bucket, then the sorted order into s.order.
EC_INLINE void lsh_sort(const Lsh& job, const float* x, const uint8_t* real, const float* rot, LshScratch& s) {
  const int64_t n = job.s, d = job.d, half = job.half;
  float* proj = s.proj;
  for (int64_t j = 0; j < n; ++j) {
    if (real != nullptr && real[j] == 0) {
      s.bucket[j] = static_cast<int32_t>(2 * half);
      continue;
    }
    for (int64_t k = 0; k < half; ++k) {
      proj[k] = 0.0f;
    }
    for (int64_t e = 0; e < d; ++e) {
      const float xv = x[j * d + e];
      const float* row = rot + e * half;
      for (int64_t k = 0; k < half; ++k) {
        proj[k] += xv * row[k];
      }
    }
    int32_t best = 0;
    float top = proj[0];
    for (int64_t k = 1; k < 2 * half; ++k) {  // [x R, -x R]: the first maximum wins, as in torch.argmax
      const float value = k < half ? proj[k] : -proj[k - half];
      if (value > top) {
        top = value;
        best = static_cast<int32_t>(k);
      }
    }
    s.bucket[j] = best;
  }
  for (int64_t k = 0; k < 2 * half + 2; ++k) {
    s.start[k] = 0;
  }
  for (int64_t j = 0; j < n; ++j) {
    ++s.start[s.bucket[j] + 1];
  }
  for (int64_t k = 1; k < 2 * half + 2; ++k) {
    s.start[k] += s.start[k - 1];
  }
  for (int64_t j = 0; j < n; ++j) {
    s.order[s.start[s.bucket[j]]++] = static_cast<int32_t>(j);
  }
}

// One query slot t of the sorted order against its chunk's keys: out (D) and its log-sum-exp.
EC_INLINE float lsh_row(const Lsh& job, const uint8_t* real, int64_t t, LshScratch& s) {
  const int64_t n = job.s, d = job.d, c = job.chunk;
  const int64_t chunk = t / c;
  const int64_t lo = chunk > 0 ? (chunk - 1) * c : 0;
  const int64_t nk = (chunk + 1) * c - lo;
  float* sc = s.scores;
  for (int64_t a = 0; a < nk; ++a) {
    sc[a] = 0.0f;
  }
  const float* q = s.qs + t * d;
  for (int64_t e = 0; e < d; ++e) {
    const float qv = q[e];
    const float* keys = s.kt + e * n + lo;
    for (int64_t a = 0; a < nk; ++a) {
      sc[a] += qv * keys[a];
    }
  }
  const int32_t i = s.order[t];
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t a = 0; a < nk; ++a) {
    const int32_t j = s.order[lo + a];
    const bool allowed = (real == nullptr || real[j] != 0) && (!job.causal || j <= i);
    sc[a] = !allowed ? kLshMasked : (j == i ? kLshSelf : sc[a]);
    top = std::max(top, sc[a]);
  }
  float sum = 0.0f;
  for (int64_t a = 0; a < nk; ++a) {
    sc[a] = std::exp(sc[a] - top);
    sum += sc[a];
  }
  float* out = s.out;
  for (int64_t e = 0; e < d; ++e) {
    out[e] = 0.0f;
  }
  const float inv = 1.0f / sum;
  for (int64_t a = 0; a < nk; ++a) {
    const float p = sc[a] * inv;
    const float* value = s.vs + (lo + a) * d;
    for (int64_t e = 0; e < d; ++e) {
      out[e] += p * value[e];
    }
  }
  return top + std::log(sum);
}

void lsh_item(const Lsh& job, int64_t item) {
  const int64_t n = job.s, d = job.d;
  const float* x = job.qk + item * n * d;
  const float* v = job.v + item * n * d;
  float* y = job.y + item * n * d;
  const uint8_t* real = job.real == nullptr ? nullptr : job.real + item / job.heads * n;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  LshScratch s(job, item);
  for (int64_t j = 0; j < n; ++j) {
    s.total[j] = -std::numeric_limits<float>::infinity();
  }
  for (int64_t j = 0; j < n; ++j) {
    float sq = 0.0f;
    for (int64_t e = 0; e < d; ++e) {
      sq += x[j * d + e] * x[j * d + e];
    }
    s.inv_norm[j] = 1.0f / std::max(std::sqrt(sq), 1e-6f);
  }
  for (int64_t e = 0; e < n * d; ++e) {
    y[e] = 0.0f;
  }
  for (int64_t r = 0; r < job.rounds; ++r) {
    lsh_sort(job, x, real, job.rot + r * d * job.half, s);
    for (int64_t t = 0; t < n; ++t) {
      const int64_t j = s.order[t];
      for (int64_t e = 0; e < d; ++e) {
        s.qs[t * d + e] = x[j * d + e] * scale;
        s.kt[e * n + t] = x[j * d + e] * s.inv_norm[j];
        s.vs[t * d + e] = v[j * d + e];
      }
    }
    for (int64_t t = 0; t < n; ++t) {
      const float lse = lsh_row(job, real, t, s);
      const int64_t i = s.order[t];
      const float before = s.total[i];
      const float top = std::max(before, lse);
      const float keep = std::exp(before - top), add = std::exp(lse - top);  // exp(-inf) = 0 in round 0
      const float inv = 1.0f / (keep + add);
      for (int64_t e = 0; e < d; ++e) {
        y[i * d + e] = (y[i * d + e] * keep + s.out[e] * add) * inv;
      }
      s.total[i] = top + std::log(keep + add);
    }
  }
}
