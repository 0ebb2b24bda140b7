// The compute of LSHAttention for one (batch, head): hash, sort, attend within chunks, combine the rounds.
// Included by kernels.cc once per instruction set (inside namespace EC_ISA); its loops run over contiguous
// arrays with the vector dimension innermost, which -O3 vectorises for the set being compiled.
//
// Per round r: bucket_j = first argmax of [x_j R_r, -x_j R_r] (padding: the last bucket); a counting sort
// by bucket keeps positions ascending within a bucket, which is the (bucket, position) order. In the
// sorted order, the queries of chunk c see the keys of chunks c - 1 and c (chunk 0: its own), a
// contiguous range. Round results are merged as they come, by a running log-sum-exp per position.
#pragma once
// (Standard headers come from attention_tile.h, included first, outside the namespaces.)

constexpr float kLshSelf = -1e5f;  // a position's score for itself (compress.models.lsh.SELF)
constexpr float kLshMasked = -1e9f;  // a key it may not see (the ops' NEG)

// Views of one item's scratch memory (Lsh::ints and Lsh::floats, lsh_ints / lsh_floats per item): no
// std::vector here, whose inline members would be shared between the instruction sets' copies.
struct LshScratch {
  int32_t *bucket, *order, *start;  // S, S, K + 2
  float *proj, *inv_norm, *qs, *kt, *vs;  // K/2, S, S·D, D·S, S·D
  float *scores, *out, *lse, *total;  // chunk·2·chunk, chunk·D, chunk, S
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
    out = scores + 2 * job.chunk * job.chunk;
    lse = out + job.chunk * d;
    total = lse + job.chunk;
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

// Scores of the chunk's queries (sorted slots t0 .. t0 + c) against keys lo .. lo + nk: s.scores, (c, 2c).
// Four query rows share each 8-key vector load of the transposed keys (register blocking).
EC_INLINE void lsh_scores(const Lsh& job, int64_t t0, int64_t lo, int64_t nk, LshScratch& s) {
  const int64_t n = job.s, d = job.d, c = job.chunk, ld = 2 * c;
  const int64_t vec_keys = nk / 8 * 8;
  int64_t r = 0;
  for (; r + 4 <= c; r += 4) {
    const float* q0 = s.qs + (t0 + r) * d;
    for (int64_t a = 0; a < vec_keys; a += 8) {
      f32x8 acc0 = splat8(0.0f), acc1 = acc0, acc2 = acc0, acc3 = acc0;
      for (int64_t e = 0; e < d; ++e) {
        const f32x8 k = load8(s.kt + e * n + lo + a);
        acc0 += q0[e] * k;
        acc1 += q0[d + e] * k;
        acc2 += q0[2 * d + e] * k;
        acc3 += q0[3 * d + e] * k;
      }
      store8(s.scores + r * ld + a, acc0);
      store8(s.scores + (r + 1) * ld + a, acc1);
      store8(s.scores + (r + 2) * ld + a, acc2);
      store8(s.scores + (r + 3) * ld + a, acc3);
    }
  }
  for (int64_t row = 0; row < c; ++row) {  // what the blocks left: keys past the last 8, rows past the last 4
    const int64_t from = row < r ? vec_keys : 0;
    for (int64_t a = from; a < nk; ++a) {
      float dot = 0.0f;
      for (int64_t e = 0; e < d; ++e) {
        dot += s.qs[(t0 + row) * d + e] * s.kt[e * n + lo + a];
      }
      s.scores[row * ld + a] = dot;
    }
  }
}

// Row `row` of the chunk (slot t): masks, the self score, softmax in place; returns its log-sum-exp.
EC_INLINE float lsh_softmax(const Lsh& job, const uint8_t* real, int64_t t, int64_t lo, int64_t nk, float* sc,
                            const LshScratch& s) {
  const int32_t i = s.order[t];
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t a = 0; a < nk; ++a) {
    const int32_t j = s.order[lo + a];
    const bool allowed = (real == nullptr || real[j] != 0) && (!job.causal || j <= i);
    sc[a] = !allowed ? kLshMasked : (j == i ? kLshSelf : sc[a]);
    top = std::max(top, sc[a]);
  }
  // exp in vector lanes (attention_tile.h's exp8; the arguments are <= 0): scalar expf was the kernel's
  // largest cost, one call per score.
  const f32x8 top8 = splat8(top);
  f32x8 sum8 = splat8(0.0f);
  int64_t a = 0;
  for (; a + 8 <= nk; a += 8) {
    const f32x8 e = exp8(load8(sc + a) - top8);
    store8(sc + a, e);
    sum8 += e;
  }
  float lanes[8];
  store8(lanes, sum8);
  float sum = 0.0f;
  for (const float lane : lanes) {
    sum += lane;
  }
  for (; a < nk; ++a) {
    sc[a] = exp_nonpositive(sc[a] - top);
    sum += sc[a];
  }
  const float inv = 1.0f / sum;
  for (int64_t a = 0; a < nk; ++a) {
    sc[a] *= inv;
  }
  return top + std::log(sum);
}

// s.out (c, D) = probabilities (c, nk) x sorted values lo .. lo + nk; four rows share each value load.
EC_INLINE void lsh_values(const Lsh& job, int64_t lo, int64_t nk, LshScratch& s) {
  const int64_t d = job.d, c = job.chunk, ld = 2 * c;
  const int64_t vec_dims = d / 8 * 8;
  int64_t r = 0;
  for (; r + 4 <= c; r += 4) {
    const float* p0 = s.scores + r * ld;
    for (int64_t e = 0; e < vec_dims; e += 8) {
      f32x8 acc0 = splat8(0.0f), acc1 = acc0, acc2 = acc0, acc3 = acc0;
      for (int64_t a = 0; a < nk; ++a) {
        const f32x8 value = load8(s.vs + (lo + a) * d + e);
        acc0 += p0[a] * value;
        acc1 += p0[ld + a] * value;
        acc2 += p0[2 * ld + a] * value;
        acc3 += p0[3 * ld + a] * value;
      }
      store8(s.out + r * d + e, acc0);
      store8(s.out + (r + 1) * d + e, acc1);
      store8(s.out + (r + 2) * d + e, acc2);
      store8(s.out + (r + 3) * d + e, acc3);
    }
  }
  for (int64_t row = 0; row < c; ++row) {
    for (int64_t e = row < r ? vec_dims : 0; e < d; ++e) {
      float sum = 0.0f;
      for (int64_t a = 0; a < nk; ++a) {
        sum += s.scores[row * ld + a] * s.vs[(lo + a) * d + e];
      }
      s.out[row * d + e] = sum;
    }
  }
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
    const int64_t c = job.chunk;
    for (int64_t t0 = 0; t0 < n; t0 += c) {
      const int64_t lo = t0 > 0 ? t0 - c : 0;  // the chunk before (none for the first) and this one
      const int64_t nk = t0 + c - lo;
      lsh_scores(job, t0, lo, nk, s);
      for (int64_t row = 0; row < c; ++row) {
        s.lse[row] = lsh_softmax(job, real, t0 + row, lo, nk, s.scores + row * 2 * c, s);
      }
      lsh_values(job, lo, nk, s);
      for (int64_t row = 0; row < c; ++row) {  // merge into Y by the running log-sum-exp of the rounds
        const int64_t i = s.order[t0 + row];
        const float before = s.total[i], lse = s.lse[row];
        const float top = std::max(before, lse);
        const float keep = std::exp(before - top), add = std::exp(lse - top);  // exp(-inf) = 0 in round 0
        const float inv = 1.0f / (keep + add);
        for (int64_t e = 0; e < d; ++e) {
          y[i * d + e] = (y[i * d + e] * keep + s.out[row * d + e] * add) * inv;
        }
        s.total[i] = top + std::log(keep + add);
      }
    }
  }
}
